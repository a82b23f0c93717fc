"""The native API's HTTP shapes as typed models: what the client sends and what it gets back.

These mirror the server's JSON (``api/service.py:job_view``, ``api/routes_jobs.py``, the event
data the broker's scripts write), not its Python types: the client imports nothing of the
server, so it installs and runs with httpx and pydantic alone. Unknown fields are kept
(``extra="allow"``), so a newer server does not break an older client.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})


class EventType(StrEnum):
    """The SSE event names of ``GET /v1/jobs/{id}/events``."""

    QUEUED = "queued"
    STARTED = "started"
    TOKEN = "token"
    RETRY = "retry"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    # Not stored and not resumable (no id): a queued job's place, every few seconds.
    POSITION = "position"
    # The job expired while the stream was opening.
    ERROR = "error"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.FAILED, EventType.CANCELLED, EventType.EXPIRED})
# The events with a resumable id (a Redis stream entry id, ``<ms>-<n>``, or for a token event
# ``<ms>-<n>-<seq>``: the id of the stored event before it and its seq).
STORED_EVENTS = frozenset(EventType) - {EventType.POSITION, EventType.ERROR}


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Usage(_Shape):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Timings(_Shape):
    """Epoch milliseconds; the two durations are measured from submission."""

    created_ms: int | None = None
    started_ms: int | None = None
    first_token_ms: int | None = None
    finished_ms: int | None = None
    queue_wait_ms: int | None = None
    ttft_ms: int | None = None


class PositionRange(_Shape):
    min: int
    max: int


class EtaRange(_Shape):
    min: float | None = None
    max: float | None = None


class JobError(_Shape):
    code: str | None = None
    message: str | None = None


class Notice(_Shape):
    """A warning about a job, e.g. ``no_worker`` (no live worker serves its model yet)."""

    code: str
    message: str = ""


class Job(_Shape):
    """``GET /v1/jobs/{id}`` (and the 202 of a submit, the body of a cancel)."""

    id: str
    object: str = "job"
    model: str
    status: JobStatus
    priority: int = 5
    created_at: int = 0
    attempts: int = 0
    max_tokens: int | None = None
    output: str = ""
    finish_reason: str | None = None
    usage: Usage = Usage()
    timings: Timings = Timings()
    error: JobError | None = None
    queue_position: int | None = None
    queue_position_kind: str | None = None
    queue_position_range: PositionRange | None = None
    eta_s: float | None = None
    eta_range_s: EtaRange | None = None
    metadata: dict[str, str] | None = None
    links: dict[str, str] = Field(default_factory=dict)
    warning: Notice | None = None
    cancel_requested: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class JobPage(_Shape):
    """One page of ``GET /v1/jobs``: while ``has_more``, ask again with ``after=next_after``."""

    object: str = "list"
    data: list[Job]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
    next_after: str | None = None


class Event(_Shape):
    """One server-sent event of a job. ``id`` is set for the stored (resumable) events only."""

    type: EventType
    id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def text(self) -> str:
        """A ``token`` event's text ("" for any other event)."""
        return str(self.data.get("text", "")) if self.type is EventType.TOKEN else ""


class JobRequest(BaseModel):
    """``POST /v1/jobs``: ``messages`` (chat) or ``prompt`` (completion). Any other field the
    server takes (every vLLM sampling parameter: ``temperature``, ``seed``, ``stop``, ...) passes
    through as is; the server validates and answers a typed 400 for what it refuses."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    priority: int | None = None
    metadata: dict[str, str] | None = None
    max_time_in_queue_s: float | None = None
    # Sent as the `Idempotency-Key` header, not in the body.
    idempotency_key: str | None = Field(None, exclude=True)

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Progress(Generic[R]):
    """What ``run_many`` tells its ``on_progress`` callback each time one request finishes."""

    done: int  # requests finished so far, this one included
    total: int
    index: int  # this request's place in the input
    result: R  # its finished Job (or, with return_exceptions, the error it raised)
