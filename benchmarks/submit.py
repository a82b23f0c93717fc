"""``python -m benchmarks submit``: what one ``POST /v1/jobs`` costs Redis, through one ``genq api``.

A private ``redis-server`` (deploy/redis.conf's memory settings), one registered model, a
tenant with no limits and one API key; one ``genq api`` subprocess; ``warmup`` submits, then
``submits`` one at a time (httpx, one connection). Redis CPU (``INFO cpu``) and commands
(``INFO commandstats``: the commands a script runs are counted, and the script call itself)
per submit, by command, and the answer's wall time. Nothing else uses that Redis.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from benchmarks.common import percentile
from benchmarks.procs import Child, wait_http
from benchmarks.redis_server import free_port, servers
from broker import Broker, BrokerSettings
from broker.models import TenantLimits

MODEL = "bench-submit"


@dataclass(frozen=True, slots=True)
class Config:
    submits: int = 300
    warmup: int = 20

    @classmethod
    def quick(cls) -> Config:
        return cls(submits=20, warmup=5)


@dataclass
class Result:
    submits: int
    cpu_us: float
    commands: dict[str, int] = field(default_factory=dict)
    wall_ms: list[float] = field(default_factory=list)

    def per_submit(self, n: float) -> float:
        return n / self.submits


async def _stats(redis: Redis) -> tuple[float, dict[str, int]]:
    cpu = await redis.info("cpu")
    cmds = await redis.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmds.items()}
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), calls


async def run(cfg: Config) -> Result:
    import httpx

    from api.auth import create_key

    async with servers(1, cluster=False) as ports:
        url = f"redis://127.0.0.1:{ports[0]}"
        queue = "benchsubmit" + secrets.token_hex(4)
        async with Broker.from_settings(BrokerSettings(redis_url=url, queue=queue, models=[MODEL])) as broker:
            await broker.register_model(MODEL, 0)
            await broker.set_tenant("bench", TenantLimits())  # no limits
            key = await create_key(broker, "bench", "genq bench submit")
        env = {**os.environ, "GENQ_REDIS_URL": url, "GENQ_QUEUE": queue}
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="genq-bench-submit-") as tmp:
            api = Child.start("api", [sys.executable, "-m", "genq.cli", "api", "--port", str(port)], env, Path(tmp))
            try:
                base = f"http://127.0.0.1:{port}"
                await wait_http(api, base + "/healthz", 60)
                body = {"model": MODEL, "prompt": "Say something short about queues.", "max_tokens": 16}
                headers = {"Authorization": f"Bearer {key}"}
                admin = Redis(port=ports[0], decode_responses=True)
                async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
                    for _ in range(cfg.warmup):
                        (await client.post("/v1/jobs", json=body)).raise_for_status()
                    cpu0, calls0 = await _stats(admin)
                    wall = []
                    for _ in range(cfg.submits):
                        t0 = time.perf_counter()
                        r = await client.post("/v1/jobs", json=body)
                        wall.append((time.perf_counter() - t0) * 1000)
                        if r.status_code != 202:
                            raise RuntimeError(f"submit answered {r.status_code}: {r.text}")
                    cpu1, calls1 = await _stats(admin)
                await admin.aclose()
            finally:
                api.stop()
    calls = {k: v - calls0.get(k, 0) for k, v in calls1.items() if v - calls0.get(k, 0) > 0}
    calls["info"] = calls.get("info", 0) - 2  # this benchmark's own INFO cpu + commandstats
    return Result(cfg.submits, (cpu1 - cpu0) * 1e6, {k: v for k, v in calls.items() if v > 0}, wall)


def lines(r: Result) -> list[str]:
    total = sum(r.commands.values())
    top = sorted(r.commands.items(), key=lambda kv: -kv[1])
    by = ", ".join(f"{k} {r.per_submit(v):.2f}" for k, v in top)
    return [
        f"{r.submits} submits through one genq api: Redis CPU {r.per_submit(r.cpu_us):.1f} µs and "
        f"{r.per_submit(total):.2f} commands per submit ({by})",
        f"answer wall time p50 {percentile(r.wall_ms, 50):.2f} ms, p99 {percentile(r.wall_ms, 99):.2f} ms",
    ]


def main(cfg: Config) -> None:
    import typer

    for line in lines(asyncio.run(run(cfg))):
        typer.echo("genq bench submit: " + line)
