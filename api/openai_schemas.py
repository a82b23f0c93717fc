"""Request bodies (OpenAI-compatible and native) and the OpenAI response objects built from job events.

Every sampling parameter of :class:`broker.contract.Sampling` is a field of every body
(inherited); chat's ``logprobs``/``top_logprobs`` and ``response_format`` are mapped onto
it. A parameter genq cannot honour (tools, audio, echo...), or does not know, answers 400
with the field named, never a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.errors import bad_request
from api.openai_logprobs import CompletionLogprobs, chat_logprobs
from api.service import MAX_QUEUE_TIME_S, Submission
from broker.contract import MAX_LOGPROBS, SAMPLING_FIELDS, Sampling, StructuredOutputs, TokenLogprob

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


class _Sampling(Sampling):
    """What every request body shares: the model, the budget, genq's extensions, and every
    field of :class:`broker.contract.Sampling`, inherited (a new sampling parameter needs
    nothing here). ``null`` for a sampling field means its default, as clients send it."""

    model_config = ConfigDict(frozen=False, extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, ge=1)
    stop: StopField = None  # type: ignore[assignment]  # OpenAI's spelling: one string or up to four
    priority: int | None = Field(None, ge=0, le=9)  # vLLM extension; X-Priority wins
    metadata: Metadata | None = Field(None, max_length=16)
    # genq: a job still queued this long after admission is expired (X-Max-Queue-Time wins)
    max_time_in_queue_s: float | None = Field(None, gt=0, le=MAX_QUEUE_TIME_S)
    # genq: where the job's terminal state is POSTed, signed (Standard Webhooks); default: the tenant's
    webhook_url: str | None = Field(None, min_length=1, max_length=2048)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in SAMPLING_FIELDS}
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:  # type: ignore[override]
        if isinstance(v, str) and not v:
            raise ValueError("stop strings must not be empty")
        return v

    def endpoint_sampling(self) -> dict[str, Any]:
        """Sampling fields an endpoint spells its own way (chat's logprobs, response_format)."""
        return {}

    def sampling(self) -> Sampling:
        """The job's sampling, built once here from the request's fields (unset ones keep defaults)."""
        chosen = {name: getattr(self, name) for name in SAMPLING_FIELDS & self.model_fields_set}
        if "stop" in chosen:
            chosen["stop"] = _stop_list(chosen["stop"])
        chosen.update(self.endpoint_sampling())
        return Sampling(**{k: v for k, v in chosen.items() if v is not None})

    def _common(self, priority: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "sampling": self.sampling(),
            "priority": priority,
            "metadata": self.metadata,
            "max_time_in_queue_s": self.max_time_in_queue_s,
            "webhook_url": self.webhook_url,
        }


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # genq always holds the output to the schema


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format {"type": "json_schema"} needs its `json_schema`')
        return self

    def structured_outputs(self) -> StructuredOutputs | None:
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.type == "json_schema" and self.json_schema is not None:
            return StructuredOutputs(json_schema=self.json_schema.schema_)
        return None


def _off(v: Any) -> bool:
    return v in (None, False, "", [])


def _absent(v: Any) -> bool:
    return v is None  # even an empty object asks for something (web_search_options: {} searches)


# OpenAI (and vLLM) parameters genq cannot honour: accepted only with a value that asks for
# nothing (as OpenAI's own defaults do), else a 400 naming them.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_off, "tools (function calling) are not supported."),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool_choice is not supported: genq has no tools."),
    "functions": (_off, "functions (function calling) are not supported."),
    "function_call": (lambda v: v in (None, "none", "auto"), "function_call is not supported: genq has no tools."),
    "parallel_tool_calls": (lambda v: True, ""),  # means nothing without tools
    "modalities": (lambda v: v in (None, ["text"]), 'only modalities ["text"] are supported.'),
    "audio": (_absent, "audio output is not supported."),
    "prediction": (_absent, "predicted outputs are not supported."),
    "reasoning_effort": (_absent, "reasoning_effort is not supported."),
    "verbosity": (_absent, "verbosity is not supported."),
    "web_search_options": (_absent, "web search is not supported."),
    "store": (_off, "store is not supported (every job is kept for its result TTL anyway)."),
    "service_tier": (lambda v: v in (None, "auto", "default"), "service_tier is not supported: use X-Priority."),
    "echo": (_off, "echo is not supported."),
    "suffix": (_off, "suffix is not supported."),
    "best_of": (lambda v: v in (None, 1), "best_of > 1 is not supported."),
    "prompt_logprobs": (_absent, "prompt_logprobs are not supported."),
}
# Asked for nothing genq would do differently: labels for the caller's own bookkeeping.
INFORMATIONAL = frozenset({"user", "safety_identifier", "prompt_cache_key"})


