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
- cancelling the consumer (``aclose()`` / task cancellation) aborts the
  request in the engine; ``CancelledError`` is re-raised;
- raises :class:`EngineDeadError` once the engine has died, and
  :class:`InvalidRequestError` (a ValueError; :class:`PromptTooLongError` is
  one) for a request no retry can fix, before any Delta.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, Self, runtime_checkable

from pydantic import BaseModel, Field

from broker.contract import Sampling
from broker.models import Job


@dataclass(slots=True)
class GenRequest:
    request_id: str
    prompt: str | None = None  # plain completion prompt
    # chat messages (OpenAI shape); the engine applies the tokenizer's chat
    # template with add_generation_prompt=True
    messages: list[dict] | None = None
    # completion tokens already emitted by an earlier attempt
    resume_token_ids: list[int] = field(default_factory=list)
    max_tokens: int = 256  # total completion budget INCLUDING resume_token_ids
    sampling: Sampling = field(default_factory=Sampling)  # each engine maps it in one function
    priority: int = 5  # 0..9, lower first

    @classmethod
    def for_job(cls, job: Job, request_id: str) -> GenRequest:
        """The engine request for (another attempt at) ``job``: continues after its emitted tokens."""
        chat = job.request.kind == "chat"
        return cls(
            request_id=request_id,
            prompt=None if chat else (job.request.prompt or ""),
            messages=job.request.messages if chat else None,
            resume_token_ids=list(job.output_token_ids),
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
    # vLLM: collect scheduler stats every step (exact running/waiting, KV-cache use). Off by
    # default: the per-step bookkeeping slows generation measurably on a small CPU box, and
    # the worker's own in-flight count sizes claims well enough.
    scheduler_stats: bool = False


@runtime_checkable
class Engine(Protocol):
    model_name: str  # served model name, e.g. "SmolLM2-135M-Instruct"
    max_model_len: int
    capacity: int  # max concurrent sequences (max_num_seqs)

    async def start(self) -> None: ...

    def generate(self, req: GenRequest) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def count_prompt_tokens(self, prompt: str | None, messages: list[dict] | None) -> int: ...

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
