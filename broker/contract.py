"""The job contract: what a job is, what it asks for, and every name its life is told in.

One page for the types the API, the broker (Python and Lua) and the worker share:

- :class:`Sampling` — how to sample; the API builds it once, the broker stores it typed
  inside :class:`JobInput`, the worker maps it to its engine in one function
  (``worker.engine.base.GenRequest.from_job``). Adding a sampling parameter means a
  field here and a line in that mapping.
- :class:`JobInput` — the request part of a job (prompt or messages, sampling, metadata),
  stored as the job hash's ``request`` field and decoded typed as ``Job.request``.
- :class:`JobSpec` — what a caller hands to ``Broker.admit``.
- :class:`JobStatus`, :class:`EventType`, :class:`JobErrorCode` — the strings stored in
  Redis and written by the Lua scripts (a test checks every literal the scripts emit is a
  member), with named sets.
- :class:`RenewResult`, :class:`FailOutcome` — typed results of broker calls.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class EventType(StrEnum):
    """The ``t`` field of a job's event stream entries (and the SSE event names)."""

    QUEUED = "queued"
    STARTED = "started"
    TOKEN = "token"
    RETRY = "retry"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.FAILED, EventType.CANCELLED, EventType.EXPIRED})
# Before any of these a job is waiting in a queue.
WAITING_EVENTS = frozenset({EventType.QUEUED, EventType.RETRY})


class JobErrorCode(StrEnum):
    """``error.code`` of a job that did not succeed (and the ``reason`` of a ``retry`` event)."""

    WORKER_LOST = "worker_lost"  # its lease expired: the worker died or hung
    WORKER_SHUTDOWN = "worker_shutdown"  # handed back by a stopping worker
    WORKER_ERROR = "worker_error"  # an unexpected error on the worker
    ENGINE_DEAD = "engine_dead"
    ENGINE_ABORT = "engine_abort"  # the engine aborted it without being asked to
    DEADLINE_EXCEEDED = "deadline_exceeded"  # still queued at its deadline
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_REQUEST = "invalid_request"


RETRYABLE = frozenset(
    {
        JobErrorCode.WORKER_LOST,
        JobErrorCode.WORKER_SHUTDOWN,
        JobErrorCode.WORKER_ERROR,
        JobErrorCode.ENGINE_DEAD,
        JobErrorCode.ENGINE_ABORT,
    }
)
# The request itself was at fault: resubmitting it unchanged cannot help.
CLIENT_ERRORS = frozenset({JobErrorCode.CONTEXT_LENGTH_EXCEEDED, JobErrorCode.INVALID_REQUEST})


class RenewResult(StrEnum):
    """Per job, what a lease renewal found."""

    OK = "ok"
    STALE = "stale"  # the lease is no longer this worker's: write nothing more
    CANCEL_REQUESTED = "cancel_requested"  # still leased, but a client cancelled it: abort


class FailOutcome(StrEnum):
    """Where a failed running job went."""

    QUEUED = "queued"  # back in its queue for another attempt
    FAILED = "failed"
    CANCELLED = "cancelled"  # its cancel had been requested


IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
TENANT = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
MODEL = re.compile(r"^[A-Za-z0-9._/:\-]{1,128}$")


class Sampling(BaseModel):
    """How to sample a job's completion. Defaults are vLLM's (and OpenAI's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: list[str] | None = None
    ignore_eos: bool = False


SAMPLING_FIELDS = frozenset(Sampling.model_fields)


def _nest_sampling(data: Any) -> Any:
    """Accept sampling fields flat (``temperature=...``) as well as under ``sampling``."""
    if isinstance(data, dict) and SAMPLING_FIELDS & data.keys():
        data = dict(data)
        nested = dict(data.pop("sampling", None) or {})
        for name in SAMPLING_FIELDS & data.keys():
            nested[name] = data.pop(name)
        data["sampling"] = nested
    return data


class JobInput(BaseModel):
    """The request part of a job: what to generate from and how."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["chat", "completion"] = "chat"
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: Sampling = Sampling()
    metadata: dict[str, str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        return _nest_sampling(data)

    def to_json(self) -> str:
        """Compact: defaults left out (they are filled again when decoded)."""
        return self.model_dump_json(exclude_defaults=True)


class JobSpec(BaseModel):
    """What a client asks for. Validated before anything touches Redis."""

    tenant: str = Field(pattern=TENANT.pattern)
    model: str = Field(pattern=MODEL.pattern)
    kind: Literal["chat", "completion"] = "chat"
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: Sampling = Sampling()
    max_tokens: int = Field(256, ge=1)
    priority: int = Field(5, ge=0, le=9)
    # Counted by the caller (API: the model's tokenizer, or an upper-bound estimate).
    prompt_tokens: int = Field(0, ge=0)
    idempotency_key: str | None = None
    # Absolute (epoch ms): a job still queued then is expired by the reaper.
    deadline_ms: int | None = Field(None, ge=0)
    # How long the result is kept once finished; None = the broker's setting.
    result_ttl_s: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        return _nest_sampling(data)

    @field_validator("idempotency_key")
    @classmethod
    def _idem(cls, v: str | None) -> str | None:
        if v is not None and not IDEMPOTENCY_KEY.match(v):
            raise ValueError("idempotency key must be 1-128 characters of [A-Za-z0-9._:-]")
        return v

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> JobSpec:
        if self.kind == "chat":
            if not self.messages:
                raise ValueError("a chat job needs non-empty messages")
        elif self.prompt is None:
            raise ValueError("a completion job needs a prompt")
        return self

    @property
    def input(self) -> JobInput:
        return JobInput(
            kind=self.kind, prompt=self.prompt, messages=self.messages, sampling=self.sampling, metadata=self.metadata
        )

    def request_json(self) -> str:
        return self.input.to_json()

    def fingerprint_source(self) -> str:
        """What must be equal for a repeated Idempotency-Key to name the same request."""
        return f"{self.model}\n{self.priority}\n{self.max_tokens}\n{self.request_json()}"
