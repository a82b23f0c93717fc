"""genq through its broker API, as a worker's claim loops use it (run with the checkout on PYTHONPATH).

Producer: ``admit`` per probe; ``bulk``: 2 concurrent ``admit_many`` pipelines of 128 specs.
Consumer: 4 concurrent loops of ``claim(32)`` + ``complete_many``, each blocking on the model's
wake-up list (BLPOP) when the queue is empty, as ``worker`` does.
"""

from __future__ import annotations

import asyncio

from proto import Tally, argv, say, serve_producer, until_stdin_closes

from broker import Broker, BrokerSettings, JobSpec
from broker.logs import configure_logging
from broker.models import Admission

MODEL, QUEUE = "bench-model", "bench"
PRODUCERS, ADMIT_CHUNK, CONSUMERS, BATCH = 2, 128, 4, 32
SPEC = JobSpec(tenant="bench", model=MODEL, kind="completion", prompt="x", max_tokens=1)


def _broker(url: str) -> Broker:
    return Broker.from_settings(BrokerSettings(redis_url=url, queue=QUEUE, models=[MODEL]))


async def producer(url: str) -> None:
    async with _broker(url) as broker:
        await broker.register_model(MODEL, 0)

        async def probe() -> str:
            return (await broker.admit(SPEC)).job_id

        async def bulk(n: int) -> None:
            chunks = iter(range(0, n, ADMIT_CHUNK))

            async def one() -> None:
                for start in chunks:
                    for r in await broker.admit_many([SPEC] * min(ADMIT_CHUNK, n - start)):
                        if not isinstance(r, Admission):
                            raise r

            await asyncio.gather(*(one() for _ in range(PRODUCERS)))

        await serve_producer(probe, bulk)


async def consumer(url: str, expect: int) -> None:
    tally = Tally(expect)
    async with _broker(url) as broker:

        async def loop(worker_id: str) -> None:
            while True:
                leases = await broker.claim(MODEL, worker_id, BATCH)
                if not leases:
                    await broker.wait_for_work(MODEL, 1.0)
                    continue
                for le in leases:
                    tally.started(le.id)
                ok = await broker.complete_many(leases, "stop")
                if not all(ok.values()):
                    raise RuntimeError("stale leases in the drain")
                tally.finished(len(leases))

        await broker.ping()  # connected before "ready" (warm-up probes load the scripts)
        loops = [asyncio.create_task(loop(f"bench-{i}")) for i in range(CONSUMERS)]
        say("ready")
        stop = asyncio.create_task(until_stdin_closes())
        await asyncio.wait([stop, *loops], return_when=asyncio.FIRST_COMPLETED)
        for t in loops:
            t.cancel()
        for t in loops:
            if not t.cancelled() and t.done() and t.exception():
                raise t.exception()  # type: ignore[misc]


def main() -> None:
    configure_logging(level="WARNING")
    role, url, expect = argv()
    asyncio.run(producer(url) if role == "producer" else consumer(url, expect))


if __name__ == "__main__":
    main()
