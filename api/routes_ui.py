"""The web console (``/ui``): its pages (api.ui) and the JSON views they need beyond the public API.

Everything here goes through the Broker's public methods. A tenant's key sees its
own jobs; an admin key sees every tenant's jobs, the queues, the workers and the
tenants. Another tenant's job answers 404, as in the native API.

The console follows a job with ``GET /v1/ui/jobs/{id}/events`` (same SSE as the
native endpoint, read with ``fetch`` so the key travels in the ``Authorization``
header, never in a URL); it exists so an admin can follow any tenant's job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, Field

from api import ui
from api.auth import ADMIN_TENANT, Admin, Auth, Principal, create_key, hash_key, key_id
from api.errors import ApiError, bad_request, forbidden, from_broker, openapi_errors
from api.routes_jobs import job_event_stream
from api.runtime import Runtime, get_runtime, note
from api.service import describe, job_view
from api.streams import SlotEventSourceResponse, open_slot
from broker import errors as be
from broker.client import now_ms
from broker.contract import EventType
from broker.models import MODEL, TENANT, Job, JobStatus

api = APIRouter(prefix="/v1/ui", tags=["console"])
RT = Annotated[Runtime, Depends(get_runtime)]
JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")
# a stream entry id, or a token event's: its stored event's id and its seq (broker.events)
EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}(-[0-9]{1,20})?$")
DEAD_AFTER_MS = 10 * 60 * 1000  # a worker silent this long is forgotten (shown as dead until then)


@api.get("/me", responses=openapi_errors(401))
async def me(who: Auth) -> dict[str, Any]:
    """Who the key is: what the console shows and hides."""
    return {"tenant": who.tenant, "name": who.name, "admin": who.admin, "key_id": who.key_id}


def _rejections(rt: Runtime) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in rt.metrics.rejections.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["reason"]] = sample.value
    return out


@api.get("/overview", responses=openapi_errors(401, 403))
async def overview(_: Admin, rt: RT) -> dict[str, Any]:
    """Per model: queued jobs and tokens by priority, oldest wait, drain rate, running, workers, tokens/s.
    `rejections` counts refusals by reason seen by this API process since it started."""
    models = list(dict.fromkeys([*rt.settings.models, *(await rt.broker.models())]))
    stats, workers = await asyncio.gather(
        asyncio.gather(*(rt.broker.queue_stats(m) for m in models)), rt.broker.workers(rt.settings.worker_max_age_ms)
    )
    rows = []
    for s in stats:
        mine = [w for w in workers if w.get("model") == s.model]
        rows.append(
            {
                "model": s.model,
                "queued": s.total_depth,
                "queued_by_priority": s.depth,
                "queued_tokens_by_priority": s.queued_tokens,
                "running": s.running,
                "oldest_wait_ms": s.oldest_wait_ms,
                "drain_jobs_per_s": s.drain_jobs_per_s,
                "drain_tokens_per_s": s.drain_tokens_per_s,
                "workers": len(mine),
                "tokens_per_s": round(sum(float(w.get("tokens_per_s") or 0) for w in mine), 1),
            }
        )
    return {"time_ms": now_ms(), "models": rows, "rejections": _rejections(rt)}


@api.get("/workers", responses=openapi_errors(401, 403))
async def workers(_: Admin, rt: RT) -> dict[str, Any]:
    """Every worker heard from in the last minutes; `dead` past the API's worker age limit."""
    now = now_ms()
    out = []
    for w in sorted(await rt.broker.workers(DEAD_AFTER_MS), key=lambda w: str(w.get("id"))):
        age = now - int(w.get("seen_ms") or 0)
        dead = age > rt.settings.worker_max_age_ms
        out.append({**w, "heartbeat_age_ms": age, "dead": dead, "state": "dead" if dead else w.get("state")})
    return {"object": "list", "data": out}


