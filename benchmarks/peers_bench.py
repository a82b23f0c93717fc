"""``python -m benchmarks queue``: genq's Redis queue against the strongest Redis queues, in one run, on one Redis.

Systems (``--systems``, see :mod:`benchmarks.peers_env`): genq through its broker API, Node
BullMQ, BullMQ for Python, SAQ and arq, each in its idiomatic fastest setup, each producer and
consumer a process of its own (scripts in ``benchmarks/peers/``, speaking the line protocol of
``benchmarks/peers/proto.py`` over stdin/stdout). All run on ONE private ``redis-server``,
flushed before each system and between its phases:

1. **latency**: an idle consumer; one job at a time after a random idle gap; enqueue -> start
   (``time.time_ns`` in both processes); the first few are warm-ups;
2. **enqueue**: N no-op jobs with no consumer running: rate, and Redis CPU (``INFO cpu``) and
   commands (``INFO commandstats``, commands inside scripts included) per job;
3. **drain**: a consumer started on the N queued jobs: rate (first start -> last finish),
   Redis CPU and commands per job;
4. **bytes kept** per finished job: ``used_memory`` after the drain (consumer gone) minus the
   flushed server's, at each system's default retention.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import structlog
from redis.asyncio import Redis

from benchmarks.common import percentile
from benchmarks.peers_env import SYSTEMS, System, command
from benchmarks.redis_server import Cost, measured, servers, used_memory

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Config:
    systems: tuple[str, ...] = tuple(SYSTEMS)
    jobs: int = 20_000
    samples: int = 300  # latency samples per system
    arq_samples: int = 40  # arq polls every 0.5 s: each sample costs ~0.25 s
    warmup: int = 10

    @classmethod
    def quick(cls, systems: tuple[str, ...]) -> Config:
        return cls(systems=systems, jobs=300, samples=20, arq_samples=3, warmup=2)


@dataclass
class Row:
    system: System
    jobs: int
    latency_ms: list[float]
    enqueue_s: float
    drain_s: float
    costs: dict[object, Cost] = field(default_factory=dict)
    bytes_per_job: float = 0.0

    @property
    def figures(self) -> dict[str, float]:
        enq, drain = self.costs["enqueue"], self.costs["drain"]
        return {
            "p50": percentile(self.latency_ms, 50),
            "p99": percentile(self.latency_ms, 99),
            "enqueue": self.jobs / self.enqueue_s,
            "drain": self.jobs / self.drain_s,
            "cpu": enq.us_per + drain.us_per,
            "cpu_enqueue": enq.us_per,
            "cpu_drain": drain.us_per,
            "commands": enq.commands_per + drain.commands_per,
            "commands_enqueue": enq.commands_per,
            "commands_drain": drain.commands_per,
            "bytes": self.bytes_per_job,
        }


class Peer:
    """One producer or consumer process of a system."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name, self.proc = name, proc

    async def expect(self, tag: str, timeout_s: float) -> list[str]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"{self.name} exited early (rc {await self.proc.wait()}); its stderr is above")
        words = line.decode().split()
        if not words or words[0] != tag:
            raise RuntimeError(f"{self.name} said {line!r}, expected {tag!r}")
        return words

    async def ask(self, cmd: str, tag: str, timeout_s: float) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.expect(tag, timeout_s)


@asynccontextmanager
async def peer(s: System, role: str, url: str, expect: int = 0) -> AsyncIterator[Peer]:
    argv, env = command(s)
    proc = await asyncio.create_subprocess_exec(
        *argv, role, url, str(expect), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
    )
    p = Peer(f"{s.name} {role}", proc)
    try:
        await p.expect("ready", 120)
        yield p
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the peer's signal to stop
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            log.warning("peer did not stop; killing it", peer=p.name, pid=proc.pid)
            with suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def latency(s: System, url: str, cfg: Config) -> list[float]:
    samples, warmup = (cfg.arq_samples, 1) if s.name == "arq" else (cfg.samples, cfg.warmup)
    out = []
    async with peer(s, "producer", url) as prod, peer(s, "consumer", url) as cons:
        for i in range(warmup + samples):
            await asyncio.sleep(random.uniform(*s.latency_gap_s))  # the consumer is idle, blocked or polling
            _, job_id, t0 = await prod.ask("probe", "sent", 30)
            _, started, t1 = await cons.expect("start", 30)
            if started != job_id:
                raise RuntimeError(f"{s.name}: consumer started {started}, expected {job_id}")
            if i >= warmup:
                out.append((int(t1) - int(t0)) / 1e6)
    return out


