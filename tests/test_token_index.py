"""Token events are published, not stored: the job's token index and output rebuild them.

Every check compares what a live follower received with what a resume from each event id
reads back (``EventHub.backlog``): the same events, ids and counts, nothing lost or twice.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from broker import Broker, JobSpec
from broker.client import OutputWrite
from broker.contract import JobErrorCode, TokenLogprob, logprobs_fragment
from broker.events import Event, EventHub
from broker.models import Lease

pytestmark = pytest.mark.asyncio


async def started(broker: Broker, **kw: object) -> Lease:
    await broker.admit(JobSpec(tenant="t", model="m", kind="completion", prompt="p", max_tokens=64, **kw))
    [lease] = await broker.claim("m", "w", 1)
    return lease


async def write(broker: Broker, lease: Lease, text: str, ids: list[int], logprobs: str = "") -> None:
    done = await broker.append_many([OutputWrite(lease.id, lease.fence, text, ids, logprobs=logprobs)])
    assert done == {lease.id: True}


@contextlib.asynccontextmanager
async def live(hub: EventHub, job_id: str):  # type: ignore[no-untyped-def]
    """Follow the job from its start while the body runs; the events it got, up to the terminal one."""
    got: list[Event] = []
    first = asyncio.Event()

    async def follow() -> None:
        async for ev in hub.follow(job_id):
            got.append(ev)
            first.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(first.wait(), 5)
    try:
        yield got
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()


async def check_every_resume(hub: EventHub, job_id: str, got: list[Event]) -> None:
    full = await hub.backlog(job_id)
    assert full == got  # rebuilt as they were published: ids, data, counts
    assert [e.n for e in full] == list(range(1, len(full) + 1))
    ids = [e.id for e in full]
    assert len(set(ids)) == len(ids)
    for i, ev in enumerate(full):
        assert await hub.backlog(job_id, ev.id) == full[i + 1 :], ev.id


async def test_a_retried_job_resumes_from_every_event(broker: Broker) -> None:
    lease = await started(broker)
    async with broker.event_hub(resync_s=30) as hub, live(hub, lease.id) as got:
        await write(broker, lease, "héllo ", [1, 2])
        await write(broker, lease, "", [3])  # a token with no text of its own
        await write(broker, lease, "wörld 🌍", [4])
        await broker.fail(lease, JobErrorCode.WORKER_ERROR, "boom", retry=True)
        [lease] = await broker.claim("m", "w", 1)
        await write(broker, lease, " again", [5])
        await broker.complete(lease, "stop", " end", [6])
    types = [e.type for e in got]
    assert types == ["queued", "started", "token", "token", "token", "retry", "started", "token", "token", "done"]
    assert [e.data["seq"] for e in got if e.type == "token"] == [1, 2, 3, 4, 5]
    assert [e.data["n"] for e in got if e.type == "token"] == [2, 1, 1, 1, 1]
    assert "".join(e.data["text"] for e in got if e.type == "token") == "héllo wörld 🌍 again end"
    await check_every_resume(hub, lease.id, got)
    # the stream holds the stored events only; the index one record per token event
    k = broker._keys
    assert await broker._redis.xlen(k.events(lease.id)) == 4  # started, retry, started, done
    assert await broker._redis.strlen(k.token_index(lease.id)) == 5 * 16
    assert 0 < await broker._redis.pttl(k.token_index(lease.id)) <= 86_400_000


async def test_token_events_with_logprobs_are_stored(broker: Broker) -> None:
    lease = await started(broker, sampling={"logprobs": 0})
    lp = logprobs_fragment([TokenLogprob("a", -0.5)])
    async with broker.event_hub(resync_s=30) as hub, live(hub, lease.id) as got:
        await write(broker, lease, "a", [1], lp)
        await write(broker, lease, "b", [2])  # one without: indexed between stored ones
        await write(broker, lease, "c", [3], lp)
        await broker.complete(lease, "stop")
    assert [e.data.get("logprobs") is not None for e in got if e.type == "token"] == [True, False, True]
    await check_every_resume(hub, lease.id, got)
    assert await broker._redis.xlen(broker._keys.events(lease.id)) == 4  # started, a, c, done
    assert len(await broker.logprobs(lease.id)) == 2


async def test_a_job_started_before_token_indexes_keeps_storing_them(broker: Broker) -> None:
    lease = await started(broker)
    await broker._redis.hdel(broker._keys.job(lease.id), "lev")  # as an earlier claim left it
    async with broker.event_hub(resync_s=30) as hub, live(hub, lease.id) as got:
        await write(broker, lease, "x", [1])
        await broker.complete(lease, "stop", "y", [2])
    assert [e.data["text"] for e in got if e.type == "token"] == ["x", "y"]
    await check_every_resume(hub, lease.id, got)
    assert await broker._redis.xlen(broker._keys.events(lease.id)) == 4
    assert not await broker._redis.exists(broker._keys.token_index(lease.id))


async def test_a_follower_that_missed_deltas_rebuilds_them(broker: Broker) -> None:
    """Many deltas published while nobody listens: a resume from a token event in the middle
    reads exactly the rest."""
    lease = await started(broker)
    for i in range(40):
        await write(broker, lease, f"w{i} ", [i])
    await broker.complete(lease, "length")
    async with broker.event_hub() as hub:
        full = await hub.backlog(lease.id)
        assert [e.data["text"] for e in full if e.type == "token"] == [f"w{i} " for i in range(40)]
        middle = full[20]
        assert middle.type == "token" and middle.id.count("-") == 2
        rest: list[Event] = []
        async for ev in hub.follow(lease.id, middle.id):
            rest.append(ev)
        assert rest == full[21:]
