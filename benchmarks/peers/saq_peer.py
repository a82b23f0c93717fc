"""SAQ 0.26.4 (its own venv; imports typing_extensions without declaring it): ``enqueue`` from
20 concurrent tasks (SAQ has no bulk enqueue; 20 is its ``max_concurrent_ops``), a Worker with
concurrency 16; finished jobs kept for their default ttl (600 s)."""

from __future__ import annotations

import asyncio
from typing import Any

from proto import Tally, argv, say, serve_producer, until_stdin_closes
from saq import Queue, Worker

NAME, ENQUEUERS, CONCURRENCY = "bench", 20, 16


async def producer(url: str) -> None:
    queue = Queue.from_url(url, name=NAME)
    await queue.connect()
    try:

        async def probe() -> str:
            job = await queue.enqueue("noop")
            assert job is not None
            return str(job.key)

        async def bulk(n: int) -> None:
            ids = iter(range(n))

            async def one() -> None:
                for _ in ids:
                    if await queue.enqueue("noop") is None:
                        raise RuntimeError("saq refused a job")

            await asyncio.gather(*(one() for _ in range(ENQUEUERS)))

        await serve_producer(probe, bulk)
    finally:
        await queue.disconnect()


async def consumer(url: str, expect: int) -> None:
    tally = Tally(expect)

    async def noop(ctx: Any) -> None:
        tally.started(ctx["job"].key)

    async def after_process(ctx: Any) -> None:
        tally.finished()

    queue = Queue.from_url(url, name=NAME)
    await queue.connect()
    worker = Worker(queue, [("noop", noop)], concurrency=CONCURRENCY, after_process=after_process)
    run = asyncio.ensure_future(worker.start())
    say("ready")
    await asyncio.wait([run, asyncio.ensure_future(until_stdin_closes())], return_when=asyncio.FIRST_COMPLETED)
    await worker.stop()
    await queue.disconnect()


def main() -> None:
    role, url, expect = argv()
    asyncio.run(producer(url) if role == "producer" else consumer(url, expect))


if __name__ == "__main__":
    main()
