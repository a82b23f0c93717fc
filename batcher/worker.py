"""The arq side of the batcher: its functions, cron sweep and worker settings.

- ``drive_batch(batch_id)`` drives one batch for a slice (see :mod:`batcher.driver`);
- ``deliver_webhook(kind, id)`` makes one delivery attempt of a job's or a batch's webhook,
  retried by arq with backoff; a task of each batcher (``batcher.webhooks.drain``) enqueues
  it for each webhook due (see :mod:`batcher.webhooks`);
- ``sweep`` (every second, one batcher at a time) enqueues ``drive_batch`` for each
  batch not yet terminal whose lease nobody holds: new batches, batches a dead
  batcher left, and batches whose last slice ended. The arq job id carries the batch's
  takeover epoch, so a sweep enqueues each takeover once.

arq keeps its own keys (under its queue name, derived from the genq queue) on the
broker's Redis, or on ``GENQ_BATCHER_ARQ_URL``'s when set (required when the broker's is a
Cluster: see :mod:`batcher.arq_redis`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from typing import Any

import httpx
import structlog
from arq import cron
from arq.worker import Worker, func

from batcher.arq_redis import arq_redis_settings
from batcher.driver import Driver
from batcher.settings import BatcherSettings
from batcher.storage import store
from batcher.webhooks import FUNCTION, Deliverer, deliver_webhook, drain
from broker import Broker

log = structlog.get_logger(__name__)


def queue_name(settings: BatcherSettings) -> str:
    return f"arq:genq.{settings.queue}.batcher"


async def preload_tokenizers(broker: Broker, driver: Driver, budget_s: float) -> dict[str, Any]:
    """Load the registered models' tokenizers at start-up, so a first batch does not pay it (~5 s).

    Runs in the background of a started batcher: a failure or an overrun is logged, never raised.
    Models registered later load at their first batch, as before.
    """
    try:
        done = await driver.tokens.preload(await broker.models(), budget_s)
    except Exception as e:  # noqa: BLE001 - Redis away at start: the first batch loads its tokenizer
        log.warning("tokenizer preload failed; loading at first use", error=f"{type(e).__name__}: {e}")
        return {}
    log.info("tokenizers preloaded", **{**done, "took_s": round(done["took_s"], 2)}, budget_s=budget_s)
    return done


async def drive_batch(ctx: dict[str, Any], batch_id: str) -> str:
    status: str = await ctx["driver"].drive(batch_id)
    return status


async def sweep(ctx: dict[str, Any]) -> int:
    bs = ctx["broker"].batches
    enqueued = 0
    for batch_id in await bs.active_batches():
        if await bs.lease_holder(batch_id) is not None:
            continue
        rec = await bs.get_batch(batch_id)
        if rec is None:
            continue
        job = await ctx["redis"].enqueue_job("drive_batch", batch_id, _job_id=f"drive:{batch_id}:{rec.get('epoch', 0)}")
        enqueued += job is not None
    return enqueued


def make_worker(settings: BatcherSettings, **overrides: Any) -> Worker:
    """The arq worker; raises :class:`batcher.arq_redis.ArqUrlError` when arq has no Redis it can use."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    stack = contextlib.AsyncExitStack()

    async def startup(ctx: dict[str, Any]) -> None:
        broker = await stack.enter_async_context(Broker.from_settings(settings))
        hub = await stack.enter_async_context(broker.event_hub())
        ctx["broker"] = broker
        ctx["driver"] = Driver(broker, hub, store(settings.files_root), settings, owner)
        if settings.batcher_preload_budget_s > 0:
            ctx["preload"] = asyncio.create_task(
                preload_tokenizers(broker, ctx["driver"], settings.batcher_preload_budget_s),
                name="genq-tokenizer-preload",
            )
        http = await stack.enter_async_context(
            httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False)
        )
        ctx["webhooks"] = Deliverer(broker, settings, http)
        ctx["drain"] = asyncio.create_task(drain(broker, ctx["redis"], owner), name="genq-webhook-drain")
        arq_on = "GENQ_BATCHER_ARQ_URL" if settings.batcher_arq_url else "GENQ_REDIS_URL"
        log.info("batcher started", owner=owner, queue=queue_name(settings), arq_on=arq_on, files=settings.files_root)

    async def shutdown(ctx: dict[str, Any]) -> None:
        for name in ("drain", "preload"):
            if name in ctx:
                ctx[name].cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ctx[name]
        await stack.aclose()
        log.info("batcher stopped", owner=owner)

    kw: dict[str, Any] = {
        "functions": [
            func(drive_batch, name="drive_batch", keep_result=0, max_tries=1000),
            # arq's tries also count runs a stopped batcher cut short; the recorded attempts are the cap
            func(
                deliver_webhook,
                name=FUNCTION,
                keep_result=0,
                max_tries=settings.webhook_max_attempts + 3,
                timeout=settings.webhook_timeout_s + 30,
            ),
        ],
        "cron_jobs": [cron(sweep, second=set(range(60)), run_at_startup=True, unique=True, keep_result=0)],
        "redis_settings": arq_redis_settings(settings.redis_url, settings.batcher_arq_url),
        "queue_name": queue_name(settings),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.batcher_max_jobs + 1,
        "job_timeout": settings.batch_slice_s + 120,
        "keep_result": 0,
        "poll_delay": 0.2,
        **overrides,
    }
    return Worker(**kw)
