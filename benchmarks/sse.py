"""``python -m benchmarks sse``: what one API process delivers, measured in one run.

1. SSE fan-out: one ``genq api`` subprocess (uvicorn) on a fresh queue namespace;
   ``followers`` SSE clients (httpx, spread over ``client_procs`` child processes)
   each follow one job on ``GET /v1/jobs/{id}/events``. A SIMULATED PRODUCER (a child
   process playing the worker through the broker, no engine) claims the jobs; tokens
   accrue at a fixed total rate, as from an engine, and every ``flush_ms`` (or when
   the previous flush returns, if slower) each job gets what it has accrued, written
   with ``Broker.append_many`` (one pipeline per flush, as the worker does); then it
   completes them. Each delta's text starts with its ``time.time_ns()``, so clients
   measure publish -> receive latency per event. Run at 10, 20, 50 and 100 % of ``rate``.
2. Submit throughput: ``submit_clients`` concurrent httpx clients POST /v1/jobs for
   ``submit_s`` (no worker: jobs just queue; the tenant has no limits).
3. Chat TTFT with the official ``openai`` client (stream=True, first content chunk):
   vLLM's own OpenAI server, stopped, then ``genq worker --engine vllm`` behind the
   same API, on the same engine arguments and prompts. One engine at a time; the whole
   run holds the machine's vLLM lock (``GENQ_VLLM_LOCK``, default /work/vllm.lock), so
   no other engine competes for the cores while anything here is measured.

CPU seconds of every process (API, Redis, producer, clients) are reported per phase,
which says where the time goes when a goal is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import secrets
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from benchmarks.common import expect, percentile, spawn
from benchmarks.procs import Child, CpuMeter, vllm_lock, wait_http
from benchmarks.redis_server import free_port
from benchmarks.sse_children import SSE_MODEL, client_main, producer_main
from broker import Broker, BrokerSettings, JobSpec
from broker.events import EventHub
from broker.models import Admission, TenantLimits

log = structlog.get_logger(__name__)

SUBMIT_MODEL, CHAT_MODEL = "bench-submit", "SmolLM2-135M-Instruct"
TENANT = "bench"
PROBES = 10  # jobs also followed in-process on the EventHub, for the latency floor without the API
ENGINE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "16"]
TOPICS = [
    "a lighthouse",
    "a robot chef",
    "the ocean",
    "a lost key",
    "mountains",
    "a city at night",
    "a dragon",
    "a library",
    "winter",
    "a train journey",
    "a garden",
    "the moon",
    "a violin",
    "a desert",
    "rain",
    "a fox",
]


@dataclass(frozen=True, slots=True)
class Config:
    redis_url: str = "redis://127.0.0.1:6379"
    followers: int = 200
    rate: int = 50_000  # target tokens/s published in total
    curve: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)  # fractions of ``rate`` measured, the last one is the target
    duration_s: float = 10.0
    flush_ms: int = 20
    client_procs: int = 2
    submit_s: float = 5.0
    submit_clients: int = 64
    skip_vllm: bool = False
    max_tokens: int = 32
    ttft_sequential: int = 10  # 1-user samples
    ttft_rounds: int = 3  # rounds of 16 concurrent users
    # One vLLM engine per machine at a time: tests and benchmarks take the same flock(2) lock.
    lock_path: str = os.environ.get(
        "GENQ_VLLM_LOCK", "/work/vllm.lock" if os.path.isdir("/work") else "/tmp/genq-vllm.lock"
    )

    @classmethod
    def quick(cls, redis_url: str) -> Config:
        return cls(
            redis_url=redis_url,
            followers=20,
            rate=2_000,
            curve=(1.0,),
            duration_s=2.0,
            submit_s=1.0,
            submit_clients=8,
            skip_vllm=True,
        )


@dataclass(slots=True)
class FanOut:
    rate: int
    published: int = 0  # tokens
    received: int = 0
    events: int = 0
    window_s: float = 0.0  # first publish -> last token received
    publish_s: float = 0.0  # first -> last publish
    latency_ms: array = field(default_factory=lambda: array("d"))
    direct_ms: array = field(default_factory=lambda: array("d"))  # the same, via EventHub in-process, no API
    flush_ms: list[float] = field(default_factory=list)  # append_many duration per flush
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core, per process

    @property
    def delivered_tps(self) -> float:
        return self.received / self.window_s if self.window_s else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.window_s if self.window_s else 0.0

    @property
    def api_us_per_event(self) -> float:
        return self.cpu.get("api", 0.0) / self.events_per_s * 1e6 if self.events_per_s else 0.0


@dataclass(slots=True)
class Result:
    fanout: list[FanOut]
    submit_ok: int = 0
    submit_other: int = 0
    submit_s: float = 0.0
    submit_latency_ms: list[float] = field(default_factory=list)
    submit_cpu: dict[str, float] = field(default_factory=dict)
    ttft_ms: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # system -> users -> samples
    load: tuple[float, float] = (0.0, 0.0)

    @property
    def submit_rate(self) -> float:
        return self.submit_ok / self.submit_s if self.submit_s else 0.0


# -- the run ----------------------------------------------------------------------------
@dataclass
class Bench:
    cfg: Config
    broker: Broker
    log_dir: Path
    env: dict[str, str]
    api: Child | None = None
    url: str = ""
    key: str = ""
    clients: list[tuple[mp.Process, Connection]] = field(default_factory=list)
    producer: tuple[mp.Process, Connection] | None = None
    pids: dict[str, int] = field(default_factory=dict)
    hub: EventHub | None = None

    async def start(self) -> None:
        from api.auth import create_key

        for model in (SSE_MODEL, SUBMIT_MODEL):
            await self.broker.register_model(model, 0)
        await self.broker.set_tenant(TENANT, TenantLimits())  # no limits
        self.key = await create_key(self.broker, TENANT, "genq bench sse")
        self.hub = self.broker.event_hub()
        port = free_port()
        self.api = Child.start(
            "api", [sys.executable, "-m", "genq.cli", "api", "--port", str(port)], self.env, self.log_dir
        )
        self.url = f"http://127.0.0.1:{port}"
        await wait_http(self.api, self.url + "/healthz", 60)
        self.pids["api"] = self.api.proc.pid
        self.pids["bench"] = os.getpid()  # this process: the probes on the EventHub, the submit orchestration
        redis_pid = await self._local_redis_pid()
        if redis_pid:
            self.pids["redis"] = redis_pid
        self.producer = spawn(producer_main, self.cfg.redis_url, self.broker.settings.queue)
        self.pids["producer"] = await expect(self.producer[1], "ready", 60)
        self.clients = [spawn(client_main, self.url, self.key) for _ in range(self.cfg.client_procs)]
        for i, (proc, _) in enumerate(self.clients):
            self.pids[f"client{i + 1}"] = proc.pid  # type: ignore[assignment]

    async def _local_redis_pid(self) -> int | None:
        try:
            import psutil
        except ImportError:
            return None
        info = await self.broker._redis.info("server")
        with contextlib.suppress(psutil.Error, KeyError):
            pid = int(info["process_id"])
            if "redis" in psutil.Process(pid).name():  # the same machine's Redis, not a namesake pid
                return pid
        return None

    async def stop(self) -> None:
        for proc, conn in [*self.clients, *([self.producer] if self.producer else [])]:
            with contextlib.suppress(OSError):
                conn.send(("stop", None))
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.terminate()
            conn.close()
        if self.api is not None:
            self.api.stop(15)
        if self.hub is not None:
            await self.hub.close()

    # -- 1. fan-out ---------------------------------------------------------------------
    async def fan_out(self, rate: int) -> FanOut:
        cfg, n = self.cfg, self.cfg.followers
        assert self.producer is not None
        per_job = int(rate * cfg.duration_s / n) + 16
        spec = JobSpec(tenant=TENANT, model=SSE_MODEL, kind="completion", prompt="bench", max_tokens=per_job)
        ids = []
        for adm in await self.broker.admit_many([spec] * n):
            if not isinstance(adm, Admission):
                raise adm
            ids.append(adm.job_id)
        pconn = self.producer[1]
        pconn.send(("claim", n))
        await expect(pconn, "claimed", 30)
        conns = [conn for _, conn in self.clients]
        for i, conn in enumerate(conns):
            conn.send(("follow", ids[i :: len(conns)]))
        for conn in conns:
            await expect(conn, "subscribed", 150)
        direct = array("d")
        probes = await self._probes(ids[: min(PROBES, n)], direct)
        meter = CpuMeter(self.pids)
        pconn.send(("go", (rate, cfg.duration_s, cfg.flush_ms)))
        prod = await expect(pconn, "produced", cfg.duration_s * 5 + 60)
        outs = [await expect(conn, "followed", 120) for conn in conns]
        result = FanOut(
            rate, published=prod["published"], flush_ms=prod["flush_ms"], cpu=meter.shares(), direct_ms=direct
        )
        await asyncio.wait_for(asyncio.gather(*probes), 30)
        for out in outs:
            result.received += out["tokens"]
            result.events += out["events"]
            result.latency_ms.extend(out["lat"])
            result.errors += out["errors"]
        last_recv = max(out["last_ns"] for out in outs)
        result.window_s = max(0.0, (last_recv - prod["first_ns"]) / 1e9)
        result.publish_s = (prod["last_ns"] - prod["first_ns"]) / 1e9 + cfg.flush_ms / 1000
        log.info(
            "fan-out measured",
            rate=rate,
            delivered_tps=round(result.delivered_tps),
            p99_ms=round(percentile(list(result.latency_ms), 99), 1) if result.latency_ms else None,
        )
        return result

    async def _probes(self, job_ids: list[str], out: array) -> list[asyncio.Task[None]]:
        """Followers in this process straight on the EventHub (no HTTP): the latency floor of Redis + pub/sub."""
        assert self.hub is not None
        hub, subscribed = self.hub, [asyncio.Event() for _ in job_ids]

        async def probe(job_id: str, first: asyncio.Event) -> None:
            async for ev in hub.follow(job_id):
                first.set()  # the backlog's first event: the channel is subscribed
                if ev is not None and ev.type == "token":
                    out.append((time.time_ns() - int(ev.data["text"].partition("|")[0])) / 1e6)

        tasks = [asyncio.create_task(probe(j, e)) for j, e in zip(job_ids, subscribed, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in subscribed)), 30)
        return tasks

    # -- 2. submit ----------------------------------------------------------------------
    async def submit(self, result: Result) -> None:
        cfg, conns = self.cfg, [conn for _, conn in self.clients]
        shares = [cfg.submit_clients // len(conns) + (i < cfg.submit_clients % len(conns)) for i in range(len(conns))]
        for conn, share in zip(conns, shares, strict=True):
            conn.send(("submit", (SUBMIT_MODEL, share)))
        for conn in conns:
            await expect(conn, "warm", 60)
        meter = CpuMeter(self.pids)
        start_ns = time.time_ns() + 50_000_000  # every client has received "go" by then
        for conn in conns:
            conn.send(("go", (start_ns, cfg.submit_s)))
        for conn in conns:
            out = await expect(conn, "submitted", cfg.submit_s + 120)
            result.submit_ok += out["ok"]
            result.submit_other += out["other"]
            result.submit_latency_ms += out["lat"]
        result.submit_s, result.submit_cpu = cfg.submit_s, meter.shares()
        log.info("submit measured", jobs_per_s=round(result.submit_rate))

    # -- 3. chat TTFT: vLLM's server, then genq ------------------------------------------
    async def ttft(self, result: Result) -> None:
        from worker.model import prepare_default_model

        folder = await asyncio.to_thread(prepare_default_model)
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(folder),
            *ENGINE_ARGS,
            "--served-model-name",
            CHAT_MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        server = Child.start("vllm-server", cmd, self.env, self.log_dir)
        try:
            await wait_http(server, f"http://127.0.0.1:{port}/v1/models", 900)
            result.ttft_ms["vllm"] = await measure_ttft(f"http://127.0.0.1:{port}/v1", "unused", self.cfg)
        finally:
            server.stop(60)
        cmd = [
            sys.executable,
            "-m",
            "genq.cli",
            "worker",
            "--engine",
            "vllm",
            *ENGINE_ARGS,
            "--served-model-name",
            CHAT_MODEL,
        ]
        worker = Child.start("worker", cmd, self.env, self.log_dir)
        try:
            deadline = time.monotonic() + 900
            while not any(w.get("model") == CHAT_MODEL for w in await self.broker.workers()):
                worker.check()
                if time.monotonic() > deadline:
                    raise RuntimeError("genq worker did not register within 900 s")
                await asyncio.sleep(0.5)  # a child loading its engine: no event to wait on but its heartbeat
            result.ttft_ms["genq"] = await measure_ttft(self.url + "/v1", self.key, self.cfg)
        finally:
            worker.stop(90)


async def measure_ttft(base_url: str, key: str, cfg: Config) -> dict[int, list[float]]:
    """Time to the first content chunk, official ``openai`` client, stream=True: 1 user, then 16 at once."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)

    async def one(i: int) -> float:
        messages = [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (story {i})."}]
        t0, first = time.perf_counter(), None
        stream = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=messages,
            max_tokens=cfg.max_tokens,
            temperature=0.0,  # type: ignore[arg-type]
            stream=True,
        )
        async for chunk in stream:  # read to the end: concurrent users keep the engine busy
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
        if first is None:
            raise RuntimeError(f"{base_url}: a stream ended without content")
        return (first - t0) * 1000

    try:
        for i in range(2):  # warm-up (genq's API also loads the tokenizer here)
            await one(i)
        await asyncio.gather(*(one(i) for i in range(16)))
        out: dict[int, list[float]] = {1: [await one(100 + i) for i in range(cfg.ttft_sequential)], 16: []}
        for r in range(cfg.ttft_rounds):
            out[16] += await asyncio.gather(*(one(1000 * (r + 1) + i) for i in range(16)))
        log.info(
            "ttft measured",
            url=base_url,
            p50_1_ms=round(percentile(out[1], 50)),
            p50_16_ms=round(percentile(out[16], 50)),
        )
        return out
    finally:
        await client.close()