class _OpenAI(_Sampling):
    # Unknown fields are collected, then refused by name (OpenAI does the same), never dropped.
    model_config = ConfigDict(extra="allow")

    n: int | None = Field(None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    background: bool = False  # genq: admit and answer 202 with the job at once

    def _common(self, priority: int) -> dict[str, Any]:
        # Only a streamed answer follows the job token by token (background mode: see _serve).
        return {**super()._common(priority), "stream": self.stream}

    def check_supported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in INFORMATIONAL:
                continue
            if name not in UNSUPPORTED:
                raise bad_request(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
            harmless, message = UNSUPPORTED[name]
            if not harmless(value):
                raise bad_request(message, name, "unsupported_value")

    def endpoint_sampling(self) -> dict[str, Any]:
        if self.response_format is None or self.response_format.type == "text":
            return {}
        if self.structured_outputs is not None:
            raise bad_request("give response_format or structured_outputs, not both.", "response_format")
        return {"structured_outputs": self.response_format.structured_outputs()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def choices(self) -> int:
        return self.n or 1

    def submission(self, priority: int) -> Submission:
        raise NotImplementedError

    def submissions(self, priority: int) -> list[Submission]:
        """One job per choice (the job model has one output): choice i samples with seed + i, as
        vLLM's parallel sampling does, so a seeded request still gets ``n`` different answers."""
        first = self.submission(priority)
        subs = [first]
        for i in range(1, self.choices):
            seed = first.sampling.seed
            sampling = first.sampling if seed is None else first.sampling.model_copy(update={"seed": _wrap(seed + i)})
            subs.append(dataclasses.replace(first, sampling=sampling, choice=i))
        return subs


def _wrap(seed: int) -> int:
    """Keep a seed a signed 64-bit integer."""
    return (seed + 2**63) % 2**64 - 2**63


class ChatCompletionRequest(_OpenAI):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # OpenAI's chat spelling; Sampling.logprobs is the number of alternatives
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def endpoint_sampling(self) -> dict[str, Any]:
        fields = super().endpoint_sampling()
        if not self.logprobs and self.top_logprobs:
            raise bad_request("top_logprobs needs logprobs: true.", "top_logprobs")
        fields["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return fields

    def submission(self, priority: int) -> Submission:
        self.check_supported()
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return Submission(
            kind="chat", messages=[m.as_dict() for m in self.messages], max_tokens=max_tokens, **self._common(priority)
        )


class CompletionRequest(_OpenAI):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's (and vLLM's) default for this endpoint
    max_tokens: int | None = Field(16, ge=1)

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
        return Submission(kind="completion", prompt=prompt, max_tokens=self.max_tokens, **self._common(priority))


class JobRequest(_Sampling):
    """``POST /v1/jobs``: a chat (``messages``) or a plain completion (``prompt``)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: str | None = None
    priority: int = Field(5, ge=0, le=9)
    stream: bool = Field(
        True,
        description="Deliver the output token by token (a `token` event every flush). false: nobody follows "
        "it live, so it is written once at completion (one `token` event with all of it, before `done`), "
        "which costs Redis far less; GET and the events still show the whole text.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (chat) and `prompt` (completion)")
        return self

    def submission(self, priority: int) -> Submission:
        common = {**self._common(priority), "stream": self.stream}
        if self.messages is not None:
            return Submission(
                kind="chat", messages=[m.as_dict() for m in self.messages], max_tokens=self.max_tokens, **common
            )
        return Submission(kind="completion", prompt=self.prompt, max_tokens=self.max_tokens, **common)


# -- responses ---------------------------------------------------------------------------
def openai_list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor-paged list object (files, batches)."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# One choice's answer: text, finish reason, logprobs (None when not asked for).
Choice = tuple[str, str | None, list[TokenLogprob] | None]


class Formatter:
    """Builds OpenAI objects for one request (``n`` choices, each a job); subclasses say chat or
    text completion. Streaming methods take the choice's ``index``."""

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

    def logprobs(self, tokens: list[TokenLogprob] | None, index: int = 0) -> dict[str, Any] | None:
        """A choice's ``logprobs`` (None when the request asked for none)."""
        raise NotImplementedError

    def pending(self) -> dict[str, Any]:
        """The object of a job without its answer yet (background mode): no choices, no usage."""
        return {**self._base(self.object_full), "choices": [], "usage": None, "system_fingerprint": None}

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, choice: dict[str, Any], index: int = 0) -> dict[str, Any]:
        out = {**self._base(self.object_chunk), "choices": [{"index": index, "logprobs": None, **choice}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._base(self.object_chunk), "choices": [], "usage": usage}

    def start(self, index: int = 0) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str, logprobs: list[TokenLogprob] | None = None, index: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def choice(self, index: int, answer: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def full(self, answers: Sequence[Choice], usage: dict[str, int]) -> dict[str, Any]:
        choices = [self.choice(i, answer) for i, answer in enumerate(answers)]
        return {**self._base(self.object_full), "choices": choices, "usage": usage, "system_fingerprint": None}


class ChatFormatter(Formatter):
    prefix, object_full, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"
    path = "/v1/chat/completions"

    def logprobs(self, tokens: list[TokenLogprob] | None, index: int = 0) -> dict[str, Any] | None:
        return None if tokens is None else chat_logprobs(tokens)

    def start(self, index: int = 0) -> list[dict[str, Any]]:
        return [self.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}, index)]

    def delta(self, text: str, logprobs: list[TokenLogprob] | None = None, index: int = 0) -> dict[str, Any]:
        lp = self.logprobs(logprobs)
        return self.chunk({"delta": {"content": text}, "logprobs": lp, "finish_reason": None}, index)

    def finish(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        return self.chunk({"delta": {}, "finish_reason": finish_reason}, index)

    def choice(self, index: int, answer: Choice) -> dict[str, Any]:
        text, finish_reason, logprobs = answer
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": self.logprobs(logprobs),
            "finish_reason": finish_reason,
        }


class CompletionFormatter(Formatter):
    prefix, object_full, object_chunk = "cmpl", "text_completion", "text_completion"
    path = "/v1/completions"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._logprobs: dict[int, CompletionLogprobs] = {}  # per choice: text offsets run on across chunks

    def logprobs(self, tokens: list[TokenLogprob] | None, index: int = 0) -> dict[str, Any] | None:
        if tokens is None:
            return None
        return self._logprobs.setdefault(index, CompletionLogprobs()).build(tokens)

    def delta(self, text: str, logprobs: list[TokenLogprob] | None = None, index: int = 0) -> dict[str, Any]:
        return self.chunk({"text": text, "logprobs": self.logprobs(logprobs, index), "finish_reason": None}, index)

    def finish(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        return self.chunk({"text": "", "finish_reason": finish_reason}, index)

    def choice(self, index: int, answer: Choice) -> dict[str, Any]:
        text, finish_reason, logprobs = answer
        lp = None if logprobs is None else CompletionLogprobs().build(logprobs)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
