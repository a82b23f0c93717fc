"""Job events: stream + pub/sub followers that resume without gap or duplicate."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from broker import Broker, JobSpec
from broker.client import OutputWrite as Delta
from broker.contract import JobErrorCode
from broker.errors import NotFound
from broker.events import Event, EventHub
from broker.models import Lease

pytestmark = pytest.mark.asyncio


def spec(tenant: str = "acme", **kw) -> JobSpec:
    kw.setdefault("model", "m")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return JobSpec(tenant=tenant, **kw)


async def running_job(broker: Broker) -> Lease:
    await broker.admit(spec())
    [lease] = await broker.claim("m", "w", 1)
    return lease


async def take(
    hub: EventHub, job_id: str, last: str | None = None, k: int | None = None, first: asyncio.Event | None = None
) -> list[Event]:
    """Follow a job; stop after ``k`` events (disconnect) or at its terminal event."""
    out: list[Event] = []
    async with contextlib.aclosing(hub.follow(job_id, last)) as events:
        async for ev in events:
            out.append(ev)
            if first is not None:
                first.set()
            if k is not None and len(out) == k:
                break
    return out


async def append(broker: Broker, lease: Lease, i: int) -> None:
    assert await broker.append_many([Delta(lease.id, lease.fence, f"t{i} ", [i])]) == {lease.id: True}


def check_stream(events: list[Event], n_tokens: int) -> None:
    assert [e.type for e in events] == ["queued", "started"] + ["token"] * n_tokens + ["done"]
    assert [e.data["seq"] for e in events if e.type == "token"] == list(range(1, n_tokens + 1))
    assert [e.data["text"] for e in events if e.type == "token"] == [f"t{i} " for i in range(n_tokens)]


async def test_follower_resumes_with_exactly_the_remaining_events(broker: Broker) -> None:
    lease = await running_job(broker)
    n, k = 50, 12
    async with broker.event_hub() as hub:
        following, disconnected, gap_made, reconnected = (asyncio.Event() for _ in range(4))

        async def produce() -> None:
            await following.wait()
            for i in range(n):
                if i == 20:
                    await disconnected.wait()  # tokens 20..29 are written while nobody follows
                if i == 30:
                    gap_made.set()
                    await reconnected.wait()  # tokens 30.. go out live to the resumed follower
                await append(broker, lease, i)
                await asyncio.sleep(0.002)  # pacing: let the follower interleave
            await broker.complete(lease, "length")

        producer = asyncio.create_task(produce())
        async with asyncio.timeout(10):
            before = await take(hub, lease.id, k=k, first=following)
            disconnected.set()
            await gap_made.wait()
            after = await take(hub, lease.id, last=before[-1].id, first=reconnected)
            await producer

        assert len(before) == k
        full = await hub.backlog(lease.id)
        assert before + after == full  # nothing lost, nothing twice, in order
        check_stream(full, n)
        ids = [e.id for e in full]
        assert len(set(ids)) == len(ids) == n + 3
        assert after[-1].terminal and after[-1].data["usage"]["completion_tokens"] == n
        assert hub.followers == 0 and not hub._subs


async def test_live_events_arrive_by_pubsub(broker: Broker) -> None:
    lease = await running_job(broker)
    loop = asyncio.get_running_loop()
    # resync_s is long: an event that arrives quickly came through pub/sub, not a stream re-read
    async with broker.event_hub(resync_s=60) as hub:
        got: asyncio.Queue[tuple[Event, float]] = asyncio.Queue()

        async def follow() -> None:
            async with contextlib.aclosing(hub.follow(lease.id)) as events:
                async for ev in events:
                    got.put_nowait((ev, loop.time()))

        task = asyncio.create_task(follow())
        assert [(await asyncio.wait_for(got.get(), 2))[0].type for _ in range(2)] == ["queued", "started"]
        for i in range(3):
            t0 = loop.time()
            await append(broker, lease, i)
            ev, t = await asyncio.wait_for(got.get(), 2)
            assert (ev.type, ev.data["seq"]) == ("token", i + 1)
            assert t - t0 < 0.5
        await broker.complete(lease, "stop")
        ev, _ = await asyncio.wait_for(got.get(), 2)
        assert ev.type == "done"
        await asyncio.wait_for(task, 2)


async def test_two_followers_share_one_subscription(broker: Broker) -> None:
    lease = await running_job(broker)
    channel = broker._keys.channel(lease.id)
    async with broker.event_hub() as hub:
        started = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(take(hub, lease.id, first=e)) for e in started]
        async with asyncio.timeout(5):
            for e in started:
                await e.wait()
            assert list(hub._subs) == [channel]
            assert len(hub._subs[channel]) == 2
            assert hub.followers == 2
            assert await broker._redis.pubsub_numsub(channel) == [(channel, 1)]  # one connection
            for i in range(10):
                await append(broker, lease, i)
            await broker.complete(lease, "length")
            a, b = await asyncio.gather(*tasks)
        assert a == b == await hub.backlog(lease.id)
        check_stream(a, 10)
        assert hub.followers == 0 and not hub._subs
        async with asyncio.timeout(2):  # the UNSUBSCRIBE is already sent; let Redis apply it
            while await broker._redis.pubsub_numsub(channel) != [(channel, 0)]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


async def test_follower_of_finished_job_gets_backlog_and_stops(broker: Broker) -> None:
    lease = await running_job(broker)
    for i in range(5):
        await append(broker, lease, i)
    await broker.complete(lease, "stop", "t5 ", [5])
    async with broker.event_hub() as hub:
        events = await asyncio.wait_for(take(hub, lease.id), 2)
        check_stream(events, 6)
        # resuming after the fifth event yields the rest only
        rest = await asyncio.wait_for(take(hub, lease.id, last=events[4].id), 2)
        assert rest == events[5:]


async def test_follow_unknown_job_raises_not_found(broker: Broker) -> None:
    async with broker.event_hub() as hub:
        with pytest.raises(NotFound):
            await take(hub, "job_" + "f" * 32)
        assert hub.followers == 0 and not hub._subs


async def test_follower_sees_retry_and_continues(broker: Broker) -> None:
    lease = await running_job(broker)
    await append(broker, lease, 0)
    async with broker.event_hub() as hub:
        first = asyncio.Event()
        task = asyncio.create_task(take(hub, lease.id, first=first))
        await asyncio.wait_for(first.wait(), 2)
        assert await broker.fail(lease, JobErrorCode.WORKER_ERROR, "restart", retry=True) == "queued"
        [again] = await broker.claim("m", "w2", 1)
        assert again.job.output == "t0 "  # output so far is kept for the resumed attempt
        await append(broker, again, 1)
        await broker.complete(again, "stop")
        events = await asyncio.wait_for(task, 2)
    assert [e.type for e in events] == ["queued", "started", "token", "retry", "started", "token", "done"]
    assert [e.data["seq"] for e in events if e.type == "token"] == [1, 2]
    assert events[3].data == {"attempt": 1, "reason": JobErrorCode.WORKER_ERROR, "message": "restart"}


async def test_follower_fills_a_missed_live_message_from_the_stream(broker: Broker) -> None:
    """A pub/sub message lost in flight (reconnect, late SUBSCRIBE) is noticed by the event
    counter on the next live event and rebuilt from the job's token index: no gap, no duplicate."""
    adm = await broker.admit(JobSpec(tenant="t", model="m", kind="completion", prompt="a", max_tokens=8))
    (lease,) = await broker.claim("m", "w", 1)
    hub = broker.event_hub(resync_s=30.0)  # the safety-net re-read must not be what saves us
    got: list[Event] = []
    started = asyncio.Event()

    async def follow() -> None:
        async for ev in hub.follow(adm.job_id):
            got.append(ev)
            if ev.type == "started":
                started.set()

    task = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(started.wait(), timeout=5)
        # A delta written whose PUBLISH is lost (the script publishes on the channel it is given).
        keys, maxlen = broker._keys.job_keys(adm.job_id), broker.settings.events_maxlen
        await broker._scripts.append(keys, [maxlen, lease.fence, "lost", "7", 1, "nobody-listens", -1, ""])
        await broker.append_many([Delta(lease.id, lease.fence, "live", [1])])
        await broker.complete(lease, "stop")
        await asyncio.wait_for(task, timeout=5)
    finally:
        task.cancel()
        await hub.close()
    assert [e.data.get("text") for e in got if e.type == "token"] == ["lost", "live"]
    assert [e.n for e in got] == list(range(1, len(got) + 1))
    assert len({e.id for e in got}) == len(got)


