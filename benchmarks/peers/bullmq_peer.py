"""BullMQ for Python (PyPI ``bullmq`` 3.4, redis-py >= 6.2, its own venv): ``addBulk`` in chunks
of 1,000, a Worker with concurrency 128; completed jobs kept (``removeOnComplete`` unset, the default)."""

from __future__ import annotations

import asyncio
from typing import Any

from bullmq import Queue, Worker
from proto import Tally, argv, say, serve_producer, until_stdin_closes

NAME, CHUNK, CONCURRENCY = "bench", 1000, 128


async def producer(url: str) -> None:
    queue = Queue(NAME, {"connection": url})
    try:

        async def probe() -> str:
            return str((await queue.add("noop", {})).id)

        async def bulk(n: int) -> None:
            for start in range(0, n, CHUNK):
                await queue.addBulk([{"name": "noop", "data": {}}] * min(CHUNK, n - start))

        await serve_producer(probe, bulk)
    finally:
        await queue.close()


async def consumer(url: str, expect: int) -> None:
    tally = Tally(expect)

    async def process(job: Any, token: str) -> None:
        tally.started(job.id)

    worker = Worker(NAME, process, {"connection": url, "concurrency": CONCURRENCY, "autorun": False})
    worker.on("completed", lambda job, result: tally.finished())
    run = asyncio.ensure_future(worker.run())
    say("ready")
    await asyncio.wait([run, asyncio.ensure_future(until_stdin_closes())], return_when=asyncio.FIRST_COMPLETED)
    await worker.close()


def main() -> None:
    role, url, expect = argv()
    asyncio.run(producer(url) if role == "producer" else consumer(url, expect))


if __name__ == "__main__":
    main()
