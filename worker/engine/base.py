"""The engine interface the worker loop is written against.

An engine turns one :class:`GenRequest` into a stream of :class:`Delta` and
runs many such streams at once (continuous batching).  Two implementations:
``simulated`` (pure asyncio, deterministic, for tests and load experiments) and
``vllm`` (a real ``AsyncLLM``).

Lifecycle: engines are opened by :func:`worker.engine.open_engine`, which
returns a started engine, and closed with ``await engine.close()``.  Every
engine is also an async context manager (``async with await open_engine(s) as
eng``; ``__aexit__`` closes it), and ``start()`` is idempotent, so
``async with SimulatedEngine(settings) as eng`` works as well.

Stream contract for ``generate()``:
- it is an async generator; the last item is a Delta with ``finish_reason``
  set (``"stop"``, ``"length"`` or ``"abort"``), then the generator ends;
- ``resume_token_ids`` are completion tokens from an earlier attempt: they are
  not re-emitted, generation continues after them, and ``max_tokens`` counts
  them (the engine generates ``max_tokens - len(resume_token_ids)``).  If that
  is <= 0 the stream is a single empty Delta with ``finish_reason="length"``;
- with ``sampling.logprobs`` set, every Delta carries one :class:`TokenLogprob` per token id;
- cancelling the consumer (``aclose()`` / task cancellation) aborts the
  request in the engine; ``CancelledError`` is re-raised;
- raises :class:`EngineDeadError` once the engine has died, and
  :class:`InvalidRequestError` (a ValueError; :class:`PromptTooLongError` is
  one) for a request no retry can fix, before any Delta.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self, runtime_checkable

from pydantic import BaseModel, Field, field_validator

from broker.contract import Sampling, TokenLogprob
from broker.models import Job


@dataclass(slots=True)
class GenRequest:
    request_id: str
    prompt: str | None = None  # plain completion prompt
    # chat messages (OpenAI shape); the engine applies the tokenizer's chat
    # template with add_generation_prompt=True
    messages: list[dict[str, Any]] | None = None
    # completion tokens already emitted by an earlier attempt
    resume_token_ids: list[int] = field(default_factory=list)
    max_tokens: int = 256  # total completion budget INCLUDING resume_token_ids
    sampling: Sampling = field(default_factory=Sampling)  # each engine maps it in one function
    priority: int = 5  # 0..9, lower first

    @classmethod
    def for_job(cls, job: Job, request_id: str, generated: Sequence[int] = ()) -> GenRequest:
        """The engine request for (another attempt at) ``job``: continues after its emitted
        tokens, and after ``generated`` (this attempt's, when a preempted run resumes)."""
        chat = job.request.kind == "chat"
        return cls(
            request_id=request_id,
            prompt=None if chat else (job.request.prompt or ""),
            messages=job.request.messages if chat else None,
            resume_token_ids=[*job.output_token_ids, *generated],
            max_tokens=job.max_tokens,
            sampling=job.request.sampling,
            priority=job.priority,
        )


@dataclass(slots=True)
class Delta:
    text: str  # new text since the previous delta
    token_ids: list[int]  # new token ids since the previous delta
    prompt_tokens: int  # token count of the ORIGINAL prompt (no resume tokens)
    finish_reason: str | None = None  # None while running; stop|length|abort
    # one per token of token_ids, only when the request asked for logprobs
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1, best effort


class EngineError(RuntimeError):
    """Root of the engine errors."""


class EngineDeadError(EngineError):
    """The engine died; every current and future generate() fails with this."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is invalid (bad parameters); retrying cannot help."""


class PromptTooLongError(InvalidRequestError):
    """The original prompt leaves no room for a completion in max_model_len."""


class EngineArgsError(ValueError):
    """An engine argument (``--engine-arg``) that vLLM's parser or genq refuses; the message names it."""


def engine_arg_key(key: str) -> str:
    """``--enable-prefix-caching`` -> ``enable_prefix_caching``; vLLM's dotted sub-keys stay as given."""
    head, dot, rest = key.strip().lstrip("-").partition(".")
    return head.replace("-", "_") + dot + rest


def engine_arg_text(value: Any) -> str:
    """A value as vLLM's command line takes it: JSON true/false/null, numbers, lists and objects."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "None"  # vLLM's optional types read "None" as None
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)


def engine_args_text(value: Any) -> Any:
    """Normalise a mapping of engine arguments (keys and values); anything else is left to pydantic."""
    if isinstance(value, dict):
        return {engine_arg_key(str(k)): engine_arg_text(v) for k, v in value.items()}
    return value


# EngineSettings fields that are also vLLM engine arguments (same names), so a genq setting
# and an `--engine-arg` of that name are one setting.
VLLM_SETTING_FIELDS = (
    "model",
    "served_model_name",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "dtype",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "enforce_eager",
)


class EngineSettings(BaseModel):
    """How to build an engine.  ``None`` fields are resolved per platform."""

    kind: Literal["vllm", "simulated"] = "simulated"
    model: str | None = None  # None = the default model (worker.model)
    served_model_name: str | None = None
    max_num_seqs: int = Field(16, ge=1)
    max_num_batched_tokens: int | None = None
    max_model_len: int = Field(2048, ge=16)
    # "auto"; on CPU with the default model vLLM is forced to float32
    # (bfloat16 produced nonsense there, see FACTS.md)
    dtype: str = "auto"
    # None -> 0.3 on CPU (a share of host RAM for the KV cache), 0.9 on GPU
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool | None = None  # None -> True on CPU
    sim_step_ms: float = Field(5.0, ge=0)
    sim_step_ms_per_seq: float = Field(0.5, ge=0)
    sim_tokens_per_step: int = Field(1, ge=1)
    # vLLM engine arguments beyond the fields above: AsyncEngineArgs field name (or vLLM's dotted
    # form, ``compilation_config.mode``) -> the text vLLM's command line takes.  Read by vLLM's own
    # parser when the engine is built (worker.engine.vllm_args); the fields above are genq's and
    # may not be repeated here (WorkerSettings.engine_settings folds such arguments into them).
    engine_args: dict[str, str] = Field(default_factory=dict)
    # vLLM: collect scheduler stats every step (exact running/waiting, KV-cache use). Off by
    # default: the per-step bookkeeping slows generation measurably on a small CPU box, and
    # the worker's own in-flight count sizes claims well enough.
    scheduler_stats: bool = False

    @field_validator("engine_args", mode="before")
    @classmethod
    def normalise_engine_args(cls, value: Any) -> Any:
        return engine_args_text(value)


@runtime_checkable
class Engine(Protocol):
    model_name: str  # served model name, e.g. "SmolLM2-135M-Instruct"
    max_model_len: int
    capacity: int  # max concurrent sequences (max_num_seqs)

    async def start(self) -> None: ...

    def generate(self, req: GenRequest) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def count_prompt_tokens(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> int: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


class EngineBase:
    """Context-manager plumbing shared by the implementations."""

    async def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def check_request(req: GenRequest) -> None:
    """Reject requests no engine can serve."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("exactly one of prompt and messages must be set")
    if req.max_tokens < 1:
        raise InvalidRequestError("max_tokens must be >= 1")