async def test_the_queued_event_is_made_from_the_job_not_stored(broker: Broker) -> None:
    """A queued job has no stream; its first event reads from the hash, id below any stream id.
    Resuming after it reads the stream; a stream that stored it (written before) is not doubled."""
    from broker.events import QUEUED_EVENT_ID

    adm = await broker.admit(spec(priority=4))
    assert not await broker._redis.exists(broker._keys.events(adm.job_id))
    async with broker.event_hub() as hub:
        [queued] = await hub.backlog(adm.job_id)
        assert (queued.id, queued.type, queued.n, queued.data) == (
            QUEUED_EVENT_ID,
            "queued",
            1,
            {"priority": 4, "model": "m"},
        )
        assert await hub.backlog(adm.job_id, QUEUED_EVENT_ID) == []
        [lease] = await broker.claim("m", "w", 1)
        await broker.complete(lease, "stop", "ok", [1])
        everything = await take(hub, adm.job_id)
        assert [(e.type, e.n) for e in everything] == [("queued", 1), ("started", 2), ("token", 3), ("done", 4)]
        assert await take(hub, adm.job_id, QUEUED_EVENT_ID) == everything[1:]

        # a job admitted by a version that stored its queued event: read once
        old = await broker.admit(spec())
        await broker._redis.xadd(broker._keys.events(old.job_id), {"n": 1, "t": "queued", "d": '{"priority": 5}'})
        assert [e.type for e in await hub.backlog(old.job_id)] == ["queued"]
