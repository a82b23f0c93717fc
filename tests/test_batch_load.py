"""Batches under load on the simulated engine, with real worker processes.

- A worker killed with SIGKILL in the middle of a 1,000-line batch: the batch completes with
  every line exactly once, and the job records prove no line ran twice to completion.
- Live traffic first: interactive jobs submitted while a 2,000-line batch keeps the worker
  full wait (submit -> start) no longer than a slot takes to free plus one claim cycle.

Workers are ``python -m worker.main --engine simulated`` subprocesses (as in
test_worker_chaos.py); the batcher is the real arq batcher in the stack's loop thread.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from test_api_openai import expected
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)
from test_batches import Batcher, chat_line, client, finished, jsonl, lines_of, upload, wait_for

from broker import Broker
from broker.events import Event
from broker.models import Job, JobStatus

ROOT = Path(__file__).resolve().parent.parent
MODEL = "m"
LEASE_MS = 1000
REAP_MS = 250

pytestmark = pytest.mark.timeout(120)


class WorkerProc:
    """One ``python -m worker.main`` process on the simulated engine; its JSON log in a file."""

    def __init__(self, stack: Stack, logs: Path, worker_id: str, **flags: Any) -> None:
        self.id, self.log_path = worker_id, logs / f"{worker_id}.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "GENQ_REDIS_URL": stack.settings.redis_url,
            "GENQ_QUEUE": stack.settings.queue,
            "GENQ_LEASE_MS": str(LEASE_MS),
            "GENQ_REAP_INTERVAL_MS": str(REAP_MS),
        }
        args = [sys.executable, "-m", "worker.main", "--engine", "simulated", "--served-model-name", MODEL]
        for k, v in {"heartbeat_s": 0.1, **flags}.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        args += ["--worker-id", worker_id, "--json-logs"]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode

    def summaries(self) -> list[dict[str, Any]]:
        """The worker's ``job.summary`` log lines (one per attempt it concluded)."""
        rows = []
        for raw in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut by kill -9
            if rec.get("event") == "job.summary":
                rows.append(rec)
        return rows


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    made: list[WorkerProc] = []
    yield made
    for w in made:
        w.stop()


def heartbeat(stack: Stack, worker_id: str) -> dict[str, Any] | None:
    return {w["id"]: w for w in stack.call(lambda b: b.workers())}.get(worker_id)


def start_workers(stack: Stack, made: list[WorkerProc], logs: Path, ids: list[str], **flags: Any) -> None:
    made += [WorkerProc(stack, logs, wid, **flags) for wid in ids]
    for w in made:  # registered (model and heartbeat) before a batch is validated against the models
        wait_for(lambda w=w: heartbeat(stack, w.id) or w.proc.poll() is not None, 30, f"worker {w.id} to start")
        assert w.proc.poll() is None, w.log_path.read_text()[-2000:]


def all_jobs(stack: Stack, tenant: str) -> list[Job]:
    async def page_all(b: Broker) -> list[Job]:
        jobs: list[Job] = []
        after = None
        while True:
            page = await b.job_page(tenant, None, 1000, after)
            jobs += page.jobs
            if not page.has_more:
                return jobs
            after = page.next_after

    return stack.call(page_all)


def backlogs(stack: Stack, ids: list[str]) -> dict[str, list[Event]]:
    async def read(b: Broker) -> dict[str, list[Event]]:
        async with b.event_hub() as hub:
            return {j: await hub.backlog(j) for j in ids}

    async def go() -> dict[str, list[Event]]:
        async with Broker.from_settings(stack.settings) as b:
            return await read(b)

    return stack.portal.run(go(), 60)


# -- a worker killed mid-batch ------------------------------------------------------------------
LINES = 1000
TOKENS = 30  # ~120 ms a line at 4 ms steps: a heartbeat finds the victim with lines running


