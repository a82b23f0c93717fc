"""Tenants' usage read from what admission keeps (broker.usage): requests and charged tokens in
the window, the rate buckets' level, queued and running jobs, without writing anything new."""

from __future__ import annotations

import math
import time

import pytest

from broker import Broker, JobSpec
from broker import usage as usage_mod
from broker.contract import JobErrorCode
from broker.models import TenantLimits

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
LIMITS = TenantLimits(rpm=100, tpm=10_000, max_queued=50)


def spec(tenant: str = "acme", model: str = "m", max_tokens: int = 20, priority: int = 5) -> JobSpec:
    return JobSpec(
        tenant=tenant,
        model=model,
        kind="completion",
        prompt="a b c",
        prompt_tokens=3,
        max_tokens=max_tokens,
        priority=priority,
    )


async def test_usage_follows_admission_claim_completion_and_cancel(broker: Broker) -> None:
    await broker.set_tenant("acme", LIMITS)
    await broker.register_model("m2", 4096)
    start = time.monotonic()
    ids = [(await broker.admit(spec())).job_id for _ in range(4)]
    other = (await broker.admit(spec(model="m2"))).job_id
    await broker.admit(spec("rival", priority=9))  # another tenant's job (claimed last) counts for it only
    u = await broker.usage.tenant_usage("acme", LIMITS)
    assert (u.requests, u.tokens, u.queued, u.running, u.tokens_exact) == (5, 5 * 23, 5, 0, True)
    # what the next admission may take: the buckets less what was charged, plus their refill since
    refill = (time.monotonic() - start) / 60
    assert 95 <= u.rpm_left <= 95 + math.ceil(refill * LIMITS.rpm), u
    assert 10_000 - 5 * 23 <= u.tpm_left <= 10_000 - 5 * 23 + math.ceil(refill * LIMITS.tpm), u

    a, b = await broker.claim("m", "w1", 2)
    [c] = await broker.claim("m2", "w2", 1)
    assert {a.job.id, b.job.id, c.job.id} == {ids[0], ids[1], other}
    assert await broker.usage.running_by_tenant(["m", "m2"]) == {"acme": 3}
    await broker.complete(a, "length")  # 0 completion tokens: 20 of its 23 handed back
    await broker.fail(b, JobErrorCode.INVALID_REQUEST, "no", retry=False)  # ran: its prompt stays charged
    await broker.cancel(ids[2], "acme")  # never ran: its whole reservation handed back
    got = await broker.usage.tenants_usage({"acme": LIMITS, "rival": TenantLimits()}, ["m", "m2"])
    u, r = got["acme"], got["rival"]
    assert (u.requests, u.tokens, u.queued, u.running) == (5, 3 + 3 + 0 + 23 + 23, 1, 1)
    assert (r.requests, r.tokens, r.queued, r.running, r.rpm_left, r.tpm_left) == (1, 23, 1, 0, None, None)


async def test_a_short_window_and_the_token_scan_cap(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(3):
        await broker.admit(spec(max_tokens=10))
    assert (await broker.usage.tenant_usage("acme", LIMITS, window_ms=0)).requests == 0  # none in the last 0 ms
    monkeypatch.setattr(usage_mod, "TOKEN_SCAN", 2)
    u = await broker.usage.tenant_usage("acme", LIMITS)
    assert (u.requests, u.tokens, u.tokens_exact) == (3, 2 * 13, False)  # the newest 2 summed, and said so
