"""Prompt token counting in the API process, without vLLM.

A worker registers its model with ``tokenizer=<local folder>`` (see
``Broker.register_model``). The API loads that folder with
``transformers.AutoTokenizer`` once per model, lazily and in a thread (importing
transformers takes seconds), and counts chat prompts exactly as the engine will
see them: ``apply_chat_template(..., add_generation_prompt=True)``.

Without a usable tokenizer the count is a documented over-estimate:
``utf-8 bytes // 2 + 8`` per message (``+ 8`` once for a plain prompt). Typical
text runs 3-5 bytes per token, so this reserves more than the truth for rate
limits and context checks; the engine still enforces the exact context length.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import structlog

log = structlog.get_logger(__name__)

PER_MESSAGE_OVERHEAD = 8


def estimate_tokens(prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    if messages is None:
        return len((prompt or "").encode()) // 2 + PER_MESSAGE_OVERHEAD
    total = 0
    for m in messages:
        text = str(m.get("content") or "") + str(m.get("role") or "")
        total += len(text.encode()) // 2 + PER_MESSAGE_OVERHEAD
    return total


def _load(folder: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub at run time
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _count(tok: Any, prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    if messages is not None:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        ids = tok(prompt or "")
    if not isinstance(ids, list):  # transformers 5 answers a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


class TokenCounter:
    """Per-model tokenizers, loaded at first use; a failed load falls back to the estimate."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, Any] = {}  # folder -> tokenizer (None = unusable)
        self._locks: dict[str, asyncio.Lock] = {}

    async def _tokenizer(self, folder: str) -> Any:
        if folder in self._tokenizers:
            return self._tokenizers[folder]
        lock = self._locks.setdefault(folder, asyncio.Lock())
        async with lock:
            if folder not in self._tokenizers:
                try:
                    self._tokenizers[folder] = await asyncio.to_thread(_load, folder)
                    log.info("tokenizer loaded", folder=folder)
                except Exception as e:  # a bad folder must not take requests down  # noqa: BLE001
                    log.warning("tokenizer unusable; estimating prompt tokens", folder=folder, error=repr(e))
                    self._tokenizers[folder] = None
        return self._tokenizers[folder]

    async def count(self, model_info: dict[str, Any], prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
        folder = model_info.get("tokenizer")
        tok = await self._tokenizer(str(folder)) if folder else None
        if tok is None:
            return estimate_tokens(prompt, messages)
        try:
            return await asyncio.to_thread(_count, tok, prompt, messages)
        except Exception as e:  # e.g. a template that rejects the roles given  # noqa: BLE001
            log.warning("token count failed; estimating", error=repr(e))
            return estimate_tokens(prompt, messages)