def test_worker_killed_mid_batch_runs_each_line_once(
    make_stack,  # noqa: F811
    workers: list[WorkerProc],
    tmp_path: Path,
) -> None:
    stack = make_stack(worker=False, files_url=str(tmp_path / "files"))
    flags = {"max_num_seqs": 16, "sim_step_ms": 4}
    start_workers(stack, workers, tmp_path, ["survivor", "victim"], **flags)
    survivor, victim = workers
    batcher = Batcher(stack)  # 64 lines in flight: both workers full, a backlog queued
    try:
        c = client(stack, stack.key("acme"))
        rows = [chat_line(i, TOKENS) for i in range(LINES)]
        b = c.batches.create(
            input_file_id=upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h"
        )
        # Kill once the batch is well under way and the victim's heartbeat says it runs lines.
        wait_for(lambda: c.batches.retrieve(b.id).request_counts.completed >= 150, 60, "150 lines done")
        wait_for(lambda: (heartbeat(stack, victim.id) or {}).get("running", 0) > 0, 30, "the victim running lines")
        victim.proc.send_signal(signal.SIGKILL)
        assert victim.proc.wait(10) == -signal.SIGKILL
        at_kill = c.batches.retrieve(b.id).request_counts.completed
        assert at_kill < LINES
        done = finished(c, b.id, timeout_s=90)
    finally:
        batcher.stop()
    assert survivor.stop() == 0

    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (LINES, 0)
    out = lines_of(c, done.output_file_id)
    ids = [x["custom_id"] for x in out]
    assert len(out) == LINES and len(set(ids)) == LINES and set(ids) == {r["custom_id"] for r in rows}
    for x in out:  # each line's answer is the one the engine gives it, not a spliced or repeated one
        i = int(x["custom_id"].split("-")[1])
        body = x["response"]["body"]
        assert body["choices"][0]["message"]["content"] == expected(TOKENS, messages=rows[i]["body"]["messages"])[0]
        assert body["usage"]["completion_tokens"] == TOKENS

    jobs = all_jobs(stack, "acme")
    assert len(jobs) == LINES and all(j.status is JobStatus.SUCCEEDED for j in jobs)
    assert {x["response"]["request_id"] for x in out} == {j.id for j in jobs}
    events = backlogs(stack, [j.id for j in jobs])
    # No line ran twice to completion, from the broker's record of every attempt: one `done`
    # (the fenced completion) per job, as its last event; each token written once (seq 1..n,
    # n tokens in all); one `started` per attempt, and a second attempt only after the broker
    # took the job back from the killed worker (`retry` worker_lost).
    retried = 0
    for j in jobs:
        evs = events[j.id]
        types = [e.type for e in evs]
        assert types.count("done") == 1 and types[-1] == "done", (j.id, types)
        tokens = [e.data for e in evs if e.type == "token"]
        assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1)), (j.id, tokens)
        assert sum(t["n"] for t in tokens) == TOKENS == j.completion_tokens
        starts = [e.data for e in evs if e.type == "started"]
        assert len(starts) == j.attempts and [s["attempt"] for s in starts] == list(range(1, j.attempts + 1))
        retries = [e.data for e in evs if e.type == "retry"]
        assert len(retries) == j.attempts - 1
        assert all(r["reason"] == "worker_lost" for r in retries), retries
        assert all(s["worker"] == victim.id for s in starts[:-1])  # only the victim lost attempts
        retried += bool(retries)
    assert retried >= 1, "the kill hit no running line: the test proved nothing"
    # And from the workers' own logs: no job concluded `succeeded` twice (a killed worker's last
    # lines may be missing from its log, never doubled).
    succeeded = collections.Counter(
        s["job_id"] for w in (survivor, victim) for s in w.summaries() if s["outcome"] == "succeeded"
    )
    assert succeeded and max(succeeded.values()) == 1
    assert set(succeeded) <= {j.id for j in jobs}
    assert any(s["outcome"] == "succeeded" for s in victim.summaries())  # the victim did real work first


# -- live traffic first ------------------------------------------------------------------------
LIVE_LINES = 2000
LINE_TOKENS = 5
SLOTS = 16  # the worker's engine slots (max_num_seqs)
STEP_MS = 40.0  # simulated step time (sim_step_ms; sim_step_ms_per_seq is 0)
FLUSH_MS = 20  # the worker's flush_interval_ms
MARGIN = 2  # the worker's waiting_margin
# Redis round trips of a claim cycle (the freed line's completion write, then the claim) and
# scheduling on a shared 2-core machine.
ROUND_TRIPS_MS = 30.0
SAMPLES = 40


