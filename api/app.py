"""The FastAPI app factory. Nothing starts at import; the lifespan opens and closes everything.

Lifespan: connect the Broker, check Redis (durability settings; fatal in
production), open the process's one pub/sub connection (EventHub), and make the
configured models admissible without clobbering what a worker registered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

import structlog
from fastapi import FastAPI

from api import docs, errors
from api.metrics import ApiMetrics
from api.middleware import AccessMiddleware
from api.routes_batches import router as batches_router
from api.routes_files import router as files_router
from api.routes_jobs import router as jobs_router
from api.routes_openai import router as openai_router
from api.routes_ops import admin as admin_router
from api.routes_ops import router as ops_router
from api.routes_ui import router as ui_router
from api.runtime import Drain, Runtime, StreamSlots
from api.settings import ApiSettings
from broker.client import Broker

log = structlog.get_logger(__name__)


class State(TypedDict):
    rt: Runtime


@asynccontextmanager
async def reaper(broker: Broker, settings: ApiSettings, metrics: ApiMetrics) -> AsyncIterator[None]:
    """Requeue expired leases of every model, so a model whose last worker died does not
    keep its running jobs forever (workers reap too; reaping twice is harmless)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(settings.reap_interval_ms / 1000)  # a period, not a wait for an event
            try:
                for model in await broker.models():
                    for _, status in await broker.reap(model):
                        metrics.job_reaped(model, status)
            except Exception as e:  # noqa: BLE001 - Redis away: try again next period
                log.warning("reap failed", error=str(e))

    task = asyncio.create_task(loop(), name="genq-api-reaper")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    metrics = ApiMetrics()
    drain = Drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        broker = Broker.from_settings(settings)
        try:
            await broker.check_server()
            for model in settings.models:  # a worker's record (max_model_len, tokenizer) wins
                await broker.register_model(model, 0, only_if_absent=True)
            async with broker.event_hub() as hub, reaper(broker, settings, metrics):
                rt = Runtime(
                    settings, broker, hub, metrics=metrics, streams=StreamSlots(settings.sse_per_tenant), drain=drain
                )
                log.info("api started", queue=settings.queue, models=settings.models)
                try:
                    yield {"rt": rt}
                finally:
                    await rt.orphans.aclose()
        finally:
            await broker.close()
            log.info("api stopped")

    app = FastAPI(
        title="genq",
        version="0.1.0",
        summary="An asynchronous request broker for LLM serving: native jobs, SSE, OpenAI-compatible endpoints.",
        lifespan=lifespan,
        docs_url=None,  # served by api.docs without a CDN
        redoc_url=None,
    )
    app.state.drain = drain  # api.server starts it on SIGTERM, before uvicorn stops anything
    errors.install(app)
    docs.install(app)
    # An upload's multipart body: the file plus a little form overhead.
    uploads = {"/v1/files": settings.max_file_bytes + 64 * 1024}
    app.add_middleware(AccessMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes, uploads=uploads)
    for router in (ops_router, admin_router, jobs_router, openai_router, files_router, batches_router, ui_router):
        app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory api.app:app_from_env``."""
    return create_app(ApiSettings())
