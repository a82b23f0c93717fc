"""What the native and OpenAI routes share: admission (token count, defaults, limits) and job views."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import Request

from api.auth import Principal
from api.errors import bad_request, from_broker, ratelimit_headers
from api.runtime import Runtime, note
from broker import errors as be
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


def priority_header(request: Request, default: int) -> int:
    raw = request.headers.get("x-priority")
    if raw is None:
        return default
    if not raw.strip().isdigit() or not 0 <= int(raw) <= 9:
        raise bad_request(f"X-Priority must be an integer from 0 (first) to 9 (last), got {raw!r}.", "X-Priority")
    return int(raw)


def idempotency_header(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise bad_request("Idempotency-Key must be 1-128 characters of [A-Za-z0-9._:-].", "Idempotency-Key")
    return key


def _check_text(sub: Submission) -> None:
    """Lone surrogates (valid in JSON escapes, not in UTF-8) would fail deep inside; refuse them here."""
    try:
        json.dumps([sub.prompt, sub.messages, sub.sampling.stop, sub.metadata], ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise bad_request(
            "Text must be valid Unicode (no lone surrogates).", "messages" if sub.kind == "chat" else "prompt"
        ) from None


async def model_info(rt: Runtime, model: str) -> dict[str, Any]:
    info = (await rt.broker.models()).get(model)
    if info is None:
        raise from_broker(be.UnknownModel(model))
    return info


async def admit(rt: Runtime, request: Request, who: Principal, sub: Submission) -> tuple[Admission, dict[str, str]]:
    """Count tokens, fill defaults, admit. Returns the admission and its ``x-ratelimit-*`` headers."""
    _check_text(sub)
    info = await model_info(rt, sub.model)
    max_len = int(info.get("max_model_len") or 0)
    prompt_tokens = await rt.tokens.count(info, sub.prompt, sub.messages)
    if max_len and prompt_tokens >= max_len:
        rt.metrics.rejected("context_length_exceeded")
        raise from_broker(be.ContextTooLong(max_len, prompt_tokens, 0), sub.kind)
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
        idempotency_key=idempotency_header(request),
        metadata=sub.metadata,
    )
    try:
        adm = await rt.broker.admit(spec)
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


def job_view(job: Job, position: int | None = None, eta_s: float | None = None) -> dict[str, Any]:
    usage = {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": job.prompt_tokens + job.completion_tokens,
    }
    return {
        "id": job.id,
        "object": "job",
        "model": job.model,
        "status": job.status.value,
        "priority": job.priority,
        "created_at": job.created_ms // 1000,
        "attempts": job.attempts,
        "max_tokens": job.max_tokens,
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
        "queue_position": position,
        "eta_s": round(eta_s, 3) if eta_s is not None else None,
        "metadata": job.request.metadata,
        "links": links(job.id),
    }


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}


async def describe(rt: Runtime, job: Job) -> dict[str, Any]:
    position, eta = (await rt.broker.position(job)) if job.status is JobStatus.QUEUED else (None, None)
    if job.terminal:
        rt.metrics.job_finished(job)
    return job_view(job, position, eta)


async def accepted_view(rt: Runtime, who: Principal, adm: Admission) -> dict[str, Any]:
    """The 202 body: the job as just admitted (or, for a repeated Idempotency-Key, as it is now)."""
    job = await rt.broker.get_job(adm.job_id, who.tenant)
    view = await describe(rt, job)
    if view["queue_position"] is None and job.status is JobStatus.QUEUED:
        view["queue_position"] = adm.position
    return view
