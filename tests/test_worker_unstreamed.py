"""Jobs nobody streams (``JobSpec.stream`` false): output written once, with the completion.

The worker runs in-process on the simulated engine against real Redis (the helpers of
test_worker_sim); every expected output is computed from the engine's token function.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from structlog.testing import capture_logs
from test_worker_sim import (
    MODEL,
    Followed,
    ProbedEngine,
    admit,
    check_succeeded,
    expected,
    follow,
    follow_all,
    running,
    sim_engine,
    spec,
)

from broker import Broker, JobStatus
from broker.contract import JobErrorCode
from broker.errors import StaleLease
from broker.models import Lease
from worker.engine.base import EngineSettings
from worker.engine.simulated import sim_logprobs

NO_CHECKPOINT = 3_600_000  # ms: longer than any test


class CountingEngine(ProbedEngine):
    """Sets ``reached`` once a sequence has generated ``after`` tokens in this engine."""

    def __init__(self, settings: EngineSettings, after: int) -> None:
        super().__init__(settings)
        self.after = after
        self.reached = asyncio.Event()

    def _advance(self, seq, n: int) -> None:  # type: ignore[no-untyped-def]
        super()._advance(seq, n)
        if seq.position - len(seq.req.resume_token_ids) >= self.after:
            self.reached.set()


def counting_engine(after: int, step_ms: float = 5.0) -> CountingEngine:
    es = EngineSettings(kind="simulated", served_model_name=MODEL, max_num_seqs=4, sim_step_ms=step_ms)
    return CountingEngine(es, after)


def tokens_before_done(f: Followed) -> list[str]:
    """Event types from the last ``started`` on (the attempt that finished)."""
    types = [e.type for e in f.events]
    last_start = len(types) - 1 - types[::-1].index("started")
    return types[last_start:]


async def test_unstreamed_jobs_write_once_at_completion(broker: Broker) -> None:
    unstreamed = [spec(i, stream=False) for i in range(6)]
    with_logprobs = spec(7, stream=False, sampling={"logprobs": 2})
    streamed = [spec(i, max_tokens=60) for i in range(8, 10)]
    ids = await admit(broker, [*unstreamed, with_logprobs, *streamed])
    async with running(broker, sim_engine(step_ms=5), checkpoint_interval_ms=NO_CHECKPOINT):
        followed = await follow_all(broker, ids)
    for jid in ids[:7]:
        job = await check_succeeded(broker, jid, followed[jid])
        assert job.request.stream is False
        # nothing between started and the completion but the completion's own single delta
        assert tokens_before_done(followed[jid]) == ["started", "token", "done"]
        assert followed[jid].tokens[0]["n"] == job.max_tokens
    logprobs = await broker.logprobs(ids[6])
    job = await broker.get_job(ids[6])
    assert logprobs == [sim_logprobs(t, 2) for t in expected(job)[1]]
    for jid in ids[7:]:  # streamed jobs next to them still get a delta every flush
        await check_succeeded(broker, jid, followed[jid])
        assert len(followed[jid].tokens) > 3


async def test_stream_flag_is_not_part_of_the_idempotency_fingerprint(broker: Broker) -> None:
    first = await broker.admit(spec(1, idempotency_key="k1", stream=False))
    again = await broker.admit(spec(1, idempotency_key="k1"))
    assert again.duplicate and again.job_id == first.job_id
    assert (await broker.get_job(first.job_id)).request.stream is False


async def test_lost_lease_mid_generation_writes_nothing_and_the_retry_is_exact(broker: Broker) -> None:
    (jid,) = await admit(broker, [spec(1, max_tokens=400, stream=False)])
    engine = counting_engine(after=50)
    with capture_logs() as logs:
        async with running(broker, engine, checkpoint_interval_ms=NO_CHECKPOINT):
            await asyncio.wait_for(engine.reached.wait(), 10)
            first = await broker.get_job(jid)
            assert first.output == "" and first.completion_tokens == 0  # 50+ tokens made, none written
            # the lease goes to someone else behind the worker's back
            went = await broker.fail(Lease(first, first.fence), JobErrorCode.WORKER_ERROR, "by the test", retry=True)
            assert went == "queued"
            followed = (await follow_all(broker, [jid]))[jid]
    job = await check_succeeded(broker, jid, followed)
    assert job.attempts == 2 and job.fence > first.fence
    assert [e.type for e in followed.events] == ["queued", "started", "retry", "started", "token", "done"]
    assert followed.tokens[0]["n"] == 400
    assert any(rid == f"{jid}-{first.fence}" for rid in engine.aborts)  # the stale attempt was stopped
    outcomes = [e["outcome"] for e in logs if e["event"] == "job.summary"]
    assert sorted(outcomes) == ["lost_lease", "succeeded"]


async def test_checkpoints_let_a_retry_resume(broker: Broker) -> None:
    (jid,) = await admit(broker, [spec(1, max_tokens=400, stream=False)])
    t0 = time.monotonic()
    with capture_logs() as logs:
        async with running(broker, sim_engine(capacity=2, step_ms=5), checkpoint_interval_ms=300):
            async with broker.event_hub() as hub:
                await asyncio.wait_for(follow(hub, jid, until="token"), 10)  # the first checkpoint
            first = await broker.get_job(jid)
            assert 0 < first.completion_tokens < 400
            went = await broker.fail(Lease(first, first.fence), JobErrorCode.WORKER_ERROR, "by the test", retry=True)
            assert went == "queued"
            followed = (await follow_all(broker, [jid]))[jid]
            elapsed_s = time.monotonic() - t0
    job = await check_succeeded(broker, jid, followed)  # checkpoint + resumed rest = one uninterrupted run
    assert job.attempts == 2
    # a delta per 300 ms checkpoint (and the completion's), not one per 20 ms flush
    assert 2 <= len(followed.tokens) <= math.ceil(elapsed_s / 0.3) + 2
    resumed = [e["resumed_tokens"] for e in logs if e["event"] == "job.summary" and e["outcome"] == "succeeded"]
    assert resumed and resumed[0] >= first.completion_tokens


async def test_stale_completion_of_an_unstreamed_job_writes_nothing(broker: Broker) -> None:
    short = Broker(broker._redis, broker.settings.model_copy(update={"max_attempts": 3}))
    (jid,) = await admit(short, [spec(1, max_tokens=8, stream=False)])
    [old] = await short.claim(MODEL, "w-old", 1)
    assert await short.fail(old, JobErrorCode.WORKER_LOST, "lease expired", retry=True) == "queued"
    [new] = await short.claim(MODEL, "w-new", 1)
    text, ids = expected(new.job)
    with pytest.raises(StaleLease):
        await short.complete(old, "length", text, ids)
    job = await short.get_job(jid)
    assert (job.status, job.output, job.completion_tokens) == (JobStatus.RUNNING, "", 0)
    await short.complete(new, "length", text, ids, offset=0)
    with pytest.raises(StaleLease):  # finished: nothing more is written, not even by the lease's holder
        await short.complete(new, "length", text, ids, offset=0)
    job = await short.get_job(jid)
    assert (job.status, job.output, job.output_token_ids) == (JobStatus.SUCCEEDED, text, ids)
    events = await short.event_hub().backlog(jid)
    assert [e.type for e in events][-2:] == ["token", "done"]
    assert [e.data["text"] for e in events if e.type == "token"] == [text]


async def test_a_hand_back_writes_the_buffered_output_and_the_next_worker_resumes(broker: Broker) -> None:
    ids = await admit(broker, [spec(i, max_tokens=1500, stream=False) for i in range(2)])
    engine = counting_engine(after=30)
    async with running(broker, engine, drain_grace_s=0.0, checkpoint_interval_ms=NO_CHECKPOINT) as r:
        await asyncio.wait_for(engine.reached.wait(), 10)
        assert [(await broker.get_job(j)).completion_tokens for j in ids] == [0, 0]
        await r.stop()
    jobs = [await broker.get_job(j) for j in ids]
    assert [j.status for j in jobs] == [JobStatus.QUEUED] * 2
    assert all(j.output_token_ids == expected(j)[1][: len(j.output_token_ids)] for j in jobs)
    assert max(len(j.output_token_ids) for j in jobs) >= 30  # what was made is kept for the next attempt
    async with running(broker, sim_engine(step_ms=0.5), checkpoint_interval_ms=NO_CHECKPOINT):
        followed = await follow_all(broker, ids)
    for jid, before in zip(ids, jobs, strict=True):
        await check_succeeded(broker, jid, followed[jid])  # the handed-back part + the rest, nothing twice
        tokens = [t["n"] for t in followed[jid].tokens]
        assert tokens == (
            [len(before.output_token_ids), 1500 - len(before.output_token_ids)] if before.output_token_ids else [1500]
        )
