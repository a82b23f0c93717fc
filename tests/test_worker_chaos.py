"""Chaos: worker processes killed with SIGKILL mid-stream lose no job and no chunk.

Two worker processes (simulated engine) serve a 500-job backlog; one of them
is killed with ``kill -9`` ten times while it holds running jobs and restarted
each time.  Leases are 1 s, so a dead worker's jobs come back quickly through
the survivor's reaper and resume after the tokens already streamed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from broker import Broker, BrokerSettings, JobSpec, JobStatus
from broker.events import Event
from broker.models import Job
from worker.engine.base import GenRequest
from worker.engine.simulated import request_key, sim_token_id, sim_token_text

MODEL = "m"
JOBS = 500
KILLS = 10
LEASE_MS = 1000
REAP_MS = 250
SLACK_MS = 750  # scheduling jitter on a shared 2-core machine

pytestmark = pytest.mark.timeout(120)


def expected(job: Job) -> tuple[str, list[int]]:
    key = request_key(GenRequest.for_job(job, "x"))
    ids = [sim_token_id(key, i) for i in range(job.max_tokens)]
    return "".join(sim_token_text(t) for t in ids), ids


class WorkerProc:
    """One ``python -m worker.main`` process on the simulated engine."""

    def __init__(self, settings: BrokerSettings, logs: Path, name: str) -> None:
        self.settings, self.logs, self.name = settings, logs, name
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, worker_id: str) -> None:
        env = {
            **os.environ,
            "GENQ_REDIS_URL": self.settings.redis_url,
            "GENQ_QUEUE": self.settings.queue,
            "GENQ_LEASE_MS": str(LEASE_MS),
            "GENQ_REAP_INTERVAL_MS": str(REAP_MS),
        }
        log = open(self.logs / f"{worker_id}.log", "wb")  # noqa: ASYNC230
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.main",
            "--engine",
            "simulated",
            "--served-model-name",
            MODEL,
            "--max-num-seqs",
            "16",
            "--sim-step-ms",
            "10",
            "--sim-step-ms-per-seq",
            "0.5",
            "--heartbeat-s",
            "0.1",
            "--worker-id",
            worker_id,
            "--json-logs",
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)


async def holds_jobs(broker: Broker, worker_id: str, timeout_s: float = 15.0) -> None:
    """Until the worker's heartbeat shows it running jobs (no event exists for that: poll)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = {w["id"]: w for w in await broker.workers()}.get(worker_id)
        if rec and rec["running"] > 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{worker_id} never ran a job")


def event_ms(ev: Event) -> int:
    return int(ev.id.split("-")[0])


async def test_kill_9_loses_nothing(settings: BrokerSettings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"max_attempts": 50, "lease_ms": LEASE_MS})
    rng = random.Random(7)
    async with Broker.from_settings(settings) as broker:
        await broker.register_model(MODEL, 4096)
        specs = []
        for i in range(JOBS):
            body = (
                {"kind": "completion", "prompt": f"chaos prompt {i}"}
                if i % 2
                else {"kind": "chat", "messages": [{"role": "user", "content": f"chaos {i}"}]}
            )
            specs.append(
                JobSpec(
                    tenant=f"t{i % 4}",
                    model=MODEL,
                    priority=rng.choice([2, 5, 5, 9]),
                    max_tokens=rng.randint(20, 80),
                    **body,
                )
            )
        ids = [a.job_id for a in await broker.admit_many(specs)]  # type: ignore[union-attr]
        survivor = WorkerProc(settings, tmp_path, "survivor")
        victim = WorkerProc(settings, tmp_path, "victim")
        await survivor.start("survivor")
        kills: list[int] = []
        t_start = time.monotonic()
        try:
            for k in range(KILLS):
                await victim.start(f"victim-{k}")
                await holds_jobs(broker, f"victim-{k}")
                await asyncio.sleep(rng.uniform(0.05, 0.4))  # land the kill at a random point mid-stream
                kills.append(int(time.time() * 1000))
                victim.kill()
                assert await victim.proc.wait() == -signal.SIGKILL  # type: ignore[union-attr]
            await victim.start(f"victim-{KILLS}")
            async with broker.event_hub() as hub:

                async def terminal(jid: str) -> None:
                    async for _ in hub.follow(jid):
                        pass

                await asyncio.wait_for(asyncio.gather(*(terminal(j) for j in ids)), 60)
                backlogs = {j: await hub.backlog(j) for j in ids}
            elapsed = time.monotonic() - t_start
            assert await survivor.stop() == 0
            assert await victim.stop() == 0
        finally:
            for w in (survivor, victim):
                if w.proc and w.proc.returncode is None:
                    w.proc.kill()
                    await w.proc.wait()

        lost_retries = 0
        worst_requeue_ms = 0
        for jid in ids:
            job = await broker.get_job(jid)
            events = backlogs[jid]
            assert job.status is JobStatus.SUCCEEDED, (jid, job.status, job.error)
            text, token_ids = expected(job)
            assert job.output == text and job.output_token_ids == token_ids
            tokens = [e.data for e in events if e.type == "token"]
            assert "".join(t["text"] for t in tokens) == job.output  # nothing repeated, nothing missing
            assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1))
            assert sum(t["n"] for t in tokens) == len(token_ids) == job.completion_tokens
            assert [e.type for e in events].count("done") == 1 and events[-1].type == "done"
            for i, ev in enumerate(events):
                if ev.type == "retry":
                    assert ev.data["reason"] == "worker_lost", ev.data
                    lost_retries += 1
                    # requeued within lease + reap after the kill that lost it
                    kill = max(t for t in kills if t <= event_ms(ev) + 5)
                    worst_requeue_ms = max(worst_requeue_ms, event_ms(ev) - kill)
                    assert event_ms(ev) - kill <= LEASE_MS + REAP_MS + SLACK_MS
                    # and started again promptly: a requeued job keeps its place at the front
                    nxt = next(e for e in events[i + 1 :] if e.type == "started")
                    assert event_ms(nxt) - event_ms(ev) <= 3000
        assert lost_retries >= KILLS  # every kill hit running jobs
        print(
            f"{JOBS} jobs, {KILLS} kills, {lost_retries} jobs requeued after a kill, "
            f"worst kill->requeue {worst_requeue_ms} ms, run {elapsed:.1f} s"
        )