async def run(cfg: Config) -> Result:
    queue = "benchsse" + secrets.token_hex(5)
    settings = BrokerSettings(redis_url=cfg.redis_url, queue=queue, models=[SSE_MODEL, SUBMIT_MODEL, CHAT_MODEL])
    env = {
        **os.environ,
        "GENQ_REDIS_URL": cfg.redis_url,
        "GENQ_QUEUE": queue,
        "HF_HUB_OFFLINE": "1",
        "GENQ_MODELS": json.dumps(settings.models),
        "GENQ_SSE_PER_TENANT": str(cfg.followers + 64),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
    }
    load_before = os.getloadavg()[0]
    lock = contextlib.nullcontext() if cfg.skip_vllm else vllm_lock(cfg.lock_path)
    with lock, tempfile.TemporaryDirectory(prefix="genq-bench-sse-") as tmp:
        async with Broker.from_settings(settings) as broker:
            log.info("genq bench sse", queue=queue, followers=cfg.followers, rate=cfg.rate)
            bench = Bench(cfg, broker, Path(tmp), env)
            try:
                await bench.start()
                fan = [await bench.fan_out(max(1, round(cfg.rate * f))) for f in cfg.curve]
                result = Result(fan)
                await bench.submit(result)
                if not cfg.skip_vllm:
                    await bench.ttft(result)
            finally:
                await bench.stop()
                log.info("cleaned up", keys=await broker.drop_namespace())
    result.load = (load_before, os.getloadavg()[0])
    return result


