"""The worker on the simulated engine, in-process, against real Redis.

Every expected output is computed independently from the simulated engine's
token function, so a lost, repeated or reordered chunk fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from structlog.testing import capture_logs

from broker import Broker, JobSpec, JobStatus
from broker.contract import JobErrorCode
from broker.events import Event, EventHub
from broker.models import Job, Lease
from worker.engine.base import EngineSettings, EngineStats, GenRequest
from worker.engine.simulated import SimulatedEngine, request_key, sim_token_id, sim_token_text
from worker.loop import EXIT_ENGINE_DEAD, EXIT_OK, Worker
from worker.settings import WorkerSettings
from worker.stream import flush_window

MODEL = "m"


class ProbedEngine(SimulatedEngine):
    """Records ``stats()`` at every engine step and when each abort arrived."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self.samples: list[EngineStats] = []
        self.aborts: dict[str, float] = {}

    def _admit(self) -> None:
        super()._admit()
        self.samples.append(self.stats())

    async def abort(self, request_id: str) -> None:
        self.aborts.setdefault(request_id, time.monotonic())
        await super().abort(request_id)


def sim_engine(capacity: int = 8, step_ms: float = 2.0, per_seq_ms: float = 0.0) -> ProbedEngine:
    return ProbedEngine(
        EngineSettings(
            kind="simulated",
            served_model_name=MODEL,
            max_num_seqs=capacity,
            sim_step_ms=step_ms,
            sim_step_ms_per_seq=per_seq_ms,
        )
    )


def worker_settings(**kw: object) -> WorkerSettings:
    base = dict(engine="simulated", flush_interval_ms=20, drain_grace_s=5.0, heartbeat_s=0.2)
    return WorkerSettings(**{**base, **kw})


@dataclass
class Running:
    worker: Worker
    task: asyncio.Task[int]
    started_at: float

    async def stop(self, timeout_s: float = 10.0) -> int:
        self.worker.stop()
        return await asyncio.wait_for(self.task, timeout_s)


@contextlib.asynccontextmanager
async def running(broker: Broker, engine: ProbedEngine, **kw: object) -> AsyncIterator[Running]:
    async with engine:
        started_at = time.monotonic()
        w = Worker(broker, engine, worker_settings(**kw))
        task = asyncio.create_task(w.run())
        await asyncio.wait_for(w.started.wait(), 5)
        r = Running(w, task, started_at)
        try:
            yield r
        finally:
            if not task.done():
                await r.stop()


def spec(i: int, **kw: object) -> JobSpec:
    if i % 2:
        base = dict(kind="completion", prompt=f"prompt number {i}")
    else:
        base = dict(kind="chat", messages=[{"role": "user", "content": f"question {i}"}])
    return JobSpec(**{"tenant": f"t{i % 3}", "model": MODEL, "max_tokens": 30, "priority": i % 10, **base, **kw})


async def admit(broker: Broker, specs: list[JobSpec]) -> list[str]:
    out = await broker.admit_many(specs)
    for a in out:
        if isinstance(a, Exception):
            raise a
    return [a.job_id for a in out]  # type: ignore[union-attr]


def expected(job: Job) -> tuple[str, list[int]]:
    """What one uninterrupted run of the simulated engine produces for ``job``."""
    key = request_key(GenRequest.for_job(job, "x"))
    ids = [sim_token_id(key, i) for i in range(job.max_tokens)]
    return "".join(sim_token_text(t) for t in ids), ids


@dataclass
class Followed:
    events: list[Event] = field(default_factory=list)

    @property
    def tokens(self) -> list[dict]:
        return [e.data for e in self.events if e.type == "token"]

    @property
    def text(self) -> str:
        return "".join(t["text"] for t in self.tokens)

    @property
    def last(self) -> Event:
        return self.events[-1]


async def follow(hub: EventHub, job_id: str, until: str | None = None) -> Followed:
    f = Followed()
    async for ev in hub.follow(job_id):
        f.events.append(ev)
        if until is not None and ev.type == until:
            break
    return f


