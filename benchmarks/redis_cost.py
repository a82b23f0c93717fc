"""``python -m benchmarks redis``: what genq costs Redis, in CPU time and commands.

Wall-clock rates swing 2x on a shared machine; Redis's own CPU time (``INFO cpu``) and
command counts (``INFO commandstats``, commands run inside scripts included) do not. Every
phase runs through the broker's public API on a private ``redis-server`` (no persistence,
the settings of ``deploy/redis.conf`` that matter here), so nothing else's work is counted:

- **lifecycle**: N jobs admitted (``admit_many``), claimed 32 at a time, completed with no
  output (``complete_many``) — CPU µs and commands per job for each step, and the bytes
  Redis keeps per finished job;
- **deltas**: C jobs streaming at once (1 and 128), one fenced ``append_many`` flush per
  round carrying one write per job — CPU µs and commands per delta;
- the implied **workers per Redis core**: a worker streaming 128 sequences with a 20 ms flush
  sends 6,400 deltas/s;
- **cluster** (``--cluster``): the 128-stream phase on a 3-master Redis Cluster, with each
  shard's share of the CPU (a model's keys carry one hash tag today, so one shard takes it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from benchmarks.redis_server import Cost, measured, servers, used_memory
from broker.client import Broker, OutputWrite
from broker.contract import JobSpec
from broker.models import Lease
from broker.settings import BrokerSettings
from worker.settings import WorkerSettings
from worker.stream import flush_window

log = structlog.get_logger(__name__)
MODEL = "bench-model"
FLUSH_PER_S = 50  # one flush every 20 ms
SEQS_PER_WORKER = 128


@dataclass
class Config:
    jobs: int = 2000  # lifecycle phase
    rounds: int = 200  # flushes per delta phase
    streams: tuple[int, ...] = (1, 128)
    tokens_per_delta: int = 1
    cluster: bool = True

    @classmethod
    def quick(cls) -> Config:
        return cls(jobs=100, rounds=10, streams=(1, 8), cluster=False)


@dataclass
class Report:
    lifecycle: dict[str, Cost] = field(default_factory=dict)
    bytes_per_job: float = 0.0
    deltas: dict[int, Cost] = field(default_factory=dict)
    cluster_deltas: Cost | None = None


def bench_spec(i: int) -> JobSpec:
    return JobSpec(
        tenant=f"t{i % 4}", model=MODEL, kind="completion", prompt="Say something short about queues.", max_tokens=256
    )


async def claim_all(broker: Broker, n: int, batch: int) -> list[Lease]:
    leases: list[Lease] = []
    while len(leases) < n:
        got = await broker.claim(MODEL, "bench-worker", min(batch, n - len(leases)))
        if not got:
            raise RuntimeError(f"claimed {len(leases)} of {n}: the queue ran dry")
        leases += got
    return leases


async def lifecycle(broker: Broker, ports: Sequence[int], cfg: Config, report: Report) -> None:
    specs = [bench_spec(i) for i in range(cfg.jobs)]
    mem_before = await used_memory(ports)
    costs: dict[object, Cost] = {}
    async with measured(ports, cfg.jobs, costs, "admit"):
        for i in range(0, cfg.jobs, 100):
            await broker.admit_many(specs[i : i + 100])
    async with measured(ports, cfg.jobs, costs, "claim"):
        leases = await claim_all(broker, cfg.jobs, 32)
    async with measured(ports, cfg.jobs, costs, "complete"):
        for i in range(0, len(leases), 32):
            await broker.complete_many(leases[i : i + 32], "stop")
    report.bytes_per_job = (await used_memory(ports) - mem_before) / cfg.jobs
    report.lifecycle = {str(k): v for k, v in costs.items()}


async def deltas(broker: Broker, ports: Sequence[int], cfg: Config, streams: int, into: dict[object, Cost]) -> None:
    """``streams`` jobs streaming at once: ``cfg.rounds`` flushes of one write per job."""
    await broker.admit_many([bench_spec(i) for i in range(streams)])
    leases = await claim_all(broker, streams, 128)
    text, ids = "tok " * cfg.tokens_per_delta, list(range(100, 100 + cfg.tokens_per_delta))
    async with measured(ports, streams * cfg.rounds, into, streams):
        for r in range(cfg.rounds):
            offset = r * cfg.tokens_per_delta
            ok = await broker.append_many([OutputWrite(le.id, le.fence, text, ids, offset) for le in leases])
            if not all(ok.values()):
                raise RuntimeError("a bench write was refused: a lease lapsed")
    await broker.complete_many(leases, "length")


async def _broker_run(url: str, ports: Sequence[int], cfg: Config, report: Report, *, cluster: bool) -> None:
    settings = BrokerSettings(redis_url=url, queue="bench", models=[MODEL], lease_ms=600_000)
    async with Broker.from_settings(settings) as broker:
        await broker.register_model(MODEL, 0)
        if cluster:
            costs: dict[object, Cost] = {}
            await deltas(broker, ports, cfg, max(cfg.streams), costs)
            report.cluster_deltas = costs[max(cfg.streams)]
            return
        await lifecycle(broker, ports, cfg, report)
        streamed: dict[object, Cost] = {}
        for n in cfg.streams:
            await deltas(broker, ports, cfg, n, streamed)
        report.deltas = {int(str(k)): v for k, v in streamed.items()}


async def run(cfg: Config) -> Report:
    report = Report()
    async with servers(1, cluster=False) as ports:
        log.info("bench redis: one server", port=ports[0])
        await _broker_run(f"redis://127.0.0.1:{ports[0]}", ports, cfg, report, cluster=False)
    if cfg.cluster:
        async with servers(3, cluster=True) as ports:
            log.info("bench redis: 3-master cluster", ports=ports)
            url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
            await _broker_run(url, ports, cfg, report, cluster=True)
    return report


def workers_per_core(us_per_delta: float) -> float:
    return 1e6 / (SEQS_PER_WORKER * FLUSH_PER_S * us_per_delta)


def lines(r: Report, cfg: Config) -> list[str]:
    out = []
    total = sum(c.us_per for c in r.lifecycle.values())
    steps = ", ".join(f"{k} {c.us_per:.1f} µs / {c.commands_per:.1f} cmds" for k, c in r.lifecycle.items())
    kept = f"{r.bytes_per_job:,.0f} B kept"
    out.append(f"lifecycle ({cfg.jobs} jobs): {total:.1f} µs Redis CPU per job ({steps}); {kept}")
    for n, c in r.deltas.items():
        out.append(
            f"deltas, {n} streaming job(s), {cfg.tokens_per_delta} token(s) each: {c.us_per:.1f} µs and "
            f"{c.commands_per:.1f} commands per delta"
        )
    if r.deltas:
        widest = r.deltas[max(r.deltas)]
        out.append(
            f"implied: {workers_per_core(widest.us_per):.1f} workers ({SEQS_PER_WORKER} sequences, "
            f"{1000 // FLUSH_PER_S} ms flush) per Redis core"
        )
        ws = WorkerSettings()  # the worker's defaults: the window widens with the writes of a cycle
        window = flush_window(
            SEQS_PER_WORKER, ws.flush_interval_ms / 1000, ws.flush_max_interval_ms / 1000, ws.flush_writes_per_s
        )
        per_s = SEQS_PER_WORKER / window
        out.append(
            f"implied at the worker's default write budget ({SEQS_PER_WORKER} sequences -> a {window * 1000:.0f} ms "
            f"window, {per_s:,.0f} deltas/s): {1e6 / (per_s * widest.us_per):.1f} workers per Redis core"
        )
    if r.cluster_deltas is not None:
        c = r.cluster_deltas
        shares = " / ".join(f"{s:.0%}" for s in c.shares())
        out.append(
            f"cluster (3 masters), {max(cfg.streams)} streaming jobs: {c.us_per:.1f} µs per delta; "
            f"CPU share per shard {shares}"
        )
    return out


def main(cfg: Config) -> None:
    import typer

    report = asyncio.run(run(cfg))
    for line in lines(report, cfg):
        typer.echo("genq bench redis: " + line)
