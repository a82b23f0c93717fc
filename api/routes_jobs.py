"""The native jobs API: submit, inspect, follow (SSE, resumable), cancel, list."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import ServerSentEvent

from api.auth import Auth, Principal
from api.errors import bad_request, from_broker, openapi_errors
from api.openai_schemas import JobRequest
from api.runtime import Runtime, get_runtime, note
from api.service import accepted_view, admit, describe, job_view, priority_header, queue_fields, warning_headers
from api.streams import SlotEventSourceResponse, follow, open_slot
from broker import errors as be
from broker.contract import WAITING_EVENTS, EventType
from broker.models import Job, JobStatus

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
RT = Annotated[Runtime, Depends(get_runtime)]
JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")
# a stream entry id, or a token event's: its stored event's id and its seq (broker.events)
EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}(-[0-9]{1,20})?$", re.ASCII)
U64_MAX = 2**64 - 1


def checked_id(job_id: str) -> str:
    """A malformed job id is simply not found."""
    if not JOB_ID.match(job_id):
        raise from_broker(be.NotFound(job_id))
    return job_id


async def owned_job(rt: Runtime, who: Principal, job_id: str) -> Job:
    """The caller's job; another tenant's job (or a malformed id) is simply not found."""
    return await rt.broker.get_job(checked_id(job_id), who.tenant)


@router.post("", status_code=202, responses=openapi_errors(400, 401, 404, 413, 429, 503))
async def submit_job(body: JobRequest, request: Request, who: Auth, rt: RT) -> JSONResponse:
    """Queue one generation job. `Idempotency-Key` returns the same job on repeat; `X-Priority` overrides.
    With no live worker for the model the job still queues: `eta_s` is null, and a `warning` field and an
    `X-Genq-Warning: no_worker` header say so."""
    sub = body.submission(priority_header(request, body.priority))
    adm, headers = await admit(rt, request, who, sub, record=True)
    view = await accepted_view(rt, who, adm)
    return JSONResponse(view, status_code=202, headers={**headers, **warning_headers(view)})


@router.get("", responses=openapi_errors(400, 401))
async def list_jobs(
    who: Auth,
    rt: RT,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=64, description="`next_after` of the previous page.")] = None,
) -> dict[str, Any]:
    """The caller's jobs, newest first, optionally only those with `status` (positions are not computed
    here: see GET /v1/jobs/{id}). Pages: while `has_more` is true, ask again with `after` set to
    `next_after`. A page may hold fewer than `limit` jobs (even none) and still have more: one call reads
    a bounded part of a long history."""
    if after is not None and not JOB_ID.match(after):
        raise bad_request("after must be a job id (the `next_after` of a previous page).", "after")
    try:
        page = await rt.broker.job_page(who.tenant, status, limit, after)
    except be.NotFound:
        raise bad_request("after names no job of yours (it may have expired).", "after") from None
    data = [job_view(j) for j in page.jobs]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
        "next_after": page.next_after,
    }


@router.get("/{job_id}", responses=openapi_errors(401, 404))
async def get_job(job_id: str, request: Request, who: Auth, rt: RT) -> dict[str, Any]:
    """The job: status, output so far, usage, timings, error. While queued: `queue_position` (jobs ahead in
    priority + arrival order); `queue_position_kind` (`exact`, or `estimate` when other jobs share its priority,
    whose tenants fairness may put before or after it); `queue_position_range` (`min`: jobs queued at higher
    priorities, which run first; `max`: every other job queued at its priority or higher); `eta_s` and
    `eta_range_s` from the measured drain rate, null with no live worker (then a `warning` says so)."""
    note(request, job_id=job_id)
    return await describe(rt, await owned_job(rt, who, job_id))


@router.delete("/{job_id}", responses=openapi_errors(401, 404, 409))
async def cancel_job(job_id: str, request: Request, who: Auth, rt: RT) -> dict[str, Any]:
    """Cancel: a queued job ends at once; a running one is aborted by its worker (status stays
    `running` until then, with `cancel_requested: true`). A finished job answers 409."""
    note(request, job_id=job_id)
    view = await describe(rt, await rt.broker.cancel_job(checked_id(job_id), who.tenant))  # another tenant's: not found
    view["cancel_requested"] = True
    return view


def _last_event_id(header: str | None, query: str | None) -> str | None:
    value = header or query
    # A stream id is two unsigned 64-bit integers: Redis refuses anything larger.
    if value is not None and (not EVENT_ID.match(value) or any(int(p) > U64_MAX for p in value.split("-"))):
        raise bad_request(
            "Last-Event-ID must be an event id from this stream, like `1700000000000-0`.", "last_event_id"
        )
    return value


async def _finished_events(rt: Runtime, job: Job, after: str | None) -> AsyncIterator[ServerSentEvent]:
    """A finished job's remaining events straight from its stream (nothing more will be published)."""
    while True:
        batch = await rt.hub.backlog(job.id, after)
        for ev in batch:
            yield ServerSentEvent(json.dumps(ev.data), event=ev.type, id=ev.id)
            after = ev.id
        if len(batch) < 1000:
            return


