"""Request bodies (OpenAI-compatible and native) and the OpenAI response objects built from job events.

Unknown OpenAI fields are ignored (clients send many); fields genq cannot honour
(``n`` > 1, tools, logprobs, echo...) answer 400 with the field named, never a
silent wrong answer.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.errors import bad_request
from api.service import MAX_QUEUE_TIME_S, Submission
from broker.contract import SAMPLING_FIELDS, Sampling

SEED = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)

    def as_dict(self) -> dict[str, Any]:
        """The message as the engine's chat template gets it: plain-text content."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            out["name"] = self.name
        return out


def _stop_list(stop: str | list[str] | None) -> list[str] | None:
    if stop is None or stop == []:
        return None
    return [stop] if isinstance(stop, str) else stop


StopField = Annotated[
    str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None, Field(None)
]


class _Sampling(BaseModel):
    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: SEED | None = None
    stop: StopField = None
    ignore_eos: bool = False  # vLLM extension
    priority: int | None = Field(None, ge=0, le=9)  # vLLM extension; X-Priority wins
    metadata: Metadata | None = Field(None, max_length=16)
    # genq: a job still queued this long after admission is expired (X-Max-Queue-Time wins)
    max_time_in_queue_s: float | None = Field(None, gt=0, le=MAX_QUEUE_TIME_S)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, str) and not v:
            raise ValueError("stop strings must not be empty")
        return v

    def sampling(self) -> Sampling:
        """The job's sampling, built once here from the request's fields (unset ones keep defaults)."""
        chosen = {name: getattr(self, name) for name in SAMPLING_FIELDS if name in self.model_fields_set}
        chosen = {k: v for k, v in chosen.items() if v is not None}
        if "stop" in chosen:
            chosen["stop"] = _stop_list(chosen["stop"])
        return Sampling(**chosen)

    def _common(self, priority: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "sampling": self.sampling(),
            "priority": priority,
            "metadata": self.metadata,
            "max_time_in_queue_s": self.max_time_in_queue_s,
        }


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAI(_Sampling):
    model_config = ConfigDict(extra="ignore")

    n: int | None = Field(None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # accepted, ignored
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # accepted, ignored
    user: str | None = None
    background: bool = False  # genq: admit and answer 202 with the job at once

    def check_supported(self) -> None:
        if self.n is not None and self.n > 1:
            raise bad_request("n > 1 is not supported: send one request per choice.", "n", "unsupported_value")
        if self.logprobs not in (None, False, 0):
            raise bad_request("logprobs are not supported.", "logprobs", "unsupported_value")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_OpenAI):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def submission(self, priority: int) -> Submission:
        self.check_supported()
        if self.tools:
            raise bad_request("tools are not supported.", "tools", "unsupported_value")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request(
                'only response_format {"type": "text"} is supported.', "response_format", "unsupported_value"
            )
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return Submission(
            kind="chat", messages=[m.as_dict() for m in self.messages], max_tokens=max_tokens, **self._common(priority)
        )


class CompletionRequest(_OpenAI):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's (and vLLM's) default for this endpoint
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def submission(self, priority: int) -> Submission:
        self.check_supported()
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise bad_request(
                    "prompt must be one string (lists of prompts and token ids are not supported).",
                    "prompt",
                    "unsupported_value",
                )
            prompt = prompt[0]
        for name, bad in (("echo", self.echo), ("suffix", self.suffix), ("best_of", (self.best_of or 1) > 1)):
            if bad:
                raise bad_request(f"{name} is not supported.", name, "unsupported_value")
        return Submission(kind="completion", prompt=prompt, max_tokens=self.max_tokens, **self._common(priority))


class JobRequest(_Sampling):
    """``POST /v1/jobs``: a chat (``messages``) or a plain completion (``prompt``)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: str | None = None
    priority: int = Field(5, ge=0, le=9)

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (chat) and `prompt` (completion)")
        return self

    def submission(self, priority: int) -> Submission:
        common = self._common(priority)
        if self.messages is not None:
            return Submission(
                kind="chat", messages=[m.as_dict() for m in self.messages], max_tokens=self.max_tokens, **common
            )
        return Submission(kind="completion", prompt=self.prompt, max_tokens=self.max_tokens, **common)


# -- responses ---------------------------------------------------------------------------
def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Formatter:
    """Builds OpenAI objects for one job; subclasses say chat or text completion."""

    prefix = ""
    object_full = ""
    object_chunk = ""
    path = ""  # where a finished object is retrieved: f"{path}/{job id}"

    def __init__(
        self,
        job_id: str,
        model: str,
        include_usage: bool = False,
        *,
        completion_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self.id = completion_id or f"{self.prefix}-{job_id}"
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.include_usage = include_usage

    def pending(self) -> dict[str, Any]:
        """The object of a job without its answer yet (background mode): no choices, no usage."""
        return {**self._base(self.object_full), "choices": [], "usage": None, "system_fingerprint": None}

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = {**self._base(self.object_chunk), "choices": [{"index": 0, "logprobs": None, **choice}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._base(self.object_chunk), "choices": [], "usage": usage}

    def start(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def full(self, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError


class ChatFormatter(Formatter):
    prefix, object_full, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"
    path = "/v1/chat/completions"

    def start(self) -> list[dict[str, Any]]:
        return [self.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})]

    def delta(self, text: str) -> dict[str, Any]:
        return self.chunk({"delta": {"content": text}, "finish_reason": None})

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self.chunk({"delta": {}, "finish_reason": finish_reason})

    def full(self, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return {**self._base(self.object_full), "choices": [choice], "usage": usage, "system_fingerprint": None}


class CompletionFormatter(Formatter):
    prefix, object_full, object_chunk = "cmpl", "text_completion", "text_completion"
    path = "/v1/completions"

    def delta(self, text: str) -> dict[str, Any]:
        return self.chunk({"text": text, "finish_reason": None})

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self.chunk({"text": "", "finish_reason": finish_reason})

    def full(self, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base(self.object_full), "choices": [choice], "usage": usage, "system_fingerprint": None}
