"""Metrics where the facts are: each worker's own /metrics counts every job it ended exactly once;
the API keeps request metrics and global queue gauges, and no longer counts jobs it watches."""

from __future__ import annotations

import asyncio
import time

import httpx
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)
from test_worker_sim import MODEL, admit, follow_all, running, sim_engine, spec

from broker import Broker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient(timeout=5) as h:
        r = await h.get(f"http://127.0.0.1:{port}/metrics")
    r.raise_for_status()
    return samples(r.text)


async def scrape_until(port: int, key: tuple[str, tuple[tuple[str, str], ...]], value: float) -> Samples:
    """The terminal write is acknowledged just after the `done` event reaches followers: wait for it."""
    async with asyncio.timeout(10):
        while (m := await scrape(port)).get(key) != value:  # noqa: ASYNC110 - an HTTP endpoint: no event exists
            await asyncio.sleep(0.02)
    return m


def job_key(status: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("genq_jobs_total", (("model", MODEL), ("status", status)))


M = (("model", MODEL),)


async def test_worker_metrics_count_each_job_once(broker: Broker) -> None:
    n = 30
    port = free_port()
    ids = await admit(broker, [spec(i) for i in range(n)])
    async with running(broker, sim_engine(capacity=8), metrics_port=port) as r:
        await follow_all(broker, ids)
        m = await scrape_until(port, job_key("succeeded"), n)
        assert m[("genq_ttft_seconds_count", M)] == n
        assert m[("genq_queue_wait_seconds_count", M)] == n
        assert m[("genq_tokens_per_second_count", M)] == n
        assert m[("genq_generated_tokens_total", M)] == n * 30
        assert m[("genq_prompt_tokens_total", M)] > 0
        assert m[("genq_worker_capacity_sequences", M)] == 8
        assert m[("genq_worker_held_jobs", M)] == 0
        info = ("genq_worker_info", (("engine", "simulated"), ("model", MODEL), ("worker", r.worker.id)))
        assert m[info] == 1
        assert ("process_cpu_seconds_total", ()) in m and ("process_resident_memory_bytes", ()) in m
        assert job_key("failed") not in m and ("genq_job_retries_total", (*M, ("reason", "worker_shutdown"))) not in m
    # the server went with the worker
    try:
        await scrape(port)
        raise AssertionError("metrics still served after the worker stopped")
    except httpx.TransportError:
        pass


async def test_a_handed_back_job_is_counted_once_by_the_worker_that_ends_it(broker: Broker) -> None:
    ids = await admit(broker, [spec(i, max_tokens=400, priority=5) for i in range(4)])
    p1, p2 = free_port(), free_port()
    async with running(broker, sim_engine(capacity=2, step_ms=5), metrics_port=p1, drain_grace_s=0.1) as r:
        await asyncio.wait_for(r.worker.first_claim.wait(), 5)
        assert len(r.worker.runs) == 4  # two in the engine, two waiting (waiting_margin)
        await r.stop()
    value = r.worker.metrics.registry.get_sample_value
    assert value("genq_job_retries_total", {"model": MODEL, "reason": "worker_shutdown"}) == 4
    assert value("genq_jobs_total", {"model": MODEL, "status": "succeeded"}) is None  # it ended none
    async with running(broker, sim_engine(capacity=8, step_ms=0.5), metrics_port=p2):
        await follow_all(broker, ids)
        m = await scrape_until(p2, job_key("succeeded"), 4)
        assert m[("genq_ttft_seconds_count", M)] == 4
        assert m[("genq_queue_wait_seconds_count", M)] == 4


def test_api_metrics_do_not_count_jobs_it_watches(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack()
    key = stack.key("acme")
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        jid = h.post("/v1/jobs", json={"model": "m", "prompt": "x", "max_tokens": 5}).json()["id"]
        with h.stream("GET", f"/v1/jobs/{jid}/events") as s:  # watched to the end
            assert "event: done" in "".join(s.iter_text())
        assert h.get(f"/v1/jobs/{jid}").json()["status"] == "succeeded"
        assert h.get(f"/v1/jobs/{jid}").json()["status"] == "succeeded"  # polled twice
        m = samples(h.get("/metrics").text)
    assert not [k for k in m if k[0].startswith(("genq_ttft", "genq_queue_wait", "genq_tokens_per_second"))]
    assert not [k for k in m if k[0] == "genq_jobs_total"]  # only its reaper's outcomes would be here
    assert m[("genq_queue_depth", (("model", "m"), ("priority", "5")))] == 0
    assert ("process_cpu_seconds_total", ()) in m
    # the job was counted once, by the worker that ran it (its write is acknowledged just after `done`)
    (w,) = stack.workers
    deadline = time.monotonic() + 10
    while w.worker.metrics.registry.get_sample_value("genq_jobs_total", {"model": "m", "status": "succeeded"}) != 1:
        assert time.monotonic() < deadline, "the worker never counted the job"
        time.sleep(0.01)  # a counter in another thread: no event to wait on
