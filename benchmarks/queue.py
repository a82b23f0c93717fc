"""``python -m benchmarks queue-arq``: genq's Redis queue against arq 0.28, in one run, on one Redis.

Two figures, each measured for both systems back to back:

1. enqueue -> start latency with an idle consumer: genq's claimer blocks on its
   wake-up list (BLPOP); arq's worker polls every 0.5 s, as shipped.
2. drain throughput of no-op jobs (enqueue + claim + complete), 32 at a time.

Every consumer (genq claimer, genq drain worker, arq worker) runs in a child
process (``spawn``), as a real worker would; every timestamp is
``time.time_ns()``, the one clock comparable across processes. Children report
over a pipe, so the producer never polls Redis. The first 10 genq latency
samples and the first arq one are warm-ups and are not counted.
Each run uses a fresh random genq queue namespace and arq queue name and deletes
their keys at the end; nothing is flushed.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import secrets
import time
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from benchmarks.common import expect, percentile, recv, spawn
from broker import Broker, BrokerSettings, JobSpec
from broker.logs import configure_logging
from broker.models import Admission

log = structlog.get_logger(__name__)

BATCH = 32  # micro-batch size of every claim, both systems
LAT_MODEL, DRAIN_MODEL = "bench-latency", "bench-drain"


@dataclass(frozen=True, slots=True)
class Config:
    redis_url: str = "redis://127.0.0.1:6379"
    samples: int = 200
    jobs: int = 20_000
    arq_samples: int = 40
    arq_jobs: int = 3_000
    consumers: int = 4  # concurrent claim loops in the genq drain's worker process
    producers: int = 2  # concurrent admit_many pipelines
    admit_chunk: int = 128  # jobs per admit_many pipeline

    @classmethod
    def quick(cls, redis_url: str) -> Config:
        return cls(redis_url=redis_url, samples=20, jobs=1_000, arq_samples=3, arq_jobs=200)


@dataclass(slots=True)
class Result:
    genq_latency_ms: list[float]
    arq_latency_ms: list[float]
    genq_drain: tuple[int, float]  # jobs, seconds
    arq_drain: tuple[int, float]
    arq_drain_uncapped: tuple[int, float]  # queue_read_limit lifted to the job count
    ping_ms: list[float]  # Redis PING after the same idle gaps: this machine's floor
    load: tuple[float, float]  # 1-minute load average before and after

    @property
    def figures(self) -> dict[str, float]:
        rate = lambda d: d[0] / d[1]  # noqa: E731
        return {
            "g50": percentile(self.genq_latency_ms, 50),
            "g99": percentile(self.genq_latency_ms, 99),
            "a50": percentile(self.arq_latency_ms, 50),
            "a99": percentile(self.arq_latency_ms, 99),
            "g_rate": rate(self.genq_drain),
            "a_rate": rate(self.arq_drain),
            "u_rate": rate(self.arq_drain_uncapped),
        }


# -- plumbing between the benchmark and its child processes -----------------------
def _stop_event(conn: Connection) -> asyncio.Event:
    """Set when the parent sends anything or goes away."""
    stop, loop = asyncio.Event(), asyncio.get_running_loop()

    def on_readable() -> None:
        with suppress(EOFError, OSError):
            conn.recv()
        loop.remove_reader(conn.fileno())
        stop.set()

    loop.add_reader(conn.fileno(), on_readable)
    return stop


async def _stop_child(proc: mp.Process, conn: Connection) -> None:
    with suppress(OSError):
        conn.send(("stop", 0))
    await asyncio.to_thread(proc.join, 10)
    if proc.is_alive():
        log.warning("child did not stop; terminating it", pid=proc.pid)
        proc.terminate()
        await asyncio.to_thread(proc.join, 5)
    conn.close()


# -- genq -------------------------------------------------------------------------
def _genq_claimer_main(conn: Connection, redis_url: str, queue: str) -> None:
    configure_logging(level="WARNING")
    asyncio.run(_genq_claimer(conn, redis_url, queue))


async def _genq_claimer(conn: Connection, redis_url: str, queue: str) -> None:
    """Claim one job at a time; with nothing queued, block on the wake-up list."""
    stop = _stop_event(conn)
    async with Broker.from_settings(BrokerSettings(redis_url=redis_url, queue=queue, models=[LAT_MODEL])) as broker:
        await broker.claim(LAT_MODEL, "bench-claimer", 1)  # connect and load the script before "ready"
        conn.send(("ready", 0))
        while not stop.is_set():
            leases = await broker.claim(LAT_MODEL, "bench-claimer", 1)
            if not leases:
                await broker.wait_for_work(LAT_MODEL, 0.25)
                continue
            conn.send((leases[0].id, time.time_ns()))
            await broker.complete_many(leases, "stop")


def _spec(model: str) -> JobSpec:
    return JobSpec(tenant="bench", model=model, kind="completion", prompt="x", max_tokens=1)


async def genq_latency(broker: Broker, cfg: Config, warmup: int = 10) -> list[float]:
    proc, conn = spawn(_genq_claimer_main, cfg.redis_url, broker.settings.queue)
    try:
        await expect(conn, "ready", 60)
        spec, out = _spec(LAT_MODEL), []
        for i in range(warmup + cfg.samples):
            # Space the jobs so that the claimer is idle and blocked each time.
            await asyncio.sleep(random.uniform(0.005, 0.010))
            t0 = time.time_ns()
            job_id = (await broker.admit(spec)).job_id
            tag, t1 = await recv(conn, 10)
            if tag != job_id:
                raise RuntimeError(f"claimer reported {tag}, expected {job_id}")
            if i >= warmup:
                out.append((t1 - t0) / 1e6)
        return out
    finally:
        await _stop_child(proc, conn)


async def ping_latency(broker: Broker, cfg: Config) -> list[float]:
    """The floor under the latency figures: one Redis round trip after the same idle gaps."""
    out = []
    for _ in range(cfg.samples):
        await asyncio.sleep(random.uniform(0.005, 0.010))
        t0 = time.time_ns()
        await broker.ping()
        out.append((time.time_ns() - t0) / 1e6)
    return out


def _genq_drainer_main(conn: Connection, redis_url: str, queue: str, jobs: int, consumers: int) -> None:
    configure_logging(level="WARNING")
    asyncio.run(_genq_drainer(conn, redis_url, queue, jobs, consumers))


async def _genq_drainer(conn: Connection, redis_url: str, queue: str, jobs: int, consumers: int) -> None:
    """A worker's claim loops, engine-free: claim 32, complete them in one pipeline; report the last completion."""
    done, stop = 0, _stop_event(conn)
    async with Broker.from_settings(BrokerSettings(redis_url=redis_url, queue=queue, models=[DRAIN_MODEL])) as broker:

        async def consume(worker_id: str) -> None:
            nonlocal done
            while done < jobs and not stop.is_set():
                leases = await broker.claim(DRAIN_MODEL, worker_id, BATCH)
                if not leases:
                    await broker.wait_for_work(DRAIN_MODEL, 0.1)
                    continue
                ok = await broker.complete_many(leases, "stop")
                if not all(ok.values()):
                    raise RuntimeError(f"stale leases in the drain: {[j for j, good in ok.items() if not good]}")
                done += len(leases)
                if done == jobs:
                    conn.send(("drained", time.time_ns()))

        await broker.claim(DRAIN_MODEL, "bench-drain", 1)  # connect and load the script before "ready"
        conn.send(("ready", 0))
        async with asyncio.TaskGroup() as tg:
            for i in range(consumers):
                tg.create_task(consume(f"bench-drain-{i}"))


