"""``python -m benchmarks batchcost``: the Redis CPU a job costs streamed, and written once.

A batch line has nobody following it token by token, so its job is unstreamed
(``JobSpec.stream`` false): the worker writes its output once, with its completion,
instead of a fenced append (job hash, output, XADD, PUBLISH) every flush. This
measures what that saves, on a private ``redis-server`` (AOF ``everysec``, as
production runs) started on a free port and stopped after:

- one worker (:class:`worker.loop.Worker`, its real streamer and lease keeper) on the
  simulated engine, in this process; ``tokens_per_s`` per sequence sets the engine step;
- N jobs of T tokens admitted at once (``admit_many``), run to completion, once
  streamed and once unstreamed, each phase in a queue namespace of its own;
- Redis CPU = ``INFO cpu`` (``used_cpu_sys`` + ``used_cpu_user``) delta from just before
  the admission to the last completion, so admission, claims, renewals, heartbeats and
  reaps are counted in both phases; commands = ``INFO commandstats`` delta (Redis counts
  the commands a script runs, and the script call itself), ``INFO`` excluded.

Nobody follows either phase's jobs: a PUBLISH reaches no subscriber (a streamed job's
SSE followers cost the API, and Redis a little more per delta, on top of this).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aredis
import structlog

from benchmarks.redis_server import servers
from broker import Broker, BrokerSettings, JobSpec
from broker.client import Completion
from broker.models import JobStatus
from worker.engine.base import EngineSettings
from worker.engine.simulated import SimulatedEngine
from worker.loop import Worker
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

MODEL = "bench-batchcost"


@dataclass(frozen=True, slots=True)
class Config:
    jobs: int = 200
    tokens: int = 128  # per job (the simulated engine has no EOS: every job makes exactly this many)
    tokens_per_s: float = 50.0  # per sequence: one token per engine step of 1000 / tokens_per_s ms
    capacity: int = 64  # engine sequence slots
    flush_interval_ms: int = 20  # the worker's default
    flush_writes_per_s: int = 2_000  # the worker's default (0: the window never widens)
    checkpoint_interval_ms: int = 5_000  # the worker's default
    timeout_s: float = 300.0  # per phase

    @classmethod
    def quick(cls) -> Config:
        return cls(jobs=8, tokens=16, tokens_per_s=400.0, capacity=8, timeout_s=60.0)


@dataclass(slots=True)
class Phase:
    stream: bool
    jobs: int
    wall_s: float
    cpu_s: float
    commands: dict[str, int]  # per command name, calls in the phase
    token_events: int  # in all the phase's event streams
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(self.commands.values())

    def per_job(self, value: float) -> float:
        return value / self.jobs


class CountingBroker(Broker):
    """Tells when ``target`` completions were written (the benchmark never reads Redis to wait)."""

    target = 0
    completed = 0
    all_done: asyncio.Event

    def expect(self, n: int) -> None:
        self.target, self.completed, self.all_done = n, 0, asyncio.Event()

    async def complete_batch(self, items: Sequence[Completion]) -> dict[str, bool]:
        written = await super().complete_batch(items)  # the worker finishes jobs through this
        self.completed += sum(written.values())
        if self.completed >= self.target:
            self.all_done.set()
        return written


async def _snapshot(admin: aredis.Redis) -> tuple[float, dict[str, int]]:
    cpu = await admin.info("cpu")
    stats = await admin.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), calls


# -- one phase ------------------------------------------------------------------------------------
async def phase(redis_url: str, cfg: Config, *, stream: bool) -> Phase:
    queue = "bench" + secrets.token_hex(4)
    settings = BrokerSettings(redis_url=redis_url, queue=queue, models=[MODEL])
    broker = CountingBroker.from_settings(settings)
    admin = aredis.Redis.from_url(redis_url, decode_responses=True)
    step_ms = 1000 / cfg.tokens_per_s
    es = EngineSettings(
        kind="simulated",
        served_model_name=MODEL,
        max_num_seqs=cfg.capacity,
        sim_step_ms=step_ms,
        sim_step_ms_per_seq=0.0,  # the rate per sequence is tokens_per_s, however many run
    )
    ws = WorkerSettings(
        engine="simulated",
        served_model_name=MODEL,
        flush_interval_ms=cfg.flush_interval_ms,
        flush_writes_per_s=cfg.flush_writes_per_s,
        checkpoint_interval_ms=cfg.checkpoint_interval_ms,
    )
    specs = [
        JobSpec(
            tenant="bench", model=MODEL, kind="completion", prompt=f"line {i}", max_tokens=cfg.tokens, stream=stream
        )
        for i in range(cfg.jobs)
    ]
    try:
        async with SimulatedEngine(es) as engine:
            worker = Worker(broker, engine, ws)
            task = asyncio.create_task(worker.run())
            await asyncio.wait_for(worker.started.wait(), 30)
            broker.expect(1)
            await broker.admit(specs[0].model_copy(update={"prompt": "warm-up"}))  # scripts loaded, worker warm
            await asyncio.wait_for(broker.all_done.wait(), 30)
            broker.expect(cfg.jobs)
            cpu0, calls0 = await _snapshot(admin)
            t0 = time.perf_counter()
            admitted = await broker.admit_many(specs)
            refused = [a for a in admitted if isinstance(a, Exception)]
            if refused:
                raise SystemExit(f"{len(refused)} jobs refused: {refused[0]!r}")
            await asyncio.wait_for(broker.all_done.wait(), cfg.timeout_s)
            wall = time.perf_counter() - t0
            cpu1, calls1 = await _snapshot(admin)
            worker.stop()
            await asyncio.wait_for(task, 30)
        commands = {k: n - calls0.get(k, 0) for k, n in calls1.items() if k != "info" and n > calls0.get(k, 0)}
        ids = [a.job_id for a in admitted if not isinstance(a, Exception)]
        events = await _check(broker, ids, cfg.tokens)
        return Phase(stream, cfg.jobs, wall, cpu1 - cpu0, commands, events)
    finally:
        await broker.drop_namespace()
        await broker.close()
        await admin.aclose()


async def _check(broker: Broker, ids: list[str], tokens: int) -> int:
    """Every job succeeded with all its tokens; returns the token events they wrote (read after the phase)."""
    events = 0
    async with broker.event_hub() as hub:
        for jid in ids:
            job = await broker.get_job(jid)
            if job.status is not JobStatus.SUCCEEDED or job.completion_tokens != tokens:
                raise SystemExit(f"job {jid} ended {job.status} with {job.completion_tokens} tokens")
            events += sum(1 for e in await hub.backlog(jid) if e.type == "token")
    return events


AOF = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")  # as deployed


async def run(cfg: Config) -> tuple[Phase, Phase, str]:
    """Both phases on one private Redis; returns them and the Redis URL (the server is gone by then)."""
    async with servers(1, cluster=False, extra_args=AOF) as (port,):
        url = f"redis://127.0.0.1:{port}/0"
        log.info("batchcost", redis=url, jobs=cfg.jobs, tokens=cfg.tokens, tokens_per_s=cfg.tokens_per_s)
        streamed = await phase(url, cfg, stream=True)
        unstreamed = await phase(url, cfg, stream=False)
    return streamed, unstreamed, url


# -- the report ---------------------------------------------------------------------------------------
def summary(cfg: Config, s: Phase, u: Phase) -> str:
    cpu_s, cpu_u = s.per_job(s.cpu_s) * 1e6, u.per_job(u.cpu_s) * 1e6
    cmd_s, cmd_u = s.per_job(s.calls), u.per_job(u.calls)
    return (
        f"genq bench batchcost: {cfg.jobs} jobs x {cfg.tokens} tokens; Redis CPU per job streamed {cpu_s:,.0f} us, "
        f"unstreamed {cpu_u:,.0f} us ({cpu_s / cpu_u:.1f}x less, {cpu_s - cpu_u:,.0f} us saved per line); "
        f"commands per job {cmd_s:,.1f} / {cmd_u:,.1f} ({cmd_s / cmd_u:.1f}x fewer)"
    )


def report(cfg: Config, s: Phase, u: Phase, url: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("per job", "streamed", "unstreamed", "ratio", title="genq bench batchcost")

    def cmd(p: Phase, name: str) -> float:
        return p.per_job(p.commands.get(name, 0))

    rows: list[tuple[str, float, float, str]] = [
        ("Redis CPU, us", s.per_job(s.cpu_s) * 1e6, u.per_job(u.cpu_s) * 1e6, ",.0f"),
        ("Redis commands", s.per_job(s.calls), u.per_job(u.calls), ",.1f"),
        ("  Lua script calls", cmd(s, "evalsha"), cmd(u, "evalsha"), ",.1f"),
        ("  XADD", cmd(s, "xadd"), cmd(u, "xadd"), ",.1f"),
        ("  PUBLISH", cmd(s, "publish"), cmd(u, "publish"), ",.1f"),
        ("token events", s.per_job(s.token_events), u.per_job(u.token_events), ",.1f"),
    ]
    for name, a, b, fmt in rows:
        t.add_row(name, format(a, fmt), format(b, fmt), f"{a / b:.1f}x" if b else "")
    t.add_row("phase wall time, s", f"{s.wall_s:.2f}", f"{u.wall_s:.2f}", "")
    console = Console(soft_wrap=True)
    console.print(t)
    console.print(
        f"Private redis-server {url} (AOF everysec; stopped after). "
        f"{cfg.jobs} jobs x {cfg.tokens} tokens at {cfg.tokens_per_s:g} tokens/s per sequence, {cfg.capacity} "
        f"engine slots, flush every {cfg.flush_interval_ms} ms (widened to ~{cfg.flush_writes_per_s:,} writes/s; "
        f"0 = never), unstreamed checkpoint every "
        f"{cfg.checkpoint_interval_ms} ms; one worker (simulated engine) in this process; Redis CPU = INFO cpu "
        "sys+user delta from admission to the last completion (claims, renewals, heartbeats included); "
        "commands = INFO commandstats delta (a script's own commands included), INFO excluded.",
        highlight=False,
    )


def main(cfg: Config) -> None:
    import typer

    streamed, unstreamed, url = asyncio.run(run(cfg))
    report(cfg, streamed, unstreamed, url)
    typer.echo(summary(cfg, streamed, unstreamed))