async def job_event_stream(rt: Runtime, job: Job, last_event_id: str | None) -> AsyncIterator[ServerSentEvent]:
    """The job's events after ``last_event_id`` as SSE up to the terminal one, with a `position`
    event (no id) every ``position_interval_s`` while it waits. The console's stream too."""
    if job.terminal:  # also a client resuming after the terminal event: answer at once, then close
        async for sse in _finished_events(rt, job, last_event_id):
            yield sse
        return
    queued = job.status is JobStatus.QUEUED
    try:
        async with contextlib.aclosing(follow(rt, job.id, last_event_id, rt.settings.position_interval_s)) as evs:
            async for ev in evs:
                if ev is None:  # a tick: tell a waiting client where it stands (not resumable: no id)
                    if queued:
                        fields, warning = await queue_fields(rt, job)
                        if fields is not None:
                            data = {**fields, "warning": warning} if warning else fields
                            yield ServerSentEvent(json.dumps(data), event="position")
                    continue
                if ev.type in WAITING_EVENTS:
                    queued = True
                elif ev.type in (EventType.STARTED, EventType.TOKEN) or ev.terminal:
                    queued = False
                if ev.type is EventType.RETRY:
                    rt.metrics.retry_seen(job.model, job.id, ev.id)
                yield ServerSentEvent(json.dumps(ev.data), event=ev.type, id=ev.id)
    except be.NotFound:  # the job expired between the check and the stream
        yield ServerSentEvent(json.dumps({"code": "not_found", "message": "the job expired"}), event="error")


@router.get(
    "/{job_id}/events", responses={**openapi_errors(400, 401, 404, 429), 200: {"content": {"text/event-stream": {}}}}
)
async def job_events(
    job_id: str,
    request: Request,
    who: Auth,
    rt: RT,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id: Annotated[str | None, Query(max_length=64)] = None,
) -> SlotEventSourceResponse:
    """Server-sent events: `queued`, `started`, `token`, `retry`, `done`, `failed`, `cancelled`, each with a
    resumable `id:`; `position` (no id) every few seconds while queued (see GET /v1/jobs/{id} for its fields).
    Reconnect with `Last-Event-ID`. A comment line keeps a silent stream open."""
    note(request, job_id=job_id)
    after = _last_event_id(last_event_id_header, last_event_id)
    job = await owned_job(rt, who, job_id)
    slot = open_slot(rt, who.tenant)  # last step before the response owns it
    return SlotEventSourceResponse(
        job_event_stream(rt, job, after),
        slot,
        ping=rt.settings.keepalive_s,
        shutdown_grace_period=rt.settings.drain_grace_s,
    )