async def _tenants(rt: Runtime) -> list[str]:
    names = {str(r.get("tenant")) for r in (await rt.broker.api_keys()).values()}
    return sorted(names | {ADMIN_TENANT})


def _row(job: Job) -> dict[str, Any]:
    view = job_view(job)
    view.pop("output")  # a list shows no text: a page of long outputs would be megabytes
    return {**view, "tenant": job.tenant, "worker": job.worker, "output_chars": len(job.output)}


@api.get("/jobs", responses=openapi_errors(400, 401, 403))
async def jobs(
    who: Auth,
    rt: RT,
    tenant: Annotated[str | None, Query(pattern=TENANT.pattern)] = None,
    status: JobStatus | None = None,
    model: Annotated[str | None, Query(pattern=MODEL.pattern)] = None,
    priority: Annotated[int | None, Query(ge=0, le=9)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """Jobs, newest first, filtered. A tenant's key lists its own jobs only; an admin key any tenant's."""
    if tenant and tenant != who.tenant and not who.admin:
        raise forbidden("Listing another tenant's jobs needs an admin key.")
    tenants = [tenant] if tenant else (await _tenants(rt) if who.admin else [who.tenant])
    # the model and priority filters apply after the read: read more than asked when they are set
    per_tenant = limit if model is None and priority is None else min(4 * limit, 1000)
    found = await asyncio.gather(*(rt.broker.list_jobs(t, status, per_tenant) for t in tenants))
    rows = [
        j
        for js in found
        for j in js
        if (model is None or j.model == model) and (priority is None or j.priority == priority)
    ]
    rows.sort(key=lambda j: j.created_ms, reverse=True)
    return {"object": "list", "data": [_row(j) for j in rows[:limit]]}


async def _job(rt: Runtime, who: Principal, job_id: str) -> Job:
    if not JOB_ID.match(job_id):
        raise from_broker(be.NotFound(job_id))
    return await rt.broker.get_job(job_id, None if who.admin else who.tenant)


async def _timeline(rt: Runtime, job_id: str, max_events: int = 20_000) -> list[dict[str, Any]]:
    """The job's events except tokens, each with its time (the stream id is a millisecond clock)."""
    out: list[dict[str, Any]] = []
    after, seen = None, 0
    while seen < max_events:
        batch = await rt.hub.backlog(job_id, after)
        for ev in batch:
            if ev.type != EventType.TOKEN:
                out.append({"id": ev.id, "type": str(ev.type), "time_ms": int(ev.id.split("-")[0]), "data": ev.data})
        seen += len(batch)
        if len(batch) < 1000:
            break
        after = batch[-1].id
    return out


@api.get("/jobs/{job_id}", responses=openapi_errors(401, 404))
async def job(job_id: str, request: Request, who: Auth, rt: RT) -> dict[str, Any]:
    """The job as `GET /v1/jobs/{id}` shows it, plus tenant, worker and its timeline of events."""
    note(request, job_id=job_id)
    found = await _job(rt, who, job_id)
    view = await describe(rt, found)
    events = await _timeline(rt, job_id)
    return {
        **view,
        "tenant": found.tenant,
        "worker": found.worker,
        "cancel_requested": found.cancel_requested,
        "max_attempts": found.max_attempts,
        "events": events,
    }


@api.post("/jobs/{job_id}/cancel", responses=openapi_errors(401, 404, 409))
async def cancel(job_id: str, request: Request, who: Auth, rt: RT) -> dict[str, Any]:
    note(request, job_id=job_id)
    found = await _job(rt, who, job_id)
    status = await rt.broker.cancel(job_id, found.tenant)
    return {"id": job_id, "status": status.value, "cancel_requested": True}


@api.get(
    "/jobs/{job_id}/events",
    responses={**openapi_errors(400, 401, 404, 429), 200: {"content": {"text/event-stream": {}}}},
)
async def events(
    job_id: str,
    request: Request,
    who: Auth,
    rt: RT,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
) -> SlotEventSourceResponse:
    """The job's events from its first (or after `Last-Event-ID`), as SSE, until the terminal one,
    with `position` while it waits (as `GET /v1/jobs/{id}/events`); any tenant's job for an admin key."""
    note(request, job_id=job_id)
    if last_event_id is not None and not EVENT_ID.match(last_event_id):
        raise bad_request("Last-Event-ID must be an event id of this stream, like `1700000000000-0`.", "Last-Event-ID")
    found = await _job(rt, who, job_id)
    slot = open_slot(rt, who.tenant)
    return SlotEventSourceResponse(job_event_stream(rt, found, last_event_id), slot, ping=rt.settings.keepalive_s)


def _key_view(digest: str, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": key_id(digest),
        "name": record.get("name", ""),
        "admin": bool(record.get("admin")),
        "created_ms": record.get("created_ms"),
    }


def _created(key: dict[str, Any]) -> int:
    return int(key["created_ms"] or 0)


@api.get("/tenants", responses=openapi_errors(401, 403))
async def tenants(_: Admin, rt: RT) -> dict[str, Any]:
    """Every tenant with a key: its limits (its own, or the defaults), usage against them, and keys.
    `usage`: requests admitted and tokens charged in the last minute (against rpm, tpm), what the
    rate buckets would let through now, queued jobs (against max_queued) and running ones."""
    defaults = rt.settings.default_limits()
    keys, names, models = await asyncio.gather(rt.broker.api_keys(), _tenants(rt), rt.broker.models())
    own = await asyncio.gather(*(rt.broker.get_tenant(t) for t in names))
    limits = {t: lim or defaults for t, lim in zip(names, own, strict=True)}
    usage = await rt.broker.usage.tenants_usage(limits, list(dict.fromkeys([*rt.settings.models, *models])))
    out = []
    for tenant, mine_limits in zip(names, own, strict=True):
        mine = sorted((_key_view(h, r) for h, r in keys.items() if r.get("tenant") == tenant), key=_created)
        out.append(
            {
                "tenant": tenant,
                "limits": limits[tenant].model_dump(),
                "source": "tenant" if mine_limits else "defaults",
                "usage": dataclasses.asdict(usage[tenant]),
                "keys": mine,
            }
        )
    return {"object": "list", "data": out}


class NewKey(BaseModel):
    tenant: str = Field(pattern=TENANT.pattern)
    name: str = Field("", max_length=64)
    admin: bool = False


@api.post("/keys", status_code=201, responses=openapi_errors(400, 401, 403))
async def new_key(body: NewKey, _: Admin, rt: RT) -> dict[str, Any]:
    """Create a key; the key itself is in this answer only (only its hash is stored)."""
    key = await create_key(rt.broker, body.tenant, body.name, body.admin)
    return {"key": key, "id": key_id(hash_key(key)), "tenant": body.tenant, "name": body.name, "admin": body.admin}


@api.delete("/keys/{kid}", responses=openapi_errors(400, 401, 403, 404))
async def revoke_key(kid: str, who: Admin, rt: RT) -> dict[str, Any]:
    """Revoke a key by its id (a hash prefix): requests with it answer 401 at once."""
    if not re.fullmatch(r"[0-9a-f]{16}", kid):
        raise bad_request("A key id is 16 hex digits (see GET /v1/ui/tenants).", "kid")
    if kid == who.key_id:
        raise bad_request("The console's own key cannot revoke itself.", "kid")
    removed = [h for h in await rt.broker.api_keys() if key_id(h) == kid]
    for h in removed:
        await rt.broker.delete_api_key(h)
    if not removed:
        raise ApiError(404, f"No key with id {kid}.", code="not_found", param="kid")
    return {"id": kid, "revoked": True}


router = APIRouter()
router.include_router(api)
router.include_router(ui.router)