async def genq_drain(broker: Broker, cfg: Config) -> tuple[int, float]:
    """Admit ``cfg.jobs`` no-op jobs in pipelines while a worker process claims and completes them 32 at a time."""
    n, spec = cfg.jobs, _spec(DRAIN_MODEL)
    proc, conn = spawn(_genq_drainer_main, cfg.redis_url, broker.settings.queue, n, cfg.consumers)
    try:
        await expect(conn, "ready", 60)
        chunks = iter(range(0, n, cfg.admit_chunk))

        async def produce() -> None:
            for start in chunks:
                for r in await broker.admit_many([spec] * min(cfg.admit_chunk, n - start)):
                    if not isinstance(r, Admission):
                        raise r

        start_ns = time.time_ns()
        async with asyncio.TaskGroup() as tg:
            for _ in range(cfg.producers):
                tg.create_task(produce())
        end_ns = await expect(conn, "drained", 600)
    finally:
        await _stop_child(proc, conn)
    stats = await broker.queue_stats(DRAIN_MODEL)
    if stats.total_depth or stats.running:
        raise RuntimeError(f"drain ended with {stats.total_depth} queued, {stats.running} running")
    return n, (end_ns - start_ns) / 1e9


# -- arq --------------------------------------------------------------------------
_report: Connection | None = None  # set in the arq child process


async def _arq_probe(ctx: dict[str, Any]) -> None:
    _report.send((ctx["job_id"], time.time_ns()))  # type: ignore[union-attr]


async def _arq_noop(ctx: dict[str, Any]) -> None:
    return None