async def follow_all(broker: Broker, job_ids: list[str], timeout_s: float = 30.0) -> dict[str, Followed]:
    async with broker.event_hub() as hub:
        results = await asyncio.wait_for(asyncio.gather(*(follow(hub, j) for j in job_ids)), timeout_s)
    return dict(zip(job_ids, results, strict=True))


async def check_succeeded(broker: Broker, job_id: str, f: Followed) -> Job:
    job = await broker.get_job(job_id)
    text, ids = expected(job)
    assert f.last.type == "done", f.events[-3:]
    assert job.status is JobStatus.SUCCEEDED
    assert job.output == text and job.output_token_ids == ids
    assert f.text == job.output  # the stream is the output, nothing repeated or missing
    assert [t["seq"] for t in f.tokens] == list(range(1, len(f.tokens) + 1))
    usage = f.last.data["usage"]
    assert usage["completion_tokens"] == len(ids) == job.completion_tokens
    assert job.first_token_ms is not None and job.first_token_ms >= job.started_ms  # type: ignore[operator]
    return job


async def test_jobs_succeed_and_stream(broker: Broker) -> None:
    ids = await admit(broker, [spec(i) for i in range(20)])
    with capture_logs() as logs:
        async with running(broker, sim_engine()) as r:
            followed = await follow_all(broker, ids)
            workers = await broker.workers()
    for jid in ids:
        await check_succeeded(broker, jid, followed[jid])
    # coalescing: 30 tokens per job arrive in fewer chunks than tokens
    assert sum(len(f.tokens) for f in followed.values()) < 20 * 30
    (rec,) = [w for w in workers if w["id"] == r.worker.id]
    assert rec["model"] == MODEL and rec["capacity"] == 8 and rec["max_model_len"] == 2048
    assert {"host", "pid", "running", "waiting", "tokens_per_s"} <= rec.keys()
    assert r.task.result() == EXIT_OK
    assert r.worker.id not in {w["id"] for w in await broker.workers()}  # deregistered
    summaries = [e for e in logs if e["event"] == "job.summary"]
    assert sorted(e["job_id"] for e in summaries) == sorted(ids)
    for e in summaries:
        assert e["outcome"] == "succeeded" and e["tokens"] == 30 and e["attempt"] == 1
        assert {"tenant", "queue_wait_ms", "ttft_ms", "tokens_per_s"} <= e.keys()


async def test_cancel_running_job(broker: Broker) -> None:
    # ~50 tokens/s: a 2000-token job runs for 40 s unless the cancel lands
    engine = sim_engine(capacity=4, step_ms=20)
    ids = await admit(broker, [spec(i, max_tokens=2000 if i == 0 else 40, priority=5) for i in range(4)])
    victim = ids[0]
    async with running(broker, engine, flush_interval_ms=20) as r:
        async with broker.event_hub() as hub:
            await asyncio.wait_for(follow(hub, victim, until="token"), 5)
        await asyncio.wait_for(r.worker.leases.subscribed.wait(), 5)
        async with broker.event_hub() as hub:
            victim_done = asyncio.create_task(follow(hub, victim, until="cancelled"))
            await asyncio.sleep(0)  # let it subscribe before the cancel
            t0 = time.monotonic()
            assert await broker.cancel(victim, "t0") is JobStatus.RUNNING
            await asyncio.wait_for(victim_done, 5)
            t_done = time.monotonic()
        followed = await follow_all(broker, ids, timeout_s=10)
    run_abort = [rid for rid in engine.aborts if rid.startswith(victim)]
    assert run_abort, "the engine never saw the abort"
    abort_s = engine.aborts[run_abort[0]] - t0
    assert abort_s < 1.0
    assert t_done - t0 < 1.0
    job = await broker.get_job(victim)
    assert job.status is JobStatus.CANCELLED and job.finish_reason == "abort"
    assert followed[victim].last.type == "cancelled"
    full, _ = expected(job)
    assert 0 < len(job.output) < len(full) and full.startswith(job.output)
    assert followed[victim].text == job.output
    for jid in ids[1:]:
        await check_succeeded(broker, jid, followed[jid])
    print(f"cancel->engine abort {abort_s * 1000:.1f} ms; cancel->cancelled event {(t_done - t0) * 1000:.1f} ms")


