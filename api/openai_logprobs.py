"""Log-probabilities in the two OpenAI shapes, built from the tokens' wire form (:class:`TokenLogprob`).

- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  "refusal": None}``; ``top_logprobs`` holds the ``top_logprobs`` most likely tokens;
- completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; each
  ``top_logprobs`` entry maps the most likely tokens *and* the sampled one to their logprobs, as
  OpenAI and vLLM answer; ``text_offset`` counts characters of the completion, so a stream's
  offsets continue from chunk to chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from broker.contract import TokenLogprob


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: Iterable[TokenLogprob]) -> dict[str, Any]:
    content = [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": _bytes(t.token),
            "top_logprobs": [{"token": tok, "logprob": lp, "bytes": _bytes(tok)} for tok, lp in t.top],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """The legacy shape; remembers the text offset between the chunks of one stream."""

    def __init__(self) -> None:
        self.offset = 0

    def build(self, tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t.token)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{**dict(t.top), t.token: t.logprob} for t in tokens],
            "text_offset": offsets,
        }
