"""What the native and OpenAI routes share: admission (token count, defaults, limits) and job views."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import Request

from api.auth import Principal
from api.errors import bad_request, bad_webhook_url, from_broker, ratelimit_headers
from api.runtime import Runtime, note
from batcher.webhook_urls import UrlRefused, check_url
from broker import errors as be
from broker.client import now_ms
from broker.models import IDEMPOTENCY_KEY, Admission, Job, JobSpec, JobStatus, Sampling

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Submission:
    """One request to admit, already shaped (by the native or the OpenAI schema)."""

    model: str
    kind: str  # chat | completion
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    priority: int = 5
    metadata: dict[str, str] | None = None
    max_time_in_queue_s: float | None = None
    webhook_url: str | None = None  # None: the tenant's default (checked when it was set)
    # Which of an OpenAI request's `n` choices this job is (each choice is a job of its own).
    choice: int = 0
    # Does anyone follow the output token by token? (JobSpec.stream)
    stream: bool = True


def priority_header(request: Request, default: int) -> int:
    raw = request.headers.get("x-priority")
    if raw is None:
        return default
    if raw.strip() not in {str(p) for p in range(10)}:  # str.isdigit() would pass "²"
        raise bad_request(f"X-Priority must be an integer from 0 (first) to 9 (last), got {raw!r}.", "X-Priority")
    return int(raw)


MAX_QUEUE_TIME_S = 7 * 24 * 3600.0


def max_queue_time(request: Request, body_value: float | None) -> float | None:
    """``X-Max-Queue-Time`` (seconds) wins over the body's ``max_time_in_queue_s``."""
    raw = request.headers.get("x-max-queue-time")
    if raw is None:
        return body_value
    try:
        value = float(raw.strip()) if raw.strip().isascii() else math.nan
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_QUEUE_TIME_S):  # NaN and inf fail this too
        raise bad_request(
            f"X-Max-Queue-Time must be a number of seconds in (0, {MAX_QUEUE_TIME_S:g}], got {raw[:40]!r}.",
            "X-Max-Queue-Time",
        )
    return value