async def test_claim_sizing_and_second_worker(broker: Broker) -> None:
    capacity, margin = 8, 2
    ids = await admit(broker, [spec(i, max_tokens=60, priority=5) for i in range(100)])
    e1, e2 = sim_engine(capacity, step_ms=3), sim_engine(capacity, step_ms=3)
    async with running(broker, e1, waiting_margin=margin) as r1:
        async with broker.event_hub() as hub:  # worker 1 is well into the backlog
            await asyncio.wait_for(asyncio.gather(*(follow(hub, j) for j in ids[:8])), 10)
        before = await broker.queue_stats(MODEL)
        async with running(broker, e2, waiting_margin=margin) as r2:
            await asyncio.wait_for(r2.worker.first_claim.wait(), 2)
            followed = await follow_all(broker, ids)
    second_claim_ms = (r2.worker.first_claim_at - r2.started_at) * 1000  # type: ignore[operator]
    assert before.total_depth > 20  # worker 2 came while there was plenty of backlog
    assert second_claim_ms < 150
    for jid in ids:
        await check_succeeded(broker, jid, followed[jid])
    for eng in (e1, e2):
        assert max(s.running for s in eng.samples) == capacity  # it was full ...
        assert max(s.waiting for s in eng.samples) <= margin  # ... yet kept its own queue short
        assert max(s.running + s.waiting for s in eng.samples) <= capacity + margin
    assert r1.worker.jobs_claimed + r2.worker.jobs_claimed == 100
    assert r2.worker.jobs_claimed >= 10
    print(
        f"second worker first claim {second_claim_ms:.1f} ms after start; "
        f"claims w1={r1.worker.jobs_claimed} w2={r2.worker.jobs_claimed}"
    )


async def test_drain_on_stop_then_resume_elsewhere(broker: Broker) -> None:
    # priority-0 jobs (claimed first) finish inside the grace; the long ones are handed back
    short = [spec(i, max_tokens=20, priority=0) for i in range(2)]
    long = [spec(i, max_tokens=1500, priority=5) for i in range(2, 8)]
    ids = await admit(broker, short + long)
    engine = sim_engine(capacity=4, step_ms=5)
    async with running(broker, engine, drain_grace_s=1.0) as r:
        async with broker.event_hub() as hub:
            await asyncio.wait_for(asyncio.gather(*(follow(hub, j) for j in ids[:2])), 5)
        async with broker.event_hub() as hub:
            # all six long jobs get claimed (4 engine slots + waiting_margin 2); four of them run
            started = {asyncio.ensure_future(follow(hub, j, until="token")): j for j in ids[2:]}
            running_now: list[str] = []
            pending = set(started)
            async with asyncio.timeout(5):
                while len(running_now) < 4:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    running_now += [started[t] for t in done]
            for t in pending:
                t.cancel()
        assert len(r.worker.runs) == 6
        t0 = time.monotonic()
        code = await r.stop()
        stopped_s = time.monotonic() - t0
        jobs = [await broker.get_job(j) for j in ids]
        stats = await broker.queue_stats(MODEL)
        checked_s = time.monotonic() - t0 - stopped_s
    assert code == EXIT_OK
    assert 0.9 < stopped_s < 2.0  # waited the grace, not more
    assert checked_s < 1.0
    assert [j.status for j in jobs[:2]] == [JobStatus.SUCCEEDED] * 2
    assert [j.status for j in jobs[2:]] == [JobStatus.QUEUED] * 6 and {j.attempts for j in jobs[2:]} == {
        0
    }  # a shutdown hand-back spends no attempt
    assert stats.running == 0 and stats.total_depth == 6
    # the four that ran kept their output, for the next attempt to continue after it
    with_output = {j.id for j in jobs[2:] if j.output_token_ids}
    assert len(running_now) == 4 and with_output == set(running_now)
    assert r.worker.id not in {w["id"] for w in await broker.workers()}
    # another worker resumes them: the client's stream never repeats a token
    async with running(broker, sim_engine(capacity=8, step_ms=0.5)):
        followed = await follow_all(broker, ids, timeout_s=30)
    for jid in ids:
        job = await check_succeeded(broker, jid, followed[jid])
        retries = [e.data["reason"] for e in followed[jid].events if e.type == "retry"]
        assert retries == ([] if jid in ids[:2] else ["worker_shutdown"])
        assert job.attempts == 1  # the hand-back did not spend an attempt