def _arq_worker_main(
    conn: Connection, redis_url: str, queue_name: str, max_jobs: int, expect: int, read_limit: int | None
) -> None:
    global _report
    _report = conn
    configure_logging(level="WARNING")  # arq logs two INFO lines per job; a quiet deployment drops them
    asyncio.run(_arq_worker(conn, redis_url, queue_name, max_jobs, expect, read_limit))


async def _arq_worker(
    conn: Connection, redis_url: str, queue_name: str, max_jobs: int, expect: int, read_limit: int | None
) -> None:
    """A stock arq Worker (poll_delay 0.5 s); reports the time its ``expect``-th job has finished.

    ``read_limit`` overrides arq's ``queue_read_limit`` (default max(5 * max_jobs, 100) job ids per
    poll, which caps a stock worker at about 320 jobs/s with max_jobs=32).
    """
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    finished = 0

    async def on_startup(ctx: dict[str, Any]) -> None:
        conn.send(("ready", 0))

    async def after_job_end(ctx: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        if finished == expect:
            conn.send(("drained", time.time_ns()))

    stop = _stop_event(conn)
    worker = Worker(
        [func(_arq_probe, name="probe"), func(_arq_noop, name="noop")],
        queue_name=queue_name,
        redis_settings=RedisSettings.from_dsn(redis_url),
        max_jobs=max_jobs,
        handle_signals=False,
        on_startup=on_startup,
        after_job_end=after_job_end if expect else None,
        queue_read_limit=read_limit,
    )
    run = asyncio.create_task(worker.async_run())
    await asyncio.wait([run, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    run.cancel()
    with suppress(asyncio.CancelledError):
        await run
    await worker.close()


async def arq_latency(cfg: Config, ns: str) -> list[float]:
    from arq import create_pool
    from arq.connections import RedisSettings

    queue_name = f"arq:queue:{ns}"
    proc, conn = spawn(_arq_worker_main, cfg.redis_url, queue_name, 10, 0, None)
    pool = None
    try:
        await expect(conn, "ready", 60)
        pool = await create_pool(RedisSettings.from_dsn(cfg.redis_url), default_queue_name=queue_name)
        out = []
        for i in range(1 + cfg.arq_samples):  # the first is a warm-up
            # A random phase against the worker's 0.5 s poll.
            await asyncio.sleep(random.uniform(0.0, 0.5))
            job_id = f"{ns}-lat-{i}"
            t0 = time.time_ns()
            await pool.enqueue_job("probe", _job_id=job_id)
            tag, t1 = await recv(conn, 10)
            if tag != job_id:
                raise RuntimeError(f"arq worker reported {tag}, expected {job_id}")
            if i:
                out.append((t1 - t0) / 1e6)
        return out
    finally:
        if pool is not None:
            await pool.aclose()
        await _stop_child(proc, conn)


async def arq_drain(cfg: Config, ns: str, read_limit: int | None = None, concurrency: int = 32) -> tuple[int, float]:
    """Enqueue ``cfg.arq_jobs`` no-op jobs (32 at a time) while a worker with max_jobs=32 drains them."""
    from arq import create_pool
    from arq.connections import RedisSettings

    n, queue_name = cfg.arq_jobs, f"arq:queue:{ns}-drain{read_limit or ''}"
    proc, conn = spawn(_arq_worker_main, cfg.redis_url, queue_name, BATCH, n, read_limit)
    pool = None
    try:
        await expect(conn, "ready", 60)
        pool = await create_pool(RedisSettings.from_dsn(cfg.redis_url), default_queue_name=queue_name)
        ids = iter(range(n))

        async def produce() -> None:
            for i in ids:
                if await pool.enqueue_job("noop", _job_id=f"{ns}-drain{read_limit or ''}-{i}") is None:
                    raise RuntimeError(f"arq refused job {i}")

        start_ns = time.time_ns()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(produce())
        end_ns = await expect(conn, "drained", 600)
        return n, (end_ns - start_ns) / 1e9
    finally:
        if pool is not None:
            await pool.aclose()
        await _stop_child(proc, conn)


# -- the run ----------------------------------------------------------------------
async def _delete(redis: Any, pattern: str) -> int:
    """UNLINK in batches of 200: a batch of 1,000 small keys held the shared Redis for about 14 ms."""
    deleted, batch = 0, []
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 200:
            deleted += await redis.unlink(*batch)
            batch = []
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


async def run(cfg: Config) -> Result:
    ns = "bench" + secrets.token_hex(6)
    settings = BrokerSettings(redis_url=cfg.redis_url, queue=ns, models=[LAT_MODEL, DRAIN_MODEL])
    load_before = os.getloadavg()[0]
    async with Broker.from_settings(settings) as broker:
        try:
            await broker.register_model(LAT_MODEL, 0)
            await broker.register_model(DRAIN_MODEL, 0)
            log.info("genq latency", samples=cfg.samples, queue=ns)
            genq_lat = await genq_latency(broker, cfg)
            ping = await ping_latency(broker, cfg)
            log.info("arq latency", samples=cfg.arq_samples)
            arq_lat = await arq_latency(cfg, ns)
            log.info("genq drain", jobs=cfg.jobs, batch=BATCH, consumers=cfg.consumers)
            genq_dr = await genq_drain(broker, cfg)
            log.info("arq drain", jobs=cfg.arq_jobs, max_jobs=BATCH)
            arq_dr = await arq_drain(cfg, ns)
            log.info("arq drain, queue_read_limit lifted", jobs=cfg.arq_jobs, max_jobs=BATCH)
            arq_uncapped = await arq_drain(cfg, ns, read_limit=cfg.arq_jobs)
        finally:
            gone = await _delete(broker._redis, broker._keys.prefix + "*")
            gone += await _delete(broker._redis, f"arq:*{ns}*")
            log.info("cleaned up", keys=gone)
    return Result(genq_lat, arq_lat, genq_dr, arq_dr, arq_uncapped, ping, (load_before, os.getloadavg()[0]))


def summary(r: Result) -> str:
    f = r.figures
    return (
        f"genq bench queue: latency p50 {f['g50']:.2f} ms / p99 {f['g99']:.2f} ms "
        f"(arq {f['a50']:.0f} / {f['a99']:.0f} ms, {f['a50'] / f['g50']:.0f}x / {f['a99'] / f['g99']:.0f}x faster); "
        f"drain {f['g_rate']:,.0f} jobs/s (arq {f['a_rate']:,.0f} jobs/s, {f['g_rate'] / f['a_rate']:.1f}x)"
    )


def report(r: Result, cfg: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    f = r.figures
    ok = lambda met: "[green]met[/]" if met else "[red]missed[/]"  # noqa: E731
    t = Table("measure", "genq", "arq 0.28", "ratio", "goal", title=f"genq bench queue on {cfg.redis_url}")
    t.add_row(
        "latency p50",
        f"{f['g50']:.2f} ms",
        f"{f['a50']:.0f} ms",
        f"{f['a50'] / f['g50']:.0f}x",
        f"≤ 2 ms: {ok(f['g50'] <= 2)}",
    )
    t.add_row(
        "latency p99",
        f"{f['g99']:.2f} ms",
        f"{f['a99']:.0f} ms",
        f"{f['a99'] / f['g99']:.0f}x",
        f"≤ 10 ms: {ok(f['g99'] <= 10)}",
    )
    t.add_row("  samples", str(len(r.genq_latency_ms)), str(len(r.arq_latency_ms)), "", "")
    t.add_row(
        "  PING, same gaps",
        f"{percentile(r.ping_ms, 50):.2f} / {percentile(r.ping_ms, 99):.2f} ms",
        "",
        "",
        "p50 / p99",
    )
    t.add_row(
        "drain jobs/s",
        f"{f['g_rate']:,.0f}",
        f"{f['a_rate']:,.0f}",
        f"{f['g_rate'] / f['a_rate']:.1f}x",
        f"≥ 10x: {ok(f['g_rate'] >= 10 * f['a_rate'])}",
    )
    t.add_row(
        "  jobs in seconds",
        f"{r.genq_drain[0]:,} in {r.genq_drain[1]:.2f}",
        f"{r.arq_drain[0]:,} in {r.arq_drain[1]:.2f}",
        "",
        "",
    )
    t.add_row("  arq, no read cap", "", f"{f['u_rate']:,.0f}", f"{f['g_rate'] / f['u_rate']:.1f}x", "")
    console = Console()
    console.print(t)
    console.print(
        "Latency = job start - enqueue call start (time.time_ns), idle consumer in its own process: genq claims, "
        "else blocks in BLPOP; arq is a stock Worker (poll_delay 0.5 s). "
        f"Drain = first enqueue -> last completion of no-op jobs, consumer in its own process: genq "
        f"{cfg.producers} x admit_many({cfg.admit_chunk}), worker with {cfg.consumers} x claim({BATCH}) + "
        f"complete_many; arq 32 concurrent enqueue_job, Worker(max_jobs={BATCH}), stock queue_read_limit "
        f"(max(5 x max_jobs, 100) ids per 0.5 s poll) and lifted to {cfg.arq_jobs:,}. "
        f"Load average {r.load[0]:.2f} before, {r.load[1]:.2f} after, {os.cpu_count()} CPUs."
    )


def main(cfg: Config) -> None:
    result = asyncio.run(run(cfg))
    report(result, cfg)
    import typer

    typer.echo(summary(result))
