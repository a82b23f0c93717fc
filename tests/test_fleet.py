"""A fleet on real processes: two `genq api` and three `genq worker --engine simulated`.

1,000 jobs are submitted round-robin to both APIs and each is followed over SSE from the
*other* API: every job succeeds, every stream carries the whole stored output once (no
event id twice, ending in ``done``), and the workers' own ``/metrics`` count each job
exactly once (the APIs count none of them).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import structlog
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from broker import Broker, BrokerSettings
from tests.conftest import SHARED_REDIS, free_port

pytestmark = pytest.mark.timeout(180)
log = structlog.get_logger(__name__)
ADMIN = "gq-" + secrets.token_urlsafe(32)
JOBS = 1_000
MAX_TOKENS = 4
IN_FLIGHT = 96  # jobs submitted and followed at once
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Fleet:
    """The processes of one test, their logs in ``tmp``; ``close()`` stops them all."""

    tmp: Path
    queue: str = field(default_factory=lambda: "t" + secrets.token_hex(6))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    api_ports: list[int] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "GENQ_REDIS_URL": SHARED_REDIS,
            "GENQ_QUEUE": self.queue,
            "GENQ_MODELS": '["m"]',
            "GENQ_ADMIN_KEY": ADMIN,
            "GENQ_SSE_PER_TENANT": str(4 * IN_FLIGHT),
            "GENQ_KEEPALIVE_S": "1",
        }

    def spawn(self, name: str, *args: str) -> None:
        with open(self.tmp / f"{name}.log", "wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "genq.cli", *args], env=self.env, stdout=out, stderr=out, cwd=ROOT
            )

    def start_api(self) -> None:
        port = free_port()
        self.api_ports.append(port)
        self.spawn(f"api{len(self.api_ports)}", "api", "--port", str(port))

    def start_worker(self) -> None:
        port = free_port()
        self.metrics_ports.append(port)
        self.spawn(
            f"worker{len(self.metrics_ports)}",
            *("worker", "--engine", "simulated", "--served-model-name", "m", "--max-num-seqs", "64"),
            *("--sim-step-ms", "2", "--sim-step-ms-per-seq", "0", "--heartbeat-s", "0.5"),
            *("--metrics-port", str(port)),
        )

    def alive(self) -> None:
        for name, p in self.procs.items():
            assert p.poll() is None, f"{name} exited {p.returncode}: {(self.tmp / f'{name}.log').read_text()[-3000:]}"

    def broker(self) -> Broker:
        return Broker.from_settings(BrokerSettings(redis_url=SHARED_REDIS, queue=self.queue, models=["m"]))

    async def ready(self, timeout_s: float = 60) -> None:
        """Both APIs answer /readyz and all three workers heartbeat (other processes: poll)."""
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(timeout=2) as h, self.broker() as b:
            while True:
                self.alive()
                ok = 0
                for port in [*self.api_ports, *self.metrics_ports]:
                    path = "/readyz" if port in self.api_ports else "/metrics"
                    try:
                        ok += (await h.get(f"http://127.0.0.1:{port}{path}")).status_code == 200
                    except httpx.TransportError:
                        pass
                if ok == len(self.procs) and len(await b.workers()) == len(self.metrics_ports):
                    return
                await asyncio.sleep(0.1)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

        async def drop() -> None:
            async with self.broker() as b:
                await b.drop_namespace()

        asyncio.run(drop())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


@dataclass
class Followed:
    job_id: str
    ids: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    text: str = ""


async def submit_and_follow(submit: httpx.AsyncClient, follow: httpx.AsyncClient, n: int) -> Followed:
    body = {"model": "m", "messages": [{"role": "user", "content": f"job {n}"}], "max_tokens": MAX_TOKENS}
    r = await submit.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    got = Followed(r.json()["id"])
    async with aconnect_sse(follow, "GET", f"/v1/jobs/{got.job_id}/events") as source:
        assert source.response.status_code == 200
        async for ev in source.aiter_sse():
            if ev.id:
                got.ids.append(ev.id)
            got.types.append(ev.event)
            if ev.event == "token":
                got.text += json.loads(ev.data)["text"]
            if ev.event in ("done", "failed", "cancelled", "error"):
                break
    return got


def jobs_total(text: str) -> dict[str, float]:
    """``genq_jobs_total`` by status, from one /metrics page."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "genq_jobs_total":
                out[s.labels["status"]] = out.get(s.labels["status"], 0) + s.value
    return out


async def test_two_apis_three_workers_a_thousand_jobs(fleet: Fleet) -> None:
    for _ in range(2):
        fleet.start_api()
    for _ in range(3):
        fleet.start_worker()
    await fleet.ready()

    headers = {"Authorization": f"Bearer {ADMIN}"}
    limits = httpx.Limits(max_connections=2 * IN_FLIGHT, max_keepalive_connections=2 * IN_FLIGHT)
    clients = [
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{p}", headers=headers, timeout=60, limits=limits)
        for p in fleet.api_ports
    ]
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(n: int) -> Followed:
        async with gate:
            return await submit_and_follow(clients[n % 2], clients[(n + 1) % 2], n)

    t0 = time.monotonic()
    try:
        async with asyncio.timeout(120):
            followed = await asyncio.gather(*(one(n) for n in range(JOBS)))
        elapsed = time.monotonic() - t0
        stored = {}
        for chunk in range(0, JOBS, 100):
            views = await asyncio.gather(
                *(clients[0].get(f"/v1/jobs/{f.job_id}") for f in followed[chunk : chunk + 100])
            )
            stored.update({v.json()["id"]: v.json() for v in views})
        api_pages = [(await c.get("/metrics")).text for c in clients]
    finally:
        for c in clients:
            await c.aclose()
    fleet.alive()

    assert len({f.job_id for f in followed}) == JOBS
    for f in followed:
        job = stored[f.job_id]
        assert job["status"] == "succeeded", job
        assert f.types[-1] == "done" and f.types.count("token") >= 1, (f.job_id, f.types)
        assert len(f.ids) == len(set(f.ids)), (f.job_id, f.ids)  # no event twice
        assert f.text == job["output"], (f.job_id, f.text, job["output"])

    async with httpx.AsyncClient(timeout=5) as h:
        pages = [(await h.get(f"http://127.0.0.1:{p}/metrics")).text for p in fleet.metrics_ports]
    per_worker = [jobs_total(p) for p in pages]
    succeeded = [w.get("succeeded", 0) for w in per_worker]
    assert sum(succeeded) == JOBS, per_worker
    assert all(w.get(s, 0) == 0 for w in per_worker for s in ("failed", "cancelled", "expired")), per_worker
    assert all(n > 0 for n in succeeded), succeeded  # all three workers served
    for page in api_pages:  # the APIs count only what their reaper ends: nothing here
        assert sum(jobs_total(page).values()) == 0, jobs_total(page)
    log.info("fleet.drained", jobs=JOBS, seconds=round(elapsed, 2), per_worker=succeeded)
