"""Leases, fencing, retries and cancellation of queued and running jobs."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from broker import Broker, JobSpec, JobStatus
from broker.client import OutputWrite as Delta
from broker.contract import JobErrorCode, RenewResult
from broker.errors import AlreadyTerminal, NotFound, StaleLease

pytestmark = pytest.mark.asyncio

LEASE_MS, REAP_MS = 500, 100


def spec(tenant: str = "acme", **kw) -> JobSpec:
    kw.setdefault("model", "m")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return JobSpec(tenant=tenant, **kw)


@pytest.fixture
def short(broker: Broker) -> Broker:
    """The same namespace with a 500 ms lease and a 100 ms reap interval."""
    s = broker.settings.model_copy(update={"lease_ms": LEASE_MS, "reap_interval_ms": REAP_MS, "max_attempts": 2})
    return Broker(broker._redis, s)


async def event_types(broker: Broker, job_id: str) -> list[str]:
    return [ev.type for ev in await broker.event_hub().backlog(job_id)]


async def reaper(broker: Broker, timeout_s: float) -> list[tuple[str, str]]:
    """Call reap every reap interval, as a worker does, until it reaps something."""
    async with asyncio.timeout(timeout_s):
        while True:
            reaped = await broker.reap("m")
            if reaped:
                return reaped
            await asyncio.sleep(broker.settings.reap_interval_ms / 1000)


async def expire_lease(broker: Broker, job_id: str) -> None:
    """Test scaffolding: move a lease's expiry into the past instead of waiting for it."""
    assert await broker._redis.zadd(broker._keys.leases("m"), {job_id: 0}, xx=True, ch=True) == 1


# -- expiry, fencing, attempts ----------------------------------------------------------


async def test_unrenewed_lease_is_requeued_within_lease_plus_reap_interval(short: Broker) -> None:
    loop = asyncio.get_running_loop()
    adm = await short.admit(spec())
    [old] = await short.claim("m", "worker-1", 1)
    t_claim = loop.time()
    reaped = await reaper(short, timeout_s=3)
    elapsed = loop.time() - t_claim
    assert reaped == [(adm.job_id, "queued")]
    assert LEASE_MS / 1000 - 0.05 <= elapsed <= (LEASE_MS + REAP_MS) / 1000 + 0.1, elapsed  # 0.1 s: scheduling
    job = await short.get_job(adm.job_id)
    assert (job.status, job.attempts, job.worker) == (JobStatus.QUEUED, 1, None)
    stats = await short.queue_stats("m")
    assert (stats.total_depth, stats.running) == (1, 0)

    # Another worker takes it; everything the first one writes is refused.
    [new] = await short.claim("m", "worker-2", 1)
    assert new.id == adm.job_id
    assert new.fence > old.fence
    assert new.job.attempts == 2
    assert await short.append_many([Delta(old.id, old.fence, "stale", [9])]) == {old.id: False}
    with pytest.raises(StaleLease):
        await short.complete(old, "stop", "stale", [9])
    with pytest.raises(StaleLease):
        await short.fail(old, JobErrorCode.WORKER_ERROR, "boom", retry=True)
    assert await short.renew("m", [(old.id, old.fence)]) == {old.id: RenewResult.STALE}
    assert (await short.get_job(adm.job_id)).output == ""

    assert await short.append_many([Delta(new.id, new.fence, "hello", [1])]) == {new.id: True}
    await short.complete(new, "stop", " world", [2])
    job = await short.get_job(adm.job_id)
    assert (job.status, job.output, job.output_token_ids) == (JobStatus.SUCCEEDED, "hello world", [1, 2])
    assert (job.completion_tokens, job.attempts) == (2, 2)
    assert await event_types(short, adm.job_id) == ["queued", "started", "retry", "started", "token", "token", "done"]
    # A completion is visible exactly once: a second one with the same lease is refused.
    with pytest.raises(StaleLease):
        await short.complete(new, "stop")


