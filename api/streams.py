"""Following a job's events from a request, and the SSE response that holds a stream slot.

Cancellation: sse-starlette cancels the streaming task when the client goes away;
with anyio's level-triggered cancellation every later ``await`` in that task would
be cancelled too, so clean-up that must reach Redis (unsubscribe, cancel the job)
runs in a shielded scope with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import structlog
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from api.errors import ApiError
from api.runtime import Runtime, StreamSlot
from broker.events import Event

log = structlog.get_logger(__name__)

CLEANUP_S = 5.0


async def follow(rt: Runtime, job_id: str, last_event_id: str | None = None,
                 tick_s: float | None = None) -> AsyncIterator[Event | None]:  # fmt: skip
    """The job's events after ``last_event_id`` up to the terminal one.

    With ``tick_s``, yields ``None`` each time ``tick_s`` passes (measured from the
    previous tick, not from the last event), so a caller can interleave periodic work.
    """
    events = rt.hub.follow(job_id, last_event_id)

    async def next_event() -> Event:
        return await events.__anext__()

    pending: asyncio.Future[Event] | None = None
    next_tick = time.monotonic() + tick_s if tick_s else None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(next_event())
            timeout = max(0.0, next_tick - time.monotonic()) if next_tick is not None else None
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if not done:
                next_tick = time.monotonic() + tick_s  # type: ignore[operator]
                yield None
                continue
            fut, pending = pending, None
            try:
                ev = fut.result()
            except StopAsyncIteration:
                return
            yield ev
            if ev.terminal:
                return
    finally:
        with anyio.move_on_after(CLEANUP_S, shield=True):
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending  # lets the hub unsubscribe
            with contextlib.suppress(Exception):
                await events.aclose()


async def shielded(coro: Any) -> Any:
    """Await ``coro`` even inside a cancelled scope (client gone), with a deadline."""
    with anyio.move_on_after(CLEANUP_S, shield=True):
        return await coro
    return None


def open_slot(rt: Runtime, tenant: str) -> StreamSlot:
    try:
        return rt.streams.acquire(tenant)
    except ApiError:
        rt.metrics.rejected("too_many_streams")
        raise


class SlotEventSourceResponse(EventSourceResponse):
    """An SSE response that gives its tenant's stream slot back however it ends."""

    def __init__(self, content: AsyncIterator[Any], slot: StreamSlot, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()
