"""arq 0.28 as shipped: ``enqueue_job`` (32 concurrent for ``bulk``), a Worker with the stock
max_jobs=100 and poll_delay 0.5 s. Runs in genq's own venv (arq needs redis-py < 6)."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func
from proto import Tally, argv, say, serve_producer, until_stdin_closes

ENQUEUERS = 32


async def producer(url: str) -> None:
    pool = await create_pool(RedisSettings.from_dsn(url))
    try:

        async def probe() -> str:
            job = await pool.enqueue_job("noop")
            assert job is not None
            return job.job_id

        async def bulk(n: int) -> None:
            ids = iter(range(n))

            async def one() -> None:
                for _ in ids:
                    if await pool.enqueue_job("noop") is None:
                        raise RuntimeError("arq refused a job")

            await asyncio.gather(*(one() for _ in range(ENQUEUERS)))

        await serve_producer(probe, bulk)
    finally:
        await pool.aclose()


async def consumer(url: str, expect: int) -> None:
    tally = Tally(expect)

    async def noop(ctx: dict[str, Any]) -> None:
        tally.started(ctx["job_id"])

    async def on_startup(ctx: dict[str, Any]) -> None:
        say("ready")

    async def after_job_end(ctx: dict[str, Any]) -> None:
        tally.finished()

    worker = Worker(
        [func(noop, name="noop")],
        redis_settings=RedisSettings.from_dsn(url),
        handle_signals=False,
        on_startup=on_startup,
        after_job_end=after_job_end,
    )
    run = asyncio.create_task(worker.async_run())
    await asyncio.wait([run, asyncio.create_task(until_stdin_closes())], return_when=asyncio.FIRST_COMPLETED)
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    with suppress(asyncio.CancelledError):  # job tasks cancelled with the run loop, after they reported
        await worker.close()


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)  # arq logs two INFO lines per job; a quiet deployment drops them
    role, url, expect = argv()
    asyncio.run(producer(url) if role == "producer" else consumer(url, expect))


if __name__ == "__main__":
    main()
