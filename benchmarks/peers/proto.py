"""The line protocol between ``benchmarks.peers_bench`` and a peer's producer or consumer.

Standard library only: every peer's venv imports it (the script's folder is on ``sys.path``).

A peer script is ``<script> producer|consumer <redis-url> [expect]``:

- a **producer** says ``ready``, then answers commands read from stdin, one per line:
  ``probe`` -> enqueue one job, say ``sent <job id> <t0 ns>`` (t0 taken just before the enqueue
  call); ``bulk <n>`` -> enqueue n no-op jobs the system's fastest way, say
  ``bulked <n> <t0 ns> <t1 ns>``. It exits when stdin closes.
- a **consumer** starts the system's worker and says ``ready``; with ``expect`` 0 it says
  ``start <job id> <t ns>`` when each job starts; with ``expect`` N it says
  ``drained <first start ns> <last finish ns>`` once N jobs have finished. It exits when stdin closes.

Times are ``time.time_ns()``, the one clock comparable across processes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


def say(*parts: Any) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def argv() -> tuple[str, str, int]:
    role, url = sys.argv[1], sys.argv[2]
    return role, url, int(sys.argv[3]) if len(sys.argv) > 3 else 0


async def commands() -> AsyncIterator[list[str]]:
    """Lines of stdin, split; ends when the parent closes it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip():
            yield line.decode().split()


async def serve_producer(probe: Callable[[], Awaitable[str]], bulk: Callable[[int], Awaitable[None]]) -> None:
    say("ready")
    async for cmd in commands():
        if cmd[0] == "probe":
            t0 = time.time_ns()
            say("sent", await probe(), t0)
        elif cmd[0] == "bulk":
            n, t0 = int(cmd[1]), time.time_ns()
            await bulk(n)
            say("bulked", n, t0, time.time_ns())


class Tally:
    """What a consumer reports: each start (``expect`` 0) or the drain's first start and last finish."""

    def __init__(self, expect: int) -> None:
        self.expect, self.done, self.first_ns = expect, 0, 0

    def started(self, job_id: Any) -> None:
        if not self.expect:
            say("start", job_id, time.time_ns())
        elif not self.first_ns:
            self.first_ns = time.time_ns()

    def finished(self, n: int = 1) -> None:
        self.done += n
        if self.expect and self.done >= self.expect and self.done - n < self.expect:
            say("drained", self.first_ns, time.time_ns())


async def until_stdin_closes() -> None:
    async for _ in commands():
        pass
