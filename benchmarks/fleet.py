"""``python -m benchmarks fleet``: drain throughput of K simulated-engine workers, and what limits it.

For each K (1, 2, 4, 8) and each topology (one private ``redis-server``; a private 3-master
Cluster), K ``python -m worker.main --engine simulated`` processes start and register on an
empty queue; then N jobs are admitted at once through the broker (``admit_many``) and the
workers drain them. Measured per step:

- **jobs/s** from the first job's start to the last job's end (Redis clock: the jobs' own
  ``started_ms`` / ``finished_ms``), so worker start-up is not counted;
- **Redis CPU**, % of one core (``INFO cpu``), per shard on the Cluster; CPU figures are
  over the window from the first admission to the drain seen complete;
- **worker CPU**, % of one core per worker (psutil), the bench process's own CPU
  (admission), and the cores busy machine-wide ("busy": everything, genq's or not);
- the machine's cores and load average, since everything shares them.

No API process is in the drain path (jobs go in through the broker), so API CPU is not a
factor here; ``python -m benchmarks sse`` measures one API process.

The engine is fast on purpose (many slots, 1 ms steps, 16 tokens a job) so that the step
time is not the limit; the "limit" column names the resource nearest to saturation.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import psutil
import structlog

from benchmarks.redis_server import counters, servers
from broker.client import Broker
from broker.contract import JobSpec
from broker.models import JobStatus
from broker.settings import BrokerSettings

log = structlog.get_logger(__name__)
MODEL = "bench-fleet"
ROOT = Path(__file__).resolve().parent.parent
SATURATED = 0.8  # a process at 80 % of a core or more is the limit


@dataclass
class Config:
    jobs: int = 2000
    workers: tuple[int, ...] = (1, 2, 4, 8)
    max_tokens: int = 16
    max_num_seqs: int = 128
    step_ms: float = 1.0
    cluster: bool = True

    @classmethod
    def quick(cls) -> Config:
        return cls(jobs=60, workers=(1, 2), cluster=False)


@dataclass
class Step:
    topology: str
    workers: int
    jobs: int
    drain_s: float
    redis_cpu: list[float]  # fraction of a core, per node
    worker_cpu: list[float]  # fraction of a core, per worker
    bench_cpu: float
    machine_busy: float  # cores busy machine-wide (every process, genq's or not)
    load: tuple[float, float, float] = field(default_factory=lambda: os.getloadavg())

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.drain_s

    def limit(self) -> str:
        hot_redis = max(self.redis_cpu)
        hot_worker = max(self.worker_cpu)
        used = sum(self.redis_cpu) + sum(self.worker_cpu) + self.bench_cpu
        cores = psutil.cpu_count() or 1
        if hot_redis >= SATURATED and hot_redis >= hot_worker:
            return "Redis" + (f" (shard {self.redis_cpu.index(hot_redis)})" if len(self.redis_cpu) > 1 else "")
        if self.machine_busy >= 0.9 * cores:
            return f"machine CPU ({self.machine_busy:.1f} of {cores} cores busy, {used:.1f} of them genq's)"
        if hot_worker >= SATURATED:
            return "worker CPU"
        return "none saturated (engine steps / shared machine)"


def _worker_cmd(cfg: Config) -> list[str]:
    return [
        sys.executable,
        *("-m", "worker.main", "--engine", "simulated", "--served-model-name", MODEL),
        *("--max-num-seqs", str(cfg.max_num_seqs), "--sim-step-ms", str(cfg.step_ms)),
        *("--sim-step-ms-per-seq", "0", "--heartbeat-s", "1"),
    ]


async def _wait_registered(broker: Broker, count: int, procs: Sequence[asyncio.subprocess.Process]) -> None:
    deadline = time.monotonic() + 120
    while len(await broker.workers()) < count:
        if any(p.returncode is not None for p in procs):
            raise RuntimeError("a bench worker exited during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError("bench workers did not register within 120 s")
        await asyncio.sleep(0.1)  # other processes coming up: poll their heartbeats


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _busy_cores(before: Any, after: Any, wall: float) -> float:
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    total = sum(after) - sum(before)
    return (psutil.cpu_count() or 1) * (1 - idle / total) if total > 0 else 0.0


async def drain(url: str, ports: Sequence[int], topology: str, k: int, cfg: Config) -> Step:
    queue = "fleet" + secrets.token_hex(4)
    settings = BrokerSettings(redis_url=url, queue=queue, models=[MODEL])
    env = {**os.environ, "GENQ_REDIS_URL": url, "GENQ_QUEUE": queue, "GENQ_MODELS": f'["{MODEL}"]'}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    async with Broker.from_settings(settings) as broker:
        await broker.register_model(MODEL, 0)
        specs = [
            JobSpec(tenant=f"t{i % 4}", model=MODEL, prompt=f"job {i}", kind="completion", max_tokens=cfg.max_tokens)
            for i in range(cfg.jobs)
        ]
        procs = [
            await asyncio.create_subprocess_exec(*_worker_cmd(cfg), env=env, stdout=DEVNULL, stderr=DEVNULL)
            for _ in range(k)
        ]
        try:
            await _wait_registered(broker, k, procs)
            watched = [psutil.Process(p.pid) for p in procs]
            me = psutil.Process()
            cpu0 = [_cpu_s(w) for w in watched]
            bench0, machine0 = _cpu_s(me), psutil.cpu_times()
            redis0, t0 = await counters(ports), time.monotonic()
            ids: list[str] = []
            for i in range(0, cfg.jobs, 250):
                for adm in await broker.admit_many(specs[i : i + 250]):
                    if isinstance(adm, BaseException):
                        raise adm
                    ids.append(adm.job_id)
            deadline = time.monotonic() + 600
            while (stats := await broker.queue_stats(MODEL)).total_depth or stats.running:
                if time.monotonic() > deadline:
                    raise RuntimeError("the drain did not finish within 600 s")
                await asyncio.sleep(0.05)  # other processes' progress, in Redis: poll it
            wall = time.monotonic() - t0
            redis1 = await counters(ports)
            cpu1 = [_cpu_s(w) for w in watched]
            bench_cpu = (_cpu_s(me) - bench0) / wall
            machine = _busy_cores(machine0, psutil.cpu_times(), wall)
            jobs = []
            for i in range(0, len(ids), 500):
                jobs += await asyncio.gather(*(broker.get_job(j) for j in ids[i : i + 500]))
            if bad := [j for j in jobs if j.status is not JobStatus.SUCCEEDED]:
                raise RuntimeError(f"{len(bad)} jobs did not succeed, e.g. {bad[0].id}: {bad[0].status}")
            start = min(j.started_ms for j in jobs if j.started_ms is not None)
            end = max(j.finished_ms for j in jobs if j.finished_ms is not None)
            return Step(
                topology,
                k,
                len(jobs),
                (end - start) / 1000,
                [(b[0] - a[0]) / wall for a, b in zip(redis0, redis1, strict=True)],
                [(b - a) / wall for a, b in zip(cpu0, cpu1, strict=True)],
                bench_cpu,
                machine,
            )
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            for p in procs:
                try:
                    await asyncio.wait_for(p.wait(), 30)
                except TimeoutError:
                    p.kill()
                    await p.wait()
            await broker.drop_namespace()


async def run(cfg: Config) -> list[Step]:
    steps: list[Step] = []
    topologies = [("redis", 1, False)] + ([("cluster", 3, True)] if cfg.cluster else [])
    for name, count, cluster in topologies:
        async with servers(count, cluster=cluster) as ports:
            url = ("redis+cluster://" if cluster else "redis://") + ",".join(f"127.0.0.1:{p}" for p in ports)
            for k in cfg.workers:
                step = await drain(url, ports, name, k, cfg)
                log.info("bench fleet: step", topology=name, workers=k, jobs_per_s=round(step.jobs_per_s))
                steps.append(step)
    return steps


def lines(steps: Sequence[Step], cfg: Config) -> list[str]:
    cores = psutil.cpu_count()
    out = [
        f"{cfg.jobs} jobs per step, {cfg.max_tokens} tokens each, simulated engine: {cfg.max_num_seqs} slots, "
        f"{cfg.step_ms:g} ms steps; {cores} cores, shared with whatever else runs on this machine",
        f"{'topology':<8} {'workers':>7} {'jobs/s':>8} {'drain s':>8}  {'Redis CPU (per shard)':<22} "
        f"{'worker CPU avg/max':<19} {'bench':>6} {'busy':>5} {'load 1m':>7}  limit",
    ]
    for s in steps:
        redis = " / ".join(f"{c:.0%}" for c in s.redis_cpu)
        worker = f"{sum(s.worker_cpu) / len(s.worker_cpu):.0%} / {max(s.worker_cpu):.0%}"
        out.append(
            f"{s.topology:<8} {s.workers:>7} {s.jobs_per_s:>8,.0f} {s.drain_s:>8.2f}  {redis:<22} {worker:<19} "
            f"{s.bench_cpu:>6.0%} {s.machine_busy:>5.2f} {s.load[0]:>7.2f}  {s.limit()}"
        )
    return out


def main(cfg: Config) -> None:
    import typer

    before = os.getloadavg()
    steps = asyncio.run(run(cfg))
    after = os.getloadavg()
    for line in lines(steps, cfg):
        typer.echo("genq bench fleet: " + line)
    typer.echo(
        "genq bench fleet: load average before "
        + " ".join(f"{v:.2f}" for v in before)
        + ", after "
        + " ".join(f"{v:.2f}" for v in after)
    )