async def test_claim_token_budget(broker: Broker) -> None:
    # each job costs prompt_tokens + max_tokens = 40.  The broker always hands out the first job of a
    # claim (big jobs never starve), so a budget of 100 holds 2 jobs plus at most one more: 3, not 6.
    ids = await admit(broker, [spec(i, max_tokens=40, prompt_tokens=0) for i in range(6)])
    engine = sim_engine(capacity=8, step_ms=2)
    async with running(broker, engine, claim_token_budget=100):
        followed = await follow_all(broker, ids)
    for jid in ids:
        await check_succeeded(broker, jid, followed[jid])
    assert max(s.running + s.waiting for s in engine.samples) == 3


async def test_retried_job_resumes_without_repeating(broker: Broker) -> None:
    (jid,) = await admit(broker, [spec(1, max_tokens=400)])
    engine = sim_engine(capacity=2, step_ms=5)
    async with running(broker, engine) as r:
        async with broker.event_hub() as hub:
            # let a few flushes land, then fail the attempt behind the worker's back
            f = Followed()
            async for ev in hub.follow(jid):
                f.events.append(ev)
                if len(f.tokens) >= 3:
                    break
        job = await broker.get_job(jid)
        assert (
            await broker.fail(Lease(job, job.fence), JobErrorCode.WORKER_ERROR, "failed by the test", retry=True)
            == "queued"
        )
        followed = (await follow_all(broker, [jid]))[jid]
    job = await check_succeeded(broker, jid, followed)
    assert job.attempts == 2
    assert [e.data["reason"] for e in followed.events if e.type == "retry"] == ["worker_error"]
    # the first attempt was stopped in the engine once its next write was refused
    final_request = f"{jid}-{job.fence}"
    assert any(rid.startswith(jid) and rid != final_request for rid in engine.aborts)
    assert r.task.result() == EXIT_OK


async def test_urgent_job_preempts_batch_work_which_resumes_after_its_tokens(broker: Broker) -> None:
    """A worker full of batch-priority lines still claims an urgent job and gives it a slot at
    once; the preempted line resumes after its tokens (same output as an uninterrupted run, no
    attempt spent).  Without preemption the urgent job would wait ~300 steps for a line to end."""
    batch = await admit(broker, [spec(2 * i + 1, max_tokens=300, priority=9, tenant="b") for i in range(3)])
    engine = sim_engine(capacity=2, step_ms=10)
    async with running(broker, engine, waiting_margin=0) as r:
        async with broker.event_hub() as hub:  # both slots generate batch lines
            await asyncio.wait_for(asyncio.gather(*(follow(hub, j, until="token") for j in batch[:2])), 10)
        with capture_logs() as logs:
            (urgent,) = await admit(broker, [spec(3, max_tokens=5, priority=4, tenant="i")])
            followed = await follow_all(broker, [urgent, *batch], timeout_s=60)
    jobs = {j: await check_succeeded(broker, j, followed[j]) for j in [urgent, *batch]}
    assert r.task.result() == EXIT_OK
    first_batch_end = min(jobs[j].finished_ms for j in batch)  # type: ignore[type-var]
    assert jobs[urgent].finished_ms < first_batch_end  # type: ignore[operator]
    preempted = [e for e in logs if e["event"] == "job.preempted"]
    assert [e["by"] for e in preempted] == [urgent]
    victim = preempted[0]["job_id"]
    assert victim in batch[:2]
    assert jobs[victim].attempts == 1  # same attempt, same lease: resumed, not retried
    assert f"{victim}-{jobs[victim].fence}" in engine.aborts  # its first segment was aborted in the engine
    assert r.worker.metrics.preemptions.labels(MODEL)._value.get() == 1