# -- the report -------------------------------------------------------------------------
def _ms(values: Any, p: float) -> float:
    return percentile(list(values), p) if len(values) else float("nan")


def summary(r: Result, cfg: Config) -> str:
    top = r.fanout[-1]
    line = (
        f"genq bench sse: {cfg.followers} followers, {top.delivered_tps:,.0f} tokens/s delivered "
        f"(target {top.rate:,}), latency p50 {_ms(top.latency_ms, 50):.1f} ms / "
        f"p99 {_ms(top.latency_ms, 99):.1f} ms; "
        f"submit {r.submit_rate:,.0f} jobs/s; "
    )
    if not r.ttft_ms:
        return line + "chat TTFT skipped"
    g, v = r.ttft_ms["genq"], r.ttft_ms["vllm"]
    return line + (
        f"chat TTFT 1 user genq {_ms(g[1], 50):.0f} ms vs vLLM server {_ms(v[1], 50):.0f} ms, "
        f"16 users genq {_ms(g[16], 50):.0f} ms vs vLLM {_ms(v[16], 50):.0f} ms"
    )


def _cpu(shares: dict[str, float]) -> str:
    ours = {k: v for k, v in shares.items() if k != "machine"}
    clients = sum(v for k, v in ours.items() if k.startswith("client"))
    parts = [f"{k} {v:.2f}" for k, v in ours.items() if not k.startswith("client")]
    machine = shares.get("machine", 0.0)
    others = max(0.0, machine - sum(ours.values()))
    return ", ".join([*parts, f"clients {clients:.2f}", f"other processes {others:.2f}", f"machine {machine:.2f}"])