def idempotency_header(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise bad_request("Idempotency-Key must be 1-128 characters of [A-Za-z0-9._:-].", "Idempotency-Key")
    return key


def choice_key(key: str | None, choice: int) -> str | None:
    """Choices after the first of an ``n`` > 1 request get keys of their own, derived from its key."""
    if key is None or choice == 0:
        return key
    suffix = f":choice{choice}"
    if len(key) + len(suffix) > 128:
        key = hashlib.sha256(key.encode()).hexdigest()
    return key + suffix


def _check_text(sub: Submission) -> None:
    """Lone surrogates (valid in JSON escapes, not in UTF-8) would fail deep inside; refuse them here."""
    try:
        json.dumps([sub.prompt, sub.messages, sub.sampling.stop, sub.metadata], ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise bad_request(
            "Text must be valid Unicode (no lone surrogates).", "messages" if sub.kind == "chat" else "prompt"
        ) from None


async def model_info(rt: Runtime, model: str) -> dict[str, Any]:
    info = await rt.fleet.model(model)
    if info is None:
        raise from_broker(be.UnknownModel(model))
    return info


async def checked_webhook_url(rt: Runtime, url: str | None) -> str | None:
    """``url`` if genq may POST to it (None stays None); else 400 with param ``webhook_url``."""
    if url is None:
        return None
    try:
        await check_url(url, allow_private=rt.settings.webhooks_allow_private)
    except UrlRefused as e:
        raise bad_webhook_url(e.reason, url, e.detail) from None
    return url


async def admit(
    rt: Runtime,
    request: Request,
    who: Principal,
    sub: Submission,
    idempotency_key: str | None = None,
    *,
    record: bool = False,
) -> tuple[Admission, dict[str, str]]:
    """Count tokens, fill defaults, admit. Returns the admission and its ``x-ratelimit-*`` headers.
    ``idempotency_key`` is a server-made key, used when the request has no ``Idempotency-Key``;
    ``record``: the admission carries the job (the 202 answer is built from it, no second read)."""
    _check_text(sub)
    webhook_url = await checked_webhook_url(rt, sub.webhook_url)
    info = await model_info(rt, sub.model)
    max_len = int(info.get("max_model_len") or 0)
    prompt_tokens = await rt.tokens.count(info, sub.prompt, sub.messages)
    if max_len and prompt_tokens >= max_len:
        rt.metrics.rejected("context_length_exceeded")
        raise from_broker(be.ContextTooLong(max_len, prompt_tokens, 0), sub.kind)
    queue_time_s = max_queue_time(request, sub.max_time_in_queue_s)
    max_tokens = sub.max_tokens
    if max_tokens is None:  # like vLLM: what the context leaves, capped by a default
        max_tokens = min(rt.settings.default_max_tokens, rt.settings.max_tokens_limit)
        if max_len:
            max_tokens = min(max_tokens, max_len - prompt_tokens)
    spec = JobSpec(
        tenant=who.tenant,
        model=sub.model,
        kind=sub.kind,
        prompt=sub.prompt,
        messages=sub.messages,
        max_tokens=max_tokens,
        sampling=sub.sampling,
        priority=sub.priority,
        prompt_tokens=prompt_tokens,
        idempotency_key=choice_key(idempotency_header(request) or idempotency_key, sub.choice),
        metadata=sub.metadata,
        stream=sub.stream,
        deadline_ms=None if queue_time_s is None else now_ms() + math.ceil(queue_time_s * 1000),
        webhook_url=webhook_url,
    )
    try:
        adm = await rt.broker.admit(spec, record=record)
    except be.AdmissionRefused as e:
        rt.metrics.rejected(e.reason)
        log.info("admission refused", tenant=who.tenant, reason=e.reason, retry_after_ms=e.retry_after_ms)
        raise from_broker(e, sub.kind) from None
    except be.ContextTooLong as e:
        rt.metrics.rejected("context_length_exceeded")
        raise from_broker(e, sub.kind) from None
    except be.BrokerError as e:
        raise from_broker(e, sub.kind) from None
    note(request, job_id=adm.job_id)
    headers = ratelimit_headers(adm.limits)
    if adm.duplicate:
        headers["Idempotent-Replayed"] = "true"
    return adm, headers


def _ms_between(a: int | None, b: int | None) -> int | None:
    return b - a if a and b else None


NO_WORKER_WARNING = "no_worker"


@dataclass(slots=True)
class Place:
    """Where a queued job stands, honestly (see ``Broker.position``).

    ``position`` is the jobs ahead as fairness between tenants will order them (an estimate
    at the priority's mean job cost); ``ahead_min`` (higher priorities + the tenant's own
    earlier jobs) and ``ahead_max`` (higher priorities + every other job at this priority)
    bound it exactly. The position is ``exact`` when the bounds meet. Later arrivals at a
    higher priority can still overtake.
    """

    position: int
    ahead_min: int
    ahead_max: int
    drain_per_s: float  # jobs/s the model's queue drains (0: unknown)

    @property
    def kind(self) -> str:
        return "exact" if self.ahead_min == self.ahead_max else "estimate"

    def _eta(self, ahead: int) -> float | None:
        return round((ahead + 1) / self.drain_per_s, 3) if self.drain_per_s > 0 else None

    def fields(self, live_workers: int) -> dict[str, Any]:
        """The queue fields of a job view or a ``position`` event; no ETA without a live worker."""
        eta = live_workers > 0
        return {
            "queue_position": self.position,
            "queue_position_kind": self.kind,
            "queue_position_range": {"min": self.ahead_min, "max": self.ahead_max},
            "eta_s": self._eta(self.position) if eta else None,
            "eta_range_s": {"min": self._eta(self.ahead_min), "max": self._eta(self.ahead_max)} if eta else None,
        }


EMPTY_PLACE = {
    "queue_position": None,
    "queue_position_kind": None,
    "queue_position_range": None,
    "eta_s": None,
    "eta_range_s": None,
}


async def place(rt: Runtime, job: Job) -> Place | None:
    """The job's place in its queue (None once claimed)."""
    where = await rt.broker.position(job)
    if where is None:
        return None
    return Place(where.estimate, where.ahead_min, where.ahead_max, where.drain_jobs_per_s)


def no_worker_warning(model: str) -> dict[str, str]:
    return {
        "code": NO_WORKER_WARNING,
        "message": f"No live worker serves the model `{model}`: the job stays queued until one starts.",
    }


def job_view(job: Job, queue: dict[str, Any] | None = None, warning: dict[str, str] | None = None) -> dict[str, Any]:
    usage = {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": job.prompt_tokens + job.completion_tokens,
    }
    view = {
        "id": job.id,
        "object": "job",
        "model": job.model,
        "status": job.status.value,
        "priority": job.priority,
        "created_at": job.created_ms // 1000,
        "attempts": job.attempts,
        "max_tokens": job.max_tokens,
        "stream": job.request.stream,
        "output": job.output,
        "finish_reason": job.finish_reason,
        "usage": usage,
        "timings": {
            "created_ms": job.created_ms,
            "started_ms": job.started_ms,
            "first_token_ms": job.first_token_ms,
            "finished_ms": job.finished_ms,
            "queue_wait_ms": _ms_between(job.created_ms, job.started_ms),
            "ttft_ms": _ms_between(job.created_ms, job.first_token_ms),  # from submission, as the client sees it
        },
        "error": job.error,
        **(queue or EMPTY_PLACE),
        "metadata": job.request.metadata,
        "webhook": job.webhook.view() if job.webhook else None,
        "links": links(job.id),
    }
    if warning:
        view["warning"] = warning
    return view


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}


async def queue_fields(rt: Runtime, job: Job) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """A queued job's queue fields (None once claimed) and the no-worker warning, if it applies."""
    where = await place(rt, job)
    if where is None:
        return None, None
    workers = await rt.fleet.workers(job.model)
    return where.fields(workers), None if workers else no_worker_warning(job.model)


async def describe(rt: Runtime, job: Job) -> dict[str, Any]:
    queue, warning = (await queue_fields(rt, job)) if job.status is JobStatus.QUEUED else (None, None)
    return job_view(job, queue, warning)


async def accepted_view(rt: Runtime, who: Principal, adm: Admission) -> dict[str, Any]:
    """The 202 body: the job as just admitted (or, for a repeated Idempotency-Key, as it is now)."""
    job = adm.job if adm.job is not None else await rt.broker.get_job(adm.job_id, who.tenant)
    view = await describe(rt, job)
    if view["queue_position"] is None and job.status is JobStatus.QUEUED:
        view["queue_position"] = adm.position
    return view


def warning_headers(view: dict[str, Any]) -> dict[str, str]:
    """``X-Genq-Warning`` for a 202 whose job no live worker will pick up yet."""
    warning = view.get("warning")
    return {"X-Genq-Warning": warning["code"]} if warning else {}