async def test_engine_death_hands_back_all_jobs(broker: Broker) -> None:
    ids = await admit(broker, [spec(i, max_tokens=4000, priority=5) for i in range(5)])
    engine = sim_engine(capacity=4, step_ms=5)
    async with running(broker, engine) as r:
        async with broker.event_hub() as hub:
            await asyncio.wait_for(asyncio.gather(*(follow(hub, j, until="token") for j in ids[:4])), 5)
        engine.kill(RuntimeError("simulated crash"))
        code = await asyncio.wait_for(r.task, 5)
        jobs = [await broker.get_job(j) for j in ids]
    assert code == EXIT_ENGINE_DEAD
    assert all(j.status is JobStatus.QUEUED for j in jobs)
    assert [j.attempts for j in jobs] == [1] * 5  # 4 running + 1 waiting in the engine
    async with broker.event_hub() as hub:
        reasons = [e.data.get("reason") for j in ids for e in await hub.backlog(j) if e.type == "retry"]
    assert reasons == ["engine_dead"] * 5
    assert (await broker.queue_stats(MODEL)).running == 0


async def test_invalid_request_fails_without_retry(broker: Broker) -> None:
    engine = ProbedEngine(EngineSettings(kind="simulated", served_model_name=MODEL, max_model_len=32, sim_step_ms=1))
    (jid,) = await admit(broker, [JobSpec(tenant="t", model=MODEL, kind="completion", prompt="w " * 40, max_tokens=5)])
    async with running(broker, engine):
        followed = (await follow_all(broker, [jid]))[jid]
    job = await broker.get_job(jid)
    assert followed.last.type == "failed" and job.status is JobStatus.FAILED
    assert job.error and job.error["code"] == "context_length_exceeded" and job.attempts == 1


def test_worker_never_imports_fastapi_or_vllm_eagerly() -> None:
    import subprocess
    import sys

    code = (
        "import sys, worker.loop, worker.main, worker.cli; "
        "bad = [m for m in ('fastapi', 'starlette', 'vllm') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_flush_window_widens_with_the_writes_of_a_cycle_within_its_bounds() -> None:
    assert flush_window(4, 0.02, 0.1, 2000) == 0.02  # few streams: the base window
    assert abs(flush_window(128, 0.02, 0.1, 2000) - 0.064) < 1e-9  # ~2,000 writes/s
    assert flush_window(1000, 0.02, 0.1, 2000) == 0.1  # never wider than the bound
    assert flush_window(1000, 0.02, 0.1, 0) == 0.02  # 0: a fixed window
    assert flush_window(1000, 0.02, 0.01, 2000) == 0.02  # a bound under the base is the base


async def _delta_rates(broker: Broker, **kw: object) -> list[float]:
    """32 jobs of 120 tokens streamed at once (5 ms steps); each job's token events per second
    of its generation, after checking its stream is its whole output."""
    ids = await admit(broker, [spec(i, max_tokens=120, priority=5) for i in range(32)])
    async with running(broker, sim_engine(capacity=32, step_ms=5.0), flush_interval_ms=5, **kw):
        followed = await follow_all(broker, ids, timeout_s=60)
    rates = []
    for jid in ids:
        job = await check_succeeded(broker, jid, followed[jid])
        assert job.finished_ms is not None and job.first_token_ms is not None
        span_s = max(0.001, (job.finished_ms - job.first_token_ms) / 1000)
        rates.append(len(followed[jid].tokens) / span_s)
    return rates


async def test_a_loaded_worker_writes_fewer_larger_deltas_and_every_token(broker: Broker) -> None:
    # 32 streams at 320 writes/s: a 100 ms window (the bound) instead of 5 ms
    widened = sorted(await _delta_rates(broker, flush_writes_per_s=320, flush_max_interval_ms=100))
    fixed = sorted(await _delta_rates(broker, flush_writes_per_s=0))
    median_w, median_f = widened[len(widened) // 2], fixed[len(fixed) // 2]
    assert median_w <= 16, widened  # ~10 deltas/s (+ the first token, the last on the completion)
    assert median_f >= 2 * median_w, (fixed, widened)