async def measure(s: System, port: int, cfg: Config) -> Row:
    url, ports, n = f"redis://127.0.0.1:{port}", [port], cfg.jobs
    redis = Redis(port=port)
    try:
        await redis.flushall()
        log.info("latency", system=s.name)
        lat = await latency(s, url, cfg)
        await redis.flushall()
        row = Row(s, n, lat, 0.0, 0.0)
        mem_before = await used_memory(ports)
        log.info("enqueue", system=s.name, jobs=n)
        async with measured(ports, n, row.costs, "enqueue"), peer(s, "producer", url) as prod:
            _, _, t0, t1 = await prod.ask(f"bulk {n}", "bulked", 900)
        row.enqueue_s = (int(t1) - int(t0)) / 1e9
        log.info("drain", system=s.name, jobs=n)
        async with measured(ports, n, row.costs, "drain"), peer(s, "consumer", url, n) as cons:
            _, first, last = await cons.expect("drained", 900)
        row.drain_s = (int(last) - int(first)) / 1e9
        row.bytes_per_job = (await used_memory(ports) - mem_before) / n
        return row
    finally:
        await redis.aclose()


async def run(cfg: Config) -> tuple[list[Row], tuple[float, float]]:
    for name in cfg.systems:
        command(SYSTEMS[name])  # install missing peers before anything is measured
    load_before, rows = os.getloadavg()[0], []
    async with servers(1, cluster=False) as ports:
        log.info("bench queue: one private redis-server", port=ports[0], systems=",".join(cfg.systems))
        for name in cfg.systems:
            rows.append(await measure(SYSTEMS[name], ports[0], cfg))
    return rows, (load_before, os.getloadavg()[0])


# (key, label, format, higher is better)
MEASURES = [
    ("p50", "latency p50 (ms)", "{:.2f}", False),
    ("p99", "latency p99 (ms)", "{:.2f}", False),
    ("enqueue", "enqueue (jobs/s)", "{:,.0f}", True),
    ("drain", "drain (jobs/s)", "{:,.0f}", True),
    ("cpu", "Redis CPU per job (µs)", "{:.0f}", False),
    ("cpu_enqueue", "  enqueue", "{:.0f}", False),
    ("cpu_drain", "  drain", "{:.0f}", False),
    ("commands", "commands per job", "{:.1f}", False),
    ("commands_enqueue", "  enqueue", "{:.1f}", False),
    ("commands_drain", "  drain", "{:.1f}", False),
    ("bytes", "bytes kept per finished job", "{:,.0f}", False),
]
SUMMARY_KEYS = ["p50", "p99", "enqueue", "drain", "cpu", "commands", "bytes"]


def strongest(rows: list[Row], key: str, higher: bool) -> Row | None:
    peers = [r for r in rows if r.system.name != "genq"]
    if not peers:
        return None
    pick = max if higher else min
    return pick(peers, key=lambda r: r.figures[key])


def summary(rows: list[Row]) -> str:
    genq = next((r for r in rows if r.system.name == "genq"), None)
    if genq is None or len(rows) < 2:
        return "genq bench queue: nothing to compare (run genq and at least one peer)"
    parts = []
    for key, label, fmt, higher in MEASURES:
        if key not in SUMMARY_KEYS:
            continue
        best = strongest(rows, key, higher)
        assert best is not None
        g, b = genq.figures[key], best.figures[key]
        ratio = g / b if b else float("inf")
        parts.append(f"{label} {fmt.format(g)} vs {fmt.format(b)} {best.system.label} = {ratio:.2f}x")
    return "genq bench queue: genq vs the strongest peer on each (ratio genq/peer): " + "; ".join(parts)


def report(rows: list[Row], load: tuple[float, float], cfg: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("measure", *(r.system.label for r in rows), title=f"genq bench queue: {cfg.jobs:,} no-op jobs each")
    for key, label, fmt, higher in MEASURES:
        best = strongest(rows, key, higher)
        t.add_row(
            label,
            *(f"[bold]{fmt.format(r.figures[key])}[/]" if r is best else fmt.format(r.figures[key]) for r in rows),
        )
    t.add_row("  latency samples", *(str(len(r.latency_ms)) for r in rows))
    t.add_row("  jobs in s (enqueue / drain)", *(f"{r.enqueue_s:.2f} / {r.drain_s:.2f}" for r in rows))
    console = Console(width=200)
    console.print(t)
    for r in rows:
        console.print(f"{r.system.label}: {r.system.setup}; kept: {r.system.retention}.", highlight=False)
    console.print(
        "One private redis-server (no persistence), flushed before each system. Latency = job start - enqueue "
        "call start, idle consumer in its own process. Enqueue with no consumer running; drain = first start -> last "
        "finish of the queued jobs, consumer in its own process. Redis CPU from INFO cpu, commands from INFO "
        "commandstats (inside scripts included), bytes = used_memory after the drain minus the empty server's. "
        f"Bold = the strongest peer. Load average {load[0]:.2f} before, {load[1]:.2f} after, {os.cpu_count()} CPUs.",
        highlight=False,
    )


def main(cfg: Config) -> None:
    import typer

    started = time.monotonic()
    rows, load = asyncio.run(run(cfg))
    report(rows, load, cfg)
    log.info("bench queue done", seconds=round(time.monotonic() - started, 1))
    typer.echo(summary(rows))