def report(r: Result, cfg: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    t = Table(
        "target tok/s",
        "published tok/s",
        "delivered tok/s",
        "SSE events/s",
        "flush every",
        "append_many p50/p99",
        "latency p50 / p99 / max",
        "no-API floor p50 / p99",
        "API cores",
        "API CPU/event",
        title=f"SSE fan-out: one API process, {cfg.followers} followers, SIMULATED PRODUCER",
    )
    for f in r.fanout:
        lost = f" ({f.published - f.received:,} lost)" if f.received != f.published else ""
        t.add_row(
            f"{f.rate:,}",
            f"{f.published / f.publish_s:,.0f}",
            f"{f.delivered_tps:,.0f}{lost}",
            f"{f.events_per_s:,.0f}",
            f"{f.publish_s / max(1, len(f.flush_ms)) * 1000:.0f} ms",
            f"{_ms(f.flush_ms, 50):.1f} / {_ms(f.flush_ms, 99):.1f} ms",
            f"{_ms(f.latency_ms, 50):.1f} / {_ms(f.latency_ms, 99):.1f} / {max(f.latency_ms, default=0):.1f} ms",
            f"{_ms(f.direct_ms, 50):.1f} / {_ms(f.direct_ms, 99):.1f} ms",
            f"{f.cpu.get('api', 0):.2f}",
            f"{f.api_us_per_event:.0f} µs",
        )
    console.print(t)
    top = r.fanout[-1]
    met = top.delivered_tps >= 0.98 * top.rate and _ms(top.latency_ms, 99) <= 50
    verdict = "[green]met[/]" if met else "[red]missed[/]"
    console.print(f"Goal {top.rate:,} tokens/s delivered with p99 <= 50 ms: {verdict}")
    for f in r.fanout:
        console.print(f"  cpu (cores) at {f.rate:,} tok/s: {_cpu(f.cpu)}")
        for e in f.errors[:5]:
            console.print(f"  [red]error[/]: {e}")
    console.print(
        f"Submit: {r.submit_ok:,} jobs accepted (202) in {r.submit_s:.1f} s = {r.submit_rate:,.0f} jobs/s "
        f"by {cfg.submit_clients} concurrent clients; latency p50 {_ms(r.submit_latency_ms, 50):.1f} ms, "
        f"p99 {_ms(r.submit_latency_ms, 99):.1f} ms; other answers {r.submit_other}; API CPU "
        f"{r.submit_cpu.get('api', 0) / max(r.submit_rate, 1e-9) * 1000:.2f} ms/job; "
        f"cpu (cores): {_cpu(r.submit_cpu)}"
    )
    if r.ttft_ms:
        t = Table(
            "users",
            "genq p50 / p99",
            "vLLM server p50 / p99",
            "samples",
            title=f"Chat TTFT, openai client, stream=True, max_tokens {cfg.max_tokens}",
        )
        for users in (1, 16):
            g, v = r.ttft_ms["genq"][users], r.ttft_ms["vllm"][users]
            t.add_row(
                str(users),
                f"{_ms(g, 50):.0f} / {_ms(g, 99):.0f} ms",
                f"{_ms(v, 50):.0f} / {_ms(v, 99):.0f} ms",
                f"{len(g)} / {len(v)}",
            )
        console.print(t)
    console.print(
        f"Latency = client receive - the producer's time.time_ns() embedded in each delta (one clock, one machine). "
        f"Producer: SIMULATED (claims the jobs; tokens accrue at the target rate; every {cfg.flush_ms} ms, or when the "
        f"previous flush returns, one Broker.append_many for all jobs; then completes them). No-API floor: the same "
        f"latency for {PROBES} of the jobs followed on an EventHub inside the benchmark process (Redis pub/sub, "
        f"no HTTP). Clients: httpx in {cfg.client_procs} processes. Delivered = tokens received / (last receive - "
        f"first publish). "
        f"Load average {r.load[0]:.2f} before, {r.load[1]:.2f} after, {os.cpu_count()} CPUs."
    )


def main(cfg: Config) -> None:
    import logging

    import typer

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    result = asyncio.run(run(cfg))
    report(result, cfg)
    typer.echo(summary(result, cfg))