async def test_lease_lost_past_max_attempts_fails_with_worker_lost(short: Broker) -> None:
    adm = await short.admit(spec())
    for attempt, outcome in ((1, "queued"), (2, "failed")):
        [lease] = await short.claim("m", "w", 1)
        assert lease.job.attempts == attempt
        await expire_lease(short, adm.job_id)
        assert await short.reap("m") == [(adm.job_id, outcome)]
    job = await short.get_job(adm.job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == {"code": "worker_lost", "message": "job lost its worker 2 times (max_attempts)"}
    assert job.finished_ms is not None
    assert await short.claim("m", "w", 1) == []
    stats = await short.queue_stats("m")
    assert (stats.total_depth, stats.running) == (0, 0)
    assert await event_types(short, adm.job_id) == ["queued", "started", "retry", "started", "failed"]


async def test_renew_extends_the_lease(short: Broker) -> None:
    loop = asyncio.get_running_loop()
    adm = await short.admit(spec())
    [lease] = await short.claim("m", "w", 1)
    t_end = loop.time() + 3 * LEASE_MS / 1000
    while loop.time() < t_end:  # heartbeat every 150 ms for 3 lease periods, reaping as we go
        assert await short.renew("m", [(lease.id, lease.fence)]) == {lease.id: RenewResult.OK}
        assert await short.reap("m") == []
        await asyncio.sleep(0.15)
    assert (await short.get_job(adm.job_id)).status == JobStatus.RUNNING
    assert await short.renew("m", [(lease.id, lease.fence)]) == {lease.id: RenewResult.OK}
    t_last = loop.time()
    assert await reaper(short, timeout_s=3) == [(adm.job_id, "queued")]
    assert loop.time() - t_last >= LEASE_MS / 1000 - 0.05


async def test_renew_reports_stale_and_unknown(broker: Broker) -> None:
    await broker.admit(spec())
    [lease] = await broker.claim("m", "w", 1)
    got = await broker.renew("m", [(lease.id, lease.fence), ("job_nope", 1)])
    assert got == {lease.id: RenewResult.OK, "job_nope": RenewResult.STALE}
    assert await broker.renew("m", [(lease.id, lease.fence + 1)]) == {lease.id: RenewResult.STALE}
    assert await broker.renew("m", []) == {}


async def test_fail_with_retry_requeues_then_fails(short: Broker) -> None:
    adm = await short.admit(spec())
    [lease] = await short.claim("m", "w", 1)
    assert await short.fail(lease, JobErrorCode.WORKER_ERROR, "oom", retry=True) == "queued"
    job = await short.get_job(adm.job_id)
    assert (job.status, job.attempts) == (JobStatus.QUEUED, 1)
    [lease2] = await short.claim("m", "w", 1)
    assert lease2.job.attempts == 2
    assert await short.fail(lease2, JobErrorCode.WORKER_ERROR, "oom again", retry=True) == "failed"  # max_attempts = 2
    job = await short.get_job(adm.job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == {"code": JobErrorCode.WORKER_ERROR, "message": "oom again"}


async def test_fail_without_retry_is_final(broker: Broker) -> None:
    adm = await broker.admit(spec())
    [lease] = await broker.claim("m", "w", 1)
    assert await broker.fail(lease, JobErrorCode.INVALID_REQUEST, "prompt rejected", retry=False) == "failed"
    job = await broker.get_job(adm.job_id)
    assert (job.status, job.attempts, job.error["code"]) == (JobStatus.FAILED, 1, JobErrorCode.INVALID_REQUEST)
    assert (await broker.queue_stats("m")).running == 0
    with pytest.raises(AlreadyTerminal):
        await broker.cancel(adm.job_id)


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_queued_job_removes_it_at_once(broker: Broker) -> None:
    keep = await broker.admit(spec())
    gone = await broker.admit(spec(priority=0))
    assert (await broker.queue_stats("m")).total_depth == 2
    assert await broker.cancel(gone.job_id, "acme") == JobStatus.CANCELLED
    stats = await broker.queue_stats("m")
    assert (stats.total_depth, stats.depth[0], stats.queued_tokens[0]) == (1, 0, 0)
    job = await broker.get_job(gone.job_id)
    assert (job.status, job.finished_ms is not None) == (JobStatus.CANCELLED, True)
    assert await event_types(broker, gone.job_id) == ["queued", "cancelled"]
    assert [x.id for x in await broker.claim("m", "w", 10)] == [keep.job_id]
    assert await broker.claim("m", "w", 10) == []
    with pytest.raises(AlreadyTerminal):
        await broker.cancel(gone.job_id, "acme")


async def test_cancel_running_job_notifies_its_worker(broker: Broker) -> None:
    adm = await broker.admit(spec())
    [lease] = await broker.claim("m", "w", 1)
    async with broker.cancel_notices("m") as control:
        notices = aiter(control)
        assert await broker.cancel(adm.job_id, "acme") == JobStatus.RUNNING
        assert await asyncio.wait_for(anext(notices), timeout=2) == adm.job_id
        with contextlib.suppress(Exception):
            await notices.aclose()
    job = await broker.get_job(adm.job_id)
    assert (job.status, job.cancel_requested) == (JobStatus.RUNNING, True)
    assert await broker.renew("m", [(lease.id, lease.fence)]) == {lease.id: RenewResult.CANCEL_REQUESTED}
    # the worker aborts the engine request and completes the job as cancelled
    await broker.complete(lease, "abort", "par", [7], status=JobStatus.CANCELLED)
    job = await broker.get_job(adm.job_id)
    assert (job.status, job.finish_reason, job.output) == (JobStatus.CANCELLED, "abort", "par")
    assert await event_types(broker, adm.job_id) == ["queued", "started", "token", "cancelled"]
    assert (await broker.queue_stats("m")).running == 0
    with pytest.raises(AlreadyTerminal):
        await broker.cancel(adm.job_id, "acme")


async def test_cancel_requested_job_is_not_retried(short: Broker) -> None:
    a = await short.admit(spec())
    b = await short.admit(spec())
    la, lb = await short.claim("m", "w", 2)  # noqa: RUF059
    assert await short.cancel(a.job_id) == JobStatus.RUNNING  # admin cancel: no tenant
    assert await short.cancel(b.job_id) == JobStatus.RUNNING
    await expire_lease(short, a.job_id)
    assert await short.reap("m") == [(a.job_id, "cancelled")]
    assert await short.fail(lb, JobErrorCode.WORKER_ERROR, "x", retry=True) == "cancelled"
    for jid in (a.job_id, b.job_id):
        assert (await short.get_job(jid)).status == JobStatus.CANCELLED
    assert await short.claim("m", "w", 2) == []


async def test_cancel_other_tenant_or_unknown_job_is_not_found(broker: Broker) -> None:
    adm = await broker.admit(spec("acme"))
    with pytest.raises(NotFound):
        await broker.cancel(adm.job_id, "globex")
    with pytest.raises(NotFound):
        await broker.get_job(adm.job_id, "globex")
    with pytest.raises(NotFound):
        await broker.cancel("job_" + "0" * 32, "acme")
    assert (await broker.get_job(adm.job_id)).status == JobStatus.QUEUED
    assert (await broker.queue_stats("m")).total_depth == 1


async def test_replayed_append_is_written_once(broker) -> None:
    """A flush replayed after a lost reply (same offset) must not duplicate text or events."""
    adm = await broker.admit(JobSpec(tenant="t", model="m", prompt="a b", kind="completion", max_tokens=8))
    (lease,) = await broker.claim("m", "w1", 1)
    first = Delta(lease.id, lease.fence, "Hello", [1, 2], offset=0)
    assert await broker.append_many([first]) == {lease.id: True}
    assert await broker.append_many([first]) == {lease.id: True}  # the replay
    second = Delta(lease.id, lease.fence, " world", [3], offset=2)
    assert await broker.append_many([second, second]) == {lease.id: True}
    await broker.complete(lease, "stop", "!", [4], offset=3)
    with pytest.raises(StaleLease):  # a replayed completion finds the job finished
        await broker.complete(lease, "stop", "!", [4], offset=3)
    job = await broker.get_job(adm.job_id)
    assert job.output == "Hello world!"
    assert job.output_token_ids == [1, 2, 3, 4]
    assert job.completion_tokens == 4
    async with broker.event_hub() as hub:
        events = await hub.backlog(adm.job_id)
    assert [e.data["text"] for e in events if e.type == "token"] == ["Hello", " world", "!"]
    assert await broker._redis.strlen(broker._keys.token_index(adm.job_id)) == 3 * 16
