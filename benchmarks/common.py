"""Plumbing shared by the benchmarks: percentiles, child processes that talk over a pipe, a private Redis."""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(p / 100 * len(ordered))) - 1)]


def spawn(target: Any, *args: Any) -> tuple[mp.Process, Connection]:
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
    proc.start()
    theirs.close()
    return proc, ours


async def recv(conn: Connection, timeout_s: float) -> Any:
    """The next message from a child (or the parent), without blocking the loop or polling."""
    if not conn.poll():
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        loop.add_reader(conn.fileno(), ready.set)
        try:
            await asyncio.wait_for(ready.wait(), timeout_s)
        finally:
            loop.remove_reader(conn.fileno())
            os.set_blocking(conn.fileno(), True)  # uvloop made it non-blocking; Connection.send needs blocking
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError("a benchmark process exited early; its traceback is above") from None


async def expect(conn: Connection, what: str, timeout_s: float) -> Any:
    tag, value = await recv(conn, timeout_s)
    if tag != what:
        raise RuntimeError(f"child said {tag!r} ({value!r}), expected {what!r}")
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of this run only (AOF everysec, noeviction, nothing saved), stopped after."""
    from genq.up import redis_binary

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="genq-bench-redis-") as d:
        cmd = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", ""]
        cmd += ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(port, proc)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    import redis as redis_sync

    client = redis_sync.Redis(port=port)
    deadline = time.monotonic() + timeout_s
    while True:  # a child process starting: nothing to wait on but its port
        try:
            if client.ping():
                return
        except redis_sync.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"redis-server on port {port} did not start (exit code {proc.poll()})")
        time.sleep(0.02)