def submit_and_follow(http: httpx.Client, key: str, i: int) -> dict[str, Any]:
    """One interactive job, followed over SSE to its end; its record (timings) after."""
    r = http.post("/v1/jobs", json={"model": MODEL, "prompt": f"live {i}", "max_tokens": 2}, headers=auth(key))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events", headers=auth(key)) as events:
        for ev in events.iter_sse():
            if ev.event in ("done", "failed", "cancelled", "expired"):
                assert ev.event == "done", ev.data
                break
    return http.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()


def test_live_jobs_wait_at_most_one_running_sequence_behind_a_batch(
    make_stack,  # noqa: F811
    workers: list[WorkerProc],
    tmp_path: Path,
) -> None:
    stack = make_stack(worker=False, files_url=str(tmp_path / "files"))
    flags = {
        "max_num_seqs": SLOTS,
        "sim_step_ms": STEP_MS,
        "sim_step_ms_per_seq": 0,
        "flush_interval_ms": FLUSH_MS,
        "waiting_margin": MARGIN,
    }
    start_workers(stack, workers, tmp_path, ["busy"], **flags)
    # The bound. The worker holds SLOTS + MARGIN jobs, all batch lines, and claims again only when
    # one ends. An interactive job submitted at t is ahead of every queued batch line (priority 5
    # against 9), so it is claimed (started) by the first claim after a slot frees: the first of
    # the running lines to finish does so within one running sequence's time (LINE_TOKENS steps
    # of STEP_MS), its completion is written within one flush window, and the claim follows
    # (one claim cycle: FLUSH_MS + ROUND_TRIPS_MS). Were batch lines served first-come (or at the
    # same priority: tried, the batch then finished before the samples did), the job would wait
    # behind the whole queued backlog.
    sequence_ms = LINE_TOKENS * STEP_MS
    claim_cycle_ms = FLUSH_MS + ROUND_TRIPS_MS
    bound_ms = sequence_ms + claim_cycle_ms
    # Many lines in flight, so a queued backlog of batch lines stays in Redis throughout.
    batcher = Batcher(stack, batch_max_in_flight=256)
    try:
        c = client(stack, stack.key("acme"))
        # The batch's own tenant: no fairness between tenants to help, only the priority.
        live_key = stack.key("acme")
        rows = [chat_line(i, LINE_TOKENS) for i in range(LIVE_LINES)]
        b = c.batches.create(
            input_file_id=upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_for(
            lambda: (heartbeat(stack, "busy") or {}).get("running", 0) == SLOTS, 30, "the batch filling the worker"
        )
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            live = [submit_and_follow(http, live_key, i) for i in range(SAMPLES)]
        during = c.batches.retrieve(b.id)
        assert during.status == "in_progress" and during.request_counts.completed < LIVE_LINES
        done = finished(c, b.id, timeout_s=90)
    finally:
        batcher.stop()
    assert done.status == "completed" and done.request_counts.completed == LIVE_LINES, done

    waits = sorted(j["timings"]["queue_wait_ms"] for j in live)
    p99 = waits[max(0, -(-99 * len(waits) // 100) - 1)]  # nearest rank
    # The batch really held the worker while the interactive jobs came, from the batch lines' own
    # timings: when each interactive job was submitted, batch lines were queued (it had to get
    # ahead of them), and for most of them the worker held a full engine's worth of batch lines
    # (claimed, not finished; right after several lines end at the same step it briefly holds
    # fewer, and a job arriving then is claimed at once).
    live_ids = {j["id"] for j in live}
    batch = [x for x in all_jobs(stack, "acme") if x.id not in live_ids]
    assert len(batch) == LIVE_LINES
    full = 0
    for j in live:
        t = j["timings"]["created_ms"]
        held = sum(1 for x in batch if x.started_ms and x.started_ms <= t < (x.finished_ms or 1 << 62))
        queued = sum(1 for x in batch if x.created_ms <= t < (x.started_ms or 1 << 62))
        assert queued > 0, (j["id"], held, queued)
        full += held >= SLOTS
    assert full >= 0.75 * SAMPLES, (full, SAMPLES)
    assert p99 <= bound_ms, (p99, bound_ms, waits)
