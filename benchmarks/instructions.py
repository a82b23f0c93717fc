"""``python -m benchmarks instructions``: the instructions redis-server runs per job step and per
streamed delta, counted by valgrind's callgrind.

Redis CPU time (``bench redis``) swings 2x on a shared machine, even between alternating runs of
the same code; an instruction count does not: the same workload gives the same count whatever
else the machine does (within 0.1 % here). It is not a time: a cache miss costs no more than an
add. So this bench compares two versions of the scripts, it does not replace ``bench redis``.

Each workload runs on a fresh redis-server under callgrind, through the broker's public API, and
the count of the same server doing nothing (start, one model registered, shutdown) is taken off:

- **lifecycle**: N jobs admitted (``admit_many`` of 100), claimed 32 at a time, completed with no
  output; admit alone and admit + claim give the steps;
- **deltas**: C jobs streaming at once, R flushes of one one-token write per job (``append_many``),
  less the same jobs with no flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from benchmarks.redis_cost import MODEL, bench_spec, claim_all
from benchmarks.redis_server import SERVER_ARGS, free_port, ready, redis_server_binary
from broker.client import Broker, OutputWrite
from broker.settings import BrokerSettings

Workload = Callable[[Broker], Awaitable[None]]


@dataclass(frozen=True)
class Config:
    jobs: int = 2000
    streams: int = 128
    rounds: int = 200

    @classmethod
    def quick(cls) -> Config:
        return cls(jobs=50, streams=8, rounds=5)


def _total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {path}")


async def _drive(port: int, workload: Workload) -> None:
    probe = Redis(port=port)
    try:
        await ready(probe, timeout_s=120.0)  # a server under valgrind starts slowly
        settings = BrokerSettings(
            redis_url=f"redis://127.0.0.1:{port}", queue="bench", models=[MODEL], lease_ms=600_000
        )
        async with Broker.from_settings(settings) as broker:
            await broker.register_model(MODEL, 0)
            await workload(broker)
        with contextlib.suppress(ConnectionError):  # the server closes the connection as it stops
            await probe.shutdown(nosave=True)
    finally:
        await probe.aclose()


def count(workload: Workload) -> int:
    """Instructions a fresh redis-server runs for ``workload`` (start and stop included)."""
    with tempfile.TemporaryDirectory(prefix="genq-bench-callgrind-") as tmp:
        out, port = Path(tmp) / "callgrind.out", free_port(False)
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", redis_server_binary()]
        cmd += ["--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, *SERVER_ARGS]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_drive(port, workload))
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return _total(out)


def _jobs(n: int, *, claim: bool, complete: bool) -> Workload:
    async def run(broker: Broker) -> None:
        specs = [bench_spec(i) for i in range(n)]
        for i in range(0, n, 100):
            await broker.admit_many(specs[i : i + 100])
        if claim:
            leases = await claim_all(broker, n, 32)
            if complete:
                for i in range(0, n, 32):
                    await broker.complete_many(leases[i : i + 32], "stop")

    return run


def _streams(n: int, rounds: int) -> Workload:
    async def run(broker: Broker) -> None:
        await broker.admit_many([bench_spec(i) for i in range(n)])
        leases = await claim_all(broker, n, 128)
        for r in range(rounds):
            await broker.append_many([OutputWrite(le.id, le.fence, "tok ", [100], r) for le in leases])
        await broker.complete_many(leases, "length")

    return run


async def _nothing(broker: Broker) -> None:
    return None


def lines(cfg: Config) -> list[str]:
    idle = count(_nothing)
    admit = count(_jobs(cfg.jobs, claim=False, complete=False))
    claim = count(_jobs(cfg.jobs, claim=True, complete=False))
    whole = count(_jobs(cfg.jobs, claim=True, complete=True))
    still = count(_streams(cfg.streams, 0))
    flowing = count(_streams(cfg.streams, cfg.rounds))
    n = cfg.jobs
    steps = f"admit {(admit - idle) / n:,.0f}, claim {(claim - admit) / n:,.0f}, complete {(whole - claim) / n:,.0f}"
    per_delta = (flowing - still) / (cfg.streams * cfg.rounds)
    return [
        f"lifecycle ({n} jobs): {(whole - idle) / n:,.0f} instructions per job ({steps})",
        f"deltas, {cfg.streams} streaming jobs, 1 token each: {per_delta:,.0f} instructions per delta",
    ]


def main(cfg: Config) -> None:
    import typer

    if shutil.which("valgrind") is None:
        raise typer.BadParameter("valgrind is not on PATH (Debian: apt-get install valgrind)")
    for line in lines(cfg):
        typer.echo("genq bench instructions: " + line)
