"""Following a job's events from a request, and the SSE response that holds a stream slot.

Keep-alive: a comment line goes out only after ``ping`` seconds of silence, never
between events (sse-starlette pings every ``ping`` seconds from the start; vLLM's
``bench serve`` client loses every message after a comment it reads alone, see AFTER_PING).

Framing: every line ends in ``\n``, so a message ends in a blank line ``\n\n`` (see LINE_END),
and the message after a keep-alive comment opens with an empty comment (see AFTER_PING).

Cancellation: sse-starlette cancels the streaming task when the client goes away;
with anyio's level-triggered cancellation every later ``await`` in that task would
be cancelled too, so clean-up that must reach Redis (unsubscribe, cancel the job)
runs in a shielded scope with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import anyio
import structlog
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.event import ensure_bytes
from starlette.types import Message, Receive, Scope, Send

from api.errors import ApiError
from api.runtime import Runtime, StreamSlot
from broker.events import Event

log = structlog.get_logger(__name__)

CLEANUP_S = 5.0
# Lines end in "\n", as OpenAI's and vLLM's servers send them (sse-starlette's default is "\r\n"):
# vLLM's ``bench serve`` client splits messages on "\n\n" only, so with "\r\n" two messages
# read together stayed glued and it lost every later one, the final usage chunk among them.
LINE_END = "\n"
# The message after a keep-alive comment starts with an empty comment (":" and a blank line).
# vLLM's bench serve client strips each read and splits on "\n\n": a comment read alone lost its
# blank line, stayed at the head of its buffer and swallowed every later message (a TTFT past
# ``keepalive_s``, as in a queue, lost the stream). Any SSE parser ignores the extra comment.
AFTER_PING = b":" + LINE_END.encode() * 2


async def follow(
    rt: Runtime, job_id: str, last_event_id: str | None = None, tick_s: float | None = None
) -> AsyncGenerator[Event | None, None]:
    """The job's events after ``last_event_id`` up to the terminal one.

    With ``tick_s``, yields ``None`` each time ``tick_s`` passes (measured from the
    previous tick, not from the last event), so a caller can interleave periodic work.
    The hub does the ticking, so an event costs no task and no timer of its own.
    """
    events = rt.hub.follow(job_id, last_event_id, tick_s)
    try:
        async for ev in events:
            yield ev
            if ev is not None and ev.terminal:
                return
    finally:
        with anyio.move_on_after(CLEANUP_S, shield=True):
            with contextlib.suppress(Exception):
                await events.aclose()  # unsubscribes (synchronously: safe when cancelled)


async def follow_many(rt: Runtime, job_ids: Sequence[str]) -> AsyncGenerator[tuple[int, Event], None]:
    """Several jobs' events (``n`` choices), each tagged with its job's index, merged in arrival
    order until every job's terminal event. One job is followed directly, with no task per job.

    Closing the iterator early stops the followers (their clean-up runs in their own tasks).
    """
    if len(job_ids) == 1:
        async with contextlib.aclosing(follow(rt, job_ids[0])) as events:
            async for ev in events:
                if ev is not None:
                    yield 0, ev
        return
    merged: asyncio.Queue[tuple[int, Event | Exception | None]] = asyncio.Queue()

    async def pump(i: int, job_id: str) -> None:
        try:
            async with contextlib.aclosing(follow(rt, job_id)) as events:
                async for ev in events:
                    if ev is not None:
                        merged.put_nowait((i, ev))
            merged.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            merged.put_nowait((i, e))

    pumps = [asyncio.create_task(pump(i, job_id), name=f"genq-follow-{job_id}") for i, job_id in enumerate(job_ids)]
    try:
        left = len(pumps)
        while left:
            i, item = await merged.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                left -= 1
            else:
                yield i, item
    finally:
        for task in pumps:
            task.cancel()  # synchronous: safe in a cancelled scope


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
        super().__init__(content, **{"sep": LINE_END, **kw})
        self._slot = slot
        self._last_sent = 0.0  # time.monotonic() of the last message sent
        self._pinged = False  # the last message sent was a keep-alive comment

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._last_sent = time.monotonic()  # the headers go out now
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        # sse-starlette opens an anyio cancel scope around every send, even with no send
        # timeout; that scope was ~9 % of the API's CPU per token event (genq bench sse).
        if self._pinged and message.get("body"):
            message = {**message, "body": AFTER_PING + message["body"]}
            self._pinged = False
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)
        self._last_sent = time.monotonic()

    async def _ping(self, send: Send) -> None:
        """A comment after ``ping_interval`` of silence: one timer per quiet period, none per event."""
        ping = ensure_bytes(ServerSentEvent(comment="ping", sep=self.sep), self.sep)
        while self.active:
            quiet_s = time.monotonic() - self._last_sent
            if quiet_s < self.ping_interval:
                await anyio.sleep(self.ping_interval - quiet_s)
                continue
            async with self._send_lock:
                if self.active:
                    await self._send_with_timeout(send, {"type": "http.response.body", "body": ping, "more_body": True})
                    self._pinged = True  # see AFTER_PING
