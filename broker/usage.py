"""What tenants use now, against their limits, read from what admission already keeps.

Nothing new is written for it: the numbers come from the tenant's job index
(``P:tjobs:<t>``, by creation time), its queued counter and rate buckets (``P:ts:<t>``,
the very fields ``admit.lua`` checks) and the models' lease sets (running jobs).

- ``requests``: jobs admitted in the window (refused requests are not admitted: the
  rejections metric counts those).
- ``tokens``: what the tokens-per-minute limiter charged for them: prompt + max_tokens
  while a job is queued or running, prompt + completion once it finished, nothing for
  one that ended without running (its reservation was handed back).
- ``rpm_left`` / ``tpm_left``: the rate buckets' level now (what the next request may
  take), ``None`` when the limit is off.

All times are Redis's clock (``TIME``), the one the Lua scripts stamp jobs with.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping
from dataclasses import dataclass

from broker.connection import RedisClient
from broker.errors import translated
from broker.keys import Keys
from broker.models import TenantLimits
from broker.replies import typed_reply

WINDOW_MS = 60_000
# Job records read per tenant for the token sum; past it the sum covers the newest ones only.
TOKEN_SCAN = 5000
_UNSTARTED_ENDS = {"cancelled", "expired", "failed"}


@dataclass(slots=True)
class TenantUsage:
    tenant: str
    window_ms: int
    requests: int  # jobs admitted in the window
    tokens: int  # tokens the limiter charged for them (see the module docstring)
    tokens_exact: bool  # False when more than TOKEN_SCAN jobs were admitted in the window
    queued: int  # queued now: the counter max_queued is checked against
    running: int  # holding a lease now
    rpm_left: int | None  # the request bucket's level now; None when rpm is unlimited
    tpm_left: int | None  # the token bucket's level now; None when tpm is unlimited


def _bucket(level: str | None, ts: str | None, per_min: int, burst: int, now: int) -> int | None:
    """The bucket's level refilled to now, as ``bucket_level`` in _lib.lua computes it."""
    if per_min <= 0:
        return None
    burst = burst or per_min
    have = float(level) if level else float(burst)
    since = float(ts) if ts else float(now)
    return int(min(float(burst), have + (now - since) * per_min / 60_000))


def _charged(status: str | None, pt: str | None, ct: str | None, cost: str | None, started: str | None) -> int:
    if status in (None, "queued", "running"):
        return int(cost or 0)
    if status in _UNSTARTED_ENDS and not started:
        return 0
    return int(pt or 0) + int(ct or 0)


class UsageReader:
    """Read-only views of tenants' usage (``Broker.usage``)."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis, self._keys = redis, keys

    async def _now_ms(self) -> int:
        sec, usec = await typed_reply(self._redis.time())
        return int(sec) * 1000 + int(usec) // 1000

    async def running_by_tenant(self, models: list[str]) -> dict[str, int]:
        """Jobs holding a lease now, per tenant (every model's lease set: bounded by the fleet)."""
        pipe = self._redis.pipeline(transaction=False)
        for m in models:
            pipe.zrange(self._keys.leases(m), 0, -1)
        ids = [j for found in await pipe.execute() for j in found]
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for j in ids:
            pipe.hget(self._keys.job(j), "tenant")
        out: dict[str, int] = {}
        for t in await pipe.execute():
            if t is not None:
                out[t] = out.get(t, 0) + 1
        return out

    async def tenant_usage(
        self, tenant: str, limits: TenantLimits, running: int = 0, window_ms: int = WINDOW_MS
    ) -> TenantUsage:
        """The tenant's usage over the last ``window_ms`` and now (``running`` from running_by_tenant)."""
        k = self._keys
        now = await self._now_ms()
        pipe = self._redis.pipeline(transaction=False)
        since = f"({now - window_ms}"  # admitted less than window_ms ago
        pipe.zcount(k.tenant_jobs(tenant), since, "+inf")
        pipe.zrevrangebyscore(k.tenant_jobs(tenant), "+inf", since, start=0, num=TOKEN_SCAN)
        pipe.hmget(k.tenant_state(tenant), ["q", "rq", "rq_ts", "tk", "tk_ts"])
        requests, recent, state = await pipe.execute()
        pipe = self._redis.pipeline(transaction=False)
        for j in recent:
            pipe.hmget(k.job(j), ["status", "prompt_tokens", "completion_tokens", "cost", "started_ms"])
        rows: list[list[str | None]] = await pipe.execute() if recent else []
        q, rq, rq_ts, tk, tk_ts = state
        return TenantUsage(
            tenant=tenant,
            window_ms=window_ms,
            requests=int(requests),
            tokens=sum(_charged(*r) for r in rows),
            tokens_exact=int(requests) <= TOKEN_SCAN,
            queued=max(0, int(q or 0)),
            running=running,
            rpm_left=_bucket(rq, rq_ts, limits.rpm, limits.rpm_burst, now),
            tpm_left=_bucket(tk, tk_ts, limits.tpm, limits.tpm_burst, now),
        )

    async def tenants_usage(
        self, limits: Mapping[str, TenantLimits], models: list[str], window_ms: int = WINDOW_MS
    ) -> dict[str, TenantUsage]:
        """Usage of each tenant in ``limits`` (its effective limits: its own or the defaults)."""
        running = await self.running_by_tenant(models)
        found = await asyncio.gather(
            *(self.tenant_usage(t, lim, running.get(t, 0), window_ms) for t, lim in limits.items())
        )
        return {u.tenant: u for u in found}


for _name, _fn in list(vars(UsageReader).items()):
    if not _name.startswith("_") and inspect.iscoroutinefunction(_fn):
        setattr(UsageReader, _name, translated(_fn))
