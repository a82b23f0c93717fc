"""Job model, statuses and the records the broker hands out."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from broker.contract import (
    ACTIVE,
    IDEMPOTENCY_KEY,
    MODEL,
    TENANT,
    TERMINAL,
    JobErrorCode,
    JobInput,
    JobSpec,
    JobStatus,
    Sampling,
    Webhook,
)

__all__ = [
    "ACTIVE",
    "IDEMPOTENCY_KEY",
    "MODEL",
    "TENANT",
    "TERMINAL",
    "Admission",
    "Job",
    "JobErrorCode",
    "JobInput",
    "JobSpec",
    "JobStatus",
    "Lease",
    "QueuePlace",
    "QueueStats",
    "Sampling",
    "TenantLimits",
    "Webhook",
    "new_job_id",
]


def new_job_id() -> str:
    """128 random bits, URL-safe."""
    return "job_" + secrets.token_hex(16)


class TenantLimits(BaseModel):
    """Per-tenant limits; 0 means unlimited. Bursts default to the per-minute figure."""

    rpm: int = Field(0, ge=0)
    rpm_burst: int = Field(0, ge=0)
    tpm: int = Field(0, ge=0)
    tpm_burst: int = Field(0, ge=0)
    max_queued: int = Field(0, ge=0)
    weight: float = Field(1.0, gt=0)
    priorities: list[int] = Field(default_factory=lambda: list(range(10)))
    # Where the terminal states of the tenant's jobs and batches that name none are POSTed ("" = none).
    webhook_url: str = Field("", max_length=2048)


def _int(v: str | bytes | None, default: int = 0) -> int:
    return int(v) if v not in (None, b"", "") else default


@dataclass(slots=True)
class Job:
    id: str
    tenant: str
    model: str
    status: JobStatus
    priority: int
    attempts: int
    max_attempts: int
    request: JobInput
    prompt_tokens: int
    max_tokens: int
    completion_tokens: int
    output: str
    output_token_ids: list[int]
    created_ms: int
    started_ms: int | None
    first_token_ms: int | None
    finished_ms: int | None
    finish_reason: str | None
    error: dict[str, str] | None
    fence: int
    worker: str | None  # the worker running it; on a finished job, the one that finished it
    cancel_requested: bool
    webhook: Webhook | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        ids = h.get("output_ids") or ""
        err = None
        if h.get("error_code"):
            err = {"code": h["error_code"], "message": h.get("error_message", "")}

        def opt(k: str) -> int | None:
            return _int(h.get(k)) or None

        return cls(
            id=h["id"],
            tenant=h["tenant"],
            model=h["model"],
            status=JobStatus(h["status"]),
            priority=_int(h.get("priority"), 5),
            attempts=_int(h.get("attempts")),
            max_attempts=_int(h.get("max_attempts"), 1),
            request=JobInput.model_validate_json(h.get("request") or "{}"),
            prompt_tokens=_int(h.get("prompt_tokens")),
            max_tokens=_int(h.get("max_tokens")),
            completion_tokens=_int(h.get("completion_tokens")),
            output=h.get("output", ""),
            output_token_ids=[int(t) for t in ids.split(",") if t],
            created_ms=_int(h.get("created_ms")),
            started_ms=opt("started_ms"),
            first_token_ms=opt("first_token_ms"),
            finished_ms=opt("finished_ms"),
            finish_reason=h.get("finish_reason") or None,
            error=err,
            fence=_int(h.get("fence")),
            worker=h.get("worker") or None,
            cancel_requested=h.get("cancel") == "1",
            webhook=Webhook.from_hash(h),
        )


@dataclass(slots=True)
class Admission:
    job_id: str
    duplicate: bool
    position: int
    limits: dict[str, int] = field(default_factory=dict)
    job: Job | None = None  # the job as admitted, when asked for (``Broker.admit(record=True)``)


@dataclass(slots=True)
class Lease:
    """A claimed job as the worker sees it."""

    job: Job
    fence: int

    @property
    def id(self) -> str:
        return self.job.id


@dataclass(slots=True, frozen=True)
class QueuePlace:
    """A queued job's place: jobs ahead of it, exactly bounded and estimated under fairness."""

    fifo: int  # ahead in strict priority + arrival order (what a FIFO queue would say)
    estimate: int  # ahead under per-tenant fairness (VTC), at the priority's mean job cost
    ahead_min: int  # certainly ahead: higher priorities + this tenant's earlier jobs
    ahead_max: int  # at most ahead: higher priorities + every other job at this priority
    drain_jobs_per_s: float  # how fast the model's queue drains (0 = unknown)

    @property
    def exact(self) -> bool:
        return self.ahead_min == self.ahead_max

    def eta_s(self, ahead: int) -> float | None:
        return (ahead + 1) / self.drain_jobs_per_s if self.drain_jobs_per_s > 0 else None


@dataclass(slots=True)
class QueueStats:
    model: str
    depth: dict[int, int]
    queued_tokens: dict[int, int]
    running: int
    oldest_wait_ms: int
    drain_jobs_per_s: float
    drain_tokens_per_s: float

    @property
    def total_depth(self) -> int:
        return sum(self.depth.values())
