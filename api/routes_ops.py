"""Operations (health, readiness, metrics) and admin endpoints (queues, tenant limits)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from api.auth import Admin
from api.errors import openapi_errors
from api.runtime import Runtime, get_runtime
from api.service import checked_webhook_url
from broker.models import TENANT, TenantLimits

router = APIRouter(tags=["operations"])
admin = APIRouter(prefix="/v1/admin", tags=["admin"])
RT = Annotated[Runtime, Depends(get_runtime)]
TenantName = Annotated[str, Path(pattern=TENANT.pattern)]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready, with the reasons"}})
async def readyz(rt: RT) -> JSONResponse:
    """Ready when this process can accept work: Redis answers and the broker's scripts are loaded.

    Workers are not a condition: jobs queue while none is live (scaling workers to zero, a GPU
    outage), so the API stays in its Service. Which models have live workers is reported here
    for information, and in `/v1/models` (`workers`, `ready`) and the `genq_workers` metric.
    """
    try:
        async with asyncio.timeout(2.0):
            await rt.broker.load_scripts()
            workers = await rt.broker.workers(rt.settings.worker_max_age_ms)
    except Exception as e:  # any failure to reach Redis means not ready  # noqa: BLE001
        return JSONResponse({"status": "unavailable", "reasons": [f"redis unreachable: {type(e).__name__}"]}, 503)
    served: dict[str, int] = dict.fromkeys(rt.settings.models, 0)
    for w in workers:
        served[str(w.get("model"))] = served.get(str(w.get("model")), 0) + 1
    return JSONResponse({"status": "ready", "workers": len(workers), "models": served})


async def _model_names(rt: Runtime) -> list[str]:
    return list(dict.fromkeys([*rt.settings.models, *(await rt.broker.models())]))


@router.get("/metrics", response_class=Response)
async def metrics(rt: RT) -> Response:
    """Prometheus text format. Queue gauges are read from Redis at scrape time and are the same on
    every replica (aggregate them with `max`); job outcomes and timings come from the workers' own
    `/metrics`."""
    models = await _model_names(rt)
    stats = await asyncio.gather(*(rt.broker.queue_stats(m) for m in models))
    per_model: dict[str, int] = {}
    for w in await rt.broker.workers(rt.settings.worker_max_age_ms):
        per_model[str(w.get("model"))] = per_model.get(str(w.get("model")), 0) + 1
    return Response(rt.metrics.render(stats, per_model), media_type=CONTENT_TYPE_LATEST)


@admin.get("/queues", responses=openapi_errors(401, 403))
async def queues(_: Admin, rt: RT) -> dict[str, Any]:
    stats = await asyncio.gather(*(rt.broker.queue_stats(m) for m in await _model_names(rt)))
    return {
        "object": "list",
        "data": [
            {
                "model": s.model,
                "depth": s.total_depth,
                "depth_by_priority": s.depth,
                "queued_tokens_by_priority": s.queued_tokens,
                "running": s.running,
                "oldest_wait_ms": s.oldest_wait_ms,
                "drain_jobs_per_s": s.drain_jobs_per_s,
                "drain_tokens_per_s": s.drain_tokens_per_s,
            }
            for s in stats
        ],
    }


class TenantLimitsBody(BaseModel):
    """Per-tenant limits; 0 means unlimited; bursts default to the per-minute figure."""

    rpm: int = Field(0, ge=0, le=10**9)
    rpm_burst: int = Field(0, ge=0, le=10**9)
    tpm: int = Field(0, ge=0, le=10**12)
    tpm_burst: int = Field(0, ge=0, le=10**12)
    max_queued: int = Field(0, ge=0, le=10**9)
    weight: float = Field(1.0, gt=0, le=10**6)
    priorities: list[Annotated[int, Field(ge=0, le=9)]] = Field(
        default_factory=lambda: list(range(10)), min_length=1, max_length=10
    )
    webhook_url: str = Field("", max_length=2048, description="webhook of jobs and batches that name none")


def _tenant_view(tenant: str, limits: TenantLimits, source: str) -> dict[str, Any]:
    return {"object": "tenant", "tenant": tenant, "limits": limits.model_dump(), "source": source}


@admin.put("/tenants/{tenant}", responses=openapi_errors(400, 401, 403))
async def put_tenant(tenant: TenantName, body: TenantLimitsBody, _: Admin, rt: RT) -> dict[str, Any]:
    limits = TenantLimits.model_validate(body.model_dump())
    if limits.webhook_url:
        await checked_webhook_url(rt, limits.webhook_url)
    await rt.broker.set_tenant(tenant, limits)
    return _tenant_view(tenant, limits, "tenant")


@admin.get("/tenants/{tenant}", responses=openapi_errors(400, 401, 403))
async def get_tenant(tenant: TenantName, _: Admin, rt: RT) -> dict[str, Any]:
    """The tenant's own limits, or the defaults it runs under (`source`: `tenant` or `defaults`)."""
    limits = await rt.broker.get_tenant(tenant)
    if limits is not None:
        return _tenant_view(tenant, limits, "tenant")
    defaults = rt.settings.default_limits()
    return _tenant_view(tenant, defaults, "defaults")


@admin.get("/tenants/{tenant}/webhook_secret", responses=openapi_errors(400, 401, 403))
async def webhook_secret(tenant: TenantName, _: Admin, rt: RT) -> dict[str, Any]:
    """The tenant's webhook signing secret (made on first need): receivers verify the
    `webhook-signature` of genq's webhooks with it (Standard Webhooks, e.g. `standardwebhooks`)."""
    return {"object": "webhook_secret", "tenant": tenant, "secret": await rt.broker.webhooks.secret(tenant)}


@admin.post("/tenants/{tenant}/webhook_secret/rotate", responses=openapi_errors(400, 401, 403))
async def rotate_webhook_secret(tenant: TenantName, _: Admin, rt: RT) -> dict[str, Any]:
    """Replace the tenant's signing secret: webhooks sent from now on are signed with the new one."""
    secret = await rt.broker.webhooks.secret(tenant, rotate=True)
    return {"object": "webhook_secret", "tenant": tenant, "secret": secret}
