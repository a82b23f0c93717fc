"""Plumbing shared by the benchmarks: percentiles, child processes that talk over a pipe, a private Redis."""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
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
