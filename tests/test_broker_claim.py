"""Claim: strict priority, FIFO inside a tenant, weighted token fairness (VTC), budgets, wake-ups."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from broker import Broker, JobSpec, JobStatus
from broker.models import TenantLimits

pytestmark = pytest.mark.asyncio


def spec(tenant: str = "acme", **kw) -> JobSpec:
    kw.setdefault("model", "m")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return JobSpec(tenant=tenant, **kw)


async def admit_all(broker: Broker, specs: list[JobSpec]) -> list[str]:
    ids = []
    for i in range(0, len(specs), 500):
        results = await broker.admit_many(specs[i : i + 500])
        for r in results:
            assert not isinstance(r, Exception), r
            ids.append(r.job_id)
    return ids


async def claim_one_by_one(broker: Broker, n: int) -> list:
    jobs = []
    for _ in range(n):
        [lease] = await broker.claim("m", "w", 1)
        jobs.append(lease.job)
    return jobs


def served_tokens(jobs) -> Counter:
    served: Counter = Counter()
    for job in jobs:
        served[job.tenant] += job.prompt_tokens + job.max_tokens
    return served


# -- priority and FIFO ------------------------------------------------------------


async def test_priority_zero_jumps_a_thousand_priority_five_jobs(broker: Broker) -> None:
    backlog = await admit_all(broker, [spec(priority=5) for _ in range(1000)])
    urgent = await broker.admit(spec(priority=0))
    assert urgent.position == 0
    assert (await broker.queue_stats("m")).depth[5] == 1000
    [lease] = await broker.claim("m", "w", 1)
    assert lease.id == urgent.job_id
    assert lease.job.priority == 0
    # then the priority-5 backlog, in admission order
    leases = await broker.claim("m", "w", 3)
    assert [x.id for x in leases] == backlog[:3]


async def test_strict_priority_across_tenants_and_fifo_inside_tenant(broker: Broker) -> None:
    order = [("a", 9), ("b", 5), ("a", 5), ("c", 1), ("b", 9), ("a", 1)]
    ids = {}
    for n, (tenant, prio) in enumerate(order):
        ids[n] = (await broker.admit(spec(tenant, priority=prio))).job_id
    leases = await broker.claim("m", "w", 10)
    got = [(x.job.tenant, x.job.priority) for x in leases]
    assert [p for _, p in got] == [1, 1, 5, 5, 9, 9]
    # FIFO inside one tenant: a's priority-9 job was admitted first but comes last
    assert [x.id for x in leases if x.job.tenant == "a"] == [ids[5], ids[2], ids[0]]


async def test_claim_respects_max_jobs_and_token_budget(broker: Broker) -> None:
    await admit_all(broker, [spec(prompt_tokens=50, max_tokens=50) for _ in range(5)])
    assert len(await broker.claim("m", "w", 2)) == 2
    # budget 250 tokens: two 100-token jobs fit, the third would exceed it
    assert len(await broker.claim("m", "w", 10, max_tokens=250)) == 2
    # the first job is always taken, even above the budget
    assert len(await broker.claim("m", "w", 10, max_tokens=1)) == 1
    assert await broker.claim("m", "w", 10) == []
    assert await broker.claim("m", "w", 0) == []


async def test_claimed_job_is_running_with_increasing_fences(broker: Broker) -> None:
    ids = await admit_all(broker, [spec() for _ in range(3)])
    leases = await broker.claim("m", "worker-1", 3)
    assert [x.id for x in leases] == ids
    fences = [x.fence for x in leases]
    assert fences == sorted(fences) and len(set(fences)) == 3
    for lease in leases:
        job = await broker.get_job(lease.id)
        assert job.status == JobStatus.RUNNING
        assert job.attempts == 1
        assert job.fence == lease.fence
        assert job.worker == "worker-1"
        assert job.started_ms is not None
    stats = await broker.queue_stats("m")
    assert (stats.total_depth, stats.running) == (0, 3)


async def test_job_past_its_deadline_expires_instead_of_running(broker: Broker) -> None:
    late = await broker.admit(spec(deadline_ms=1))
    ok = await broker.admit(spec())
    [lease] = await broker.claim("m", "w", 5)
    assert lease.id == ok.job_id
    job = await broker.get_job(late.job_id)
    assert job.status == JobStatus.EXPIRED
    assert job.error == {"code": "deadline_exceeded", "message": "the job was still queued at its deadline"}


# -- fairness ---------------------------------------------------------------------


async def test_fairness_late_tenant_is_not_starved(broker: Broker) -> None:
    await admit_all(broker, [spec("A") for _ in range(2000)])
    b_ids = await admit_all(broker, [spec("B") for _ in range(20)])
    jobs = await claim_one_by_one(broker, 40)
    assert sorted(j.id for j in jobs if j.tenant == "B") == sorted(b_ids)
    # B's jobs come FIFO
    assert [j.id for j in jobs if j.tenant == "B"] == b_ids
    assert Counter(j.tenant for j in jobs) == {"A": 20, "B": 20}


async def test_fairness_weighted_two_to_one_by_tokens(broker: Broker) -> None:
    await broker.set_tenant("A", TenantLimits(weight=2))
    await broker.set_tenant("B", TenantLimits(weight=1))
    await admit_all(broker, [spec("A", max_tokens=100) for _ in range(500)])
    await admit_all(broker, [spec("B", max_tokens=100) for _ in range(500)])
    served = served_tokens(await claim_one_by_one(broker, 600))
    ratio = served["A"] / served["B"]
    assert abs(ratio - 2.0) <= 0.10, served  # within 5 % of 2:1


async def test_fairness_is_by_tokens_not_jobs(broker: Broker) -> None:
    # A's jobs cost 100 tokens, B's cost 10: equal weights get equal tokens, so B runs ~10x the jobs.
    await admit_all(broker, [spec("A", prompt_tokens=50, max_tokens=50) for _ in range(200)])
    await admit_all(broker, [spec("B", prompt_tokens=5, max_tokens=5) for _ in range(1000)])
    jobs = await claim_one_by_one(broker, 550)
    served = served_tokens(jobs)
    assert abs(served["A"] / served["B"] - 1.0) <= 0.05, served
    count = Counter(j.tenant for j in jobs)
    assert 9.0 <= count["B"] / count["A"] <= 11.0, count


async def test_idle_tenant_does_not_bank_credit(broker: Broker) -> None:
    # B idles while A is served alone; when B comes back it starts level with A, not 500 jobs ahead.
    await admit_all(broker, [spec("A") for _ in range(600)])
    await claim_one_by_one(broker, 500)
    b_ids = await admit_all(broker, [spec("B") for _ in range(50)])
    jobs = await claim_one_by_one(broker, 60)
    count = Counter(j.tenant for j in jobs)
    assert count == {"A": 30, "B": 30}
    assert [j.id for j in jobs if j.tenant == "B"] == b_ids[:30]


# -- wake-ups -----------------------------------------------------------------------


async def test_wait_for_work_wakes_on_admit(broker: Broker) -> None:
    assert await broker.wait_for_work("m", 0.1) is False  # empty queue: times out
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(broker.wait_for_work("m", 5))
    await asyncio.sleep(0.1)  # let the BLPOP reach Redis; the waiter must still be blocked
    assert not waiter.done()
    t0 = loop.time()
    await broker.admit(spec())
    assert await asyncio.wait_for(waiter, 2) is True
    assert loop.time() - t0 < 0.5
    assert len(await broker.claim("m", "w", 1)) == 1


async def test_a_full_workers_claim_takes_only_more_urgent_work(broker: Broker) -> None:
    """``max_priority``: what a full worker claims to preempt its batch work (strictly more urgent)."""
    low = await admit_all(broker, [spec("a", priority=9) for _ in range(3)])
    assert await broker.claim("m", "w", 5, max_priority=8) == []
    mid = (await broker.admit(spec("b", priority=6))).job_id
    high = (await broker.admit(spec("c", priority=2))).job_id
    assert [x.job.id for x in await broker.claim("m", "w", 5, max_priority=1)] == []
    assert [x.job.id for x in await broker.claim("m", "w", 5, max_priority=8)] == [high, mid]
    assert [x.job.id for x in await broker.claim("m", "w", 5)] == low


async def test_urgent_wake_ups_only_for_work_that_may_preempt(broker: Broker) -> None:
    await broker.admit(spec(priority=9))  # batch priority preempts nothing: no urgent wake-up
    assert await broker.wait_for_work("m", 0.1, urgent=True) is False
    waiter = asyncio.create_task(broker.wait_for_work("m", 5, urgent=True))
    await asyncio.sleep(0.1)  # let the BLPOP reach Redis; the waiter must still be blocked
    assert not waiter.done()
    await broker.admit(spec(priority=8))
    assert await asyncio.wait_for(waiter, 2) is True
    await admit_all(broker, [spec(priority=5) for _ in range(2)])  # two more tokens
    assert len(await broker.claim("m", "w", 3, max_priority=8)) == 3
    # nothing urgent is left queued: a full worker's empty claim drops the stale tokens
    assert await broker.claim("m", "w", 3, max_priority=8) == []
    assert await broker.wait_for_work("m", 0.1, urgent=True) is False
    assert len(await broker.claim("m", "w", 3)) == 1  # the batch-priority job is still there


@pytest.mark.parametrize("weights", [None, {"a": 2.0}])
async def test_queue_position_estimate_is_the_fair_claim_order(broker: Broker, weights: dict | None) -> None:
    """With equal job costs the fair-share estimate is the order claims really take; the bounds hold."""
    for tenant, w in (weights or {}).items():
        await broker.set_tenant(tenant, TenantLimits(weight=w))
    jobs = []
    for tenant, n in (("a", 6), ("b", 3), ("c", 1), ("b", 2)):
        jobs += [(await broker.admit(spec(tenant))).job_id for _ in range(n)]
    urgent = (await broker.admit(spec("c", priority=1))).job_id
    places = {}
    for jid in [*jobs, urgent]:
        places[jid] = await broker.position(await broker.get_job(jid))
    order = [lease.id for _ in range(len(jobs) + 1) for lease in await broker.claim("m", "w", 1)]
    assert order[0] == urgent and places[urgent].exact and places[urgent].estimate == 0
    for jid in jobs:
        p, ahead = places[jid], order.index(jid)
        assert p.ahead_min <= ahead <= p.ahead_max, (jid, p, ahead)
        assert p.estimate == ahead, (jid, p, ahead)
    assert await broker.position(await broker.get_job(jobs[0])) is None  # claimed: no place


async def test_a_claimed_job_reads_as_its_hash_does(broker: Broker):
    """claim.lua returns a job's fields positionally (broker.client.CLAIMED_FIELDS): the lease's
    job equals the job read whole, on a first attempt and on a retried one that resumes output."""
    from dataclasses import replace

    from broker.client import OutputWrite, now_ms
    from broker.contract import JobErrorCode

    adm = await broker.admit(
        spec(
            priority=3,
            max_tokens=50,
            deadline_ms=now_ms() + 600_000,
            idempotency_key="k1",
            webhook_url="https://example.com/hook",
            prompt_tokens=7,
        )
    )

    async def lease_matches_hash() -> object:
        [lease] = await broker.claim("m", "w-1", 1)
        whole = await broker.get_job(adm.job_id)
        assert lease.job == replace(whole, webhook=None), (lease.job, whole)
        assert lease.fence == whole.fence
        return lease

    first = await lease_matches_hash()
    assert first.job.attempts == 1 and first.job.output == ""
    assert await broker.append_many([OutputWrite(first.id, first.fence, "hello", [1, 2])]) == {first.id: True}
    assert await broker.fail(first, JobErrorCode.WORKER_ERROR, "boom", retry=True) == "queued"
    second = await lease_matches_hash()
    assert (second.job.attempts, second.job.output, second.job.output_token_ids) == (2, "hello", [1, 2])
    assert second.job.first_token_ms and second.job.started_ms == first.job.started_ms
    assert second.job.priority == 3 and second.job.completion_tokens == 2
