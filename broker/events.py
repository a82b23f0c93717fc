"""Job events: one Redis Stream per job, each event also PUBLISHed on the job's channel.

:class:`EventHub` holds the process's single pub/sub connection and fans messages
out to per-follower queues. :meth:`EventHub.follow` subscribes *first*, then reads
the stream backlog after ``last_event_id``, then follows live messages, dropping
any whose id it has already yielded: no gap, no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis

from broker.errors import NotFound
from broker.keys import Keys

log = structlog.get_logger(__name__)

TERMINAL_EVENTS = frozenset({"done", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class Event:
    id: str          # the stream entry id: resumable, totally ordered within a job
    type: str        # queued | started | token | retry | done | failed | cancelled
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def _order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _parse_message(payload: str) -> Event:
    eid, etype, data = payload.split("\n", 2)
    return Event(eid, etype, json.loads(data))


class EventHub:
    """One pub/sub connection per process, shared by every follower."""

    def __init__(self, redis: Redis, keys: Keys, resync_s: float = 5.0) -> None:
        self.redis = redis
        self.keys = keys
        self.resync_s = resync_s
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._subs: dict[str, set[asyncio.Queue[Event | None]]] = defaultdict(set)
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> EventHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        for queues in self._subs.values():
            for q in queues:
                q.put_nowait(None)
        self._subs.clear()
        await self._pubsub.aclose()

    @property
    def followers(self) -> int:
        return sum(len(q) for q in self._subs.values())

    async def _read(self) -> None:
        while True:
            try:
                if not self._pubsub.subscribed:
                    await asyncio.sleep(0.05)  # nothing subscribed yet: get_message would return at once
                    continue
                msg = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection lost: followers resync from the stream
                log.warning("pubsub connection lost; followers will resync", error=str(e))
                for queues in self._subs.values():
                    for q in queues:
                        q.put_nowait(None)
                await asyncio.sleep(0.2)
                continue
            if msg is None or msg.get("type") != "message":
                continue
            queues = self._subs.get(msg["channel"])
            if queues:
                ev = _parse_message(msg["data"])
                for q in queues:
                    q.put_nowait(ev)

    @contextlib.asynccontextmanager
    async def _subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[Event | None]]:
        q: asyncio.Queue[Event | None] = asyncio.Queue()
        async with self._lock:
            if not self._subs[channel]:
                await self._pubsub.subscribe(channel)
            self._subs[channel].add(q)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read(), name="genq-pubsub")
        try:
            yield q
        finally:
            async with self._lock:
                self._subs[channel].discard(q)
                if not self._subs[channel]:
                    del self._subs[channel]
                    with contextlib.suppress(Exception):
                        await self._pubsub.unsubscribe(channel)

    async def backlog(self, job_id: str, after: str | None = None, count: int = 1000) -> list[Event]:
        start = f"({after}" if after else "-"
        entries = await self.redis.xrange(self.keys.events(job_id), min=start, max="+", count=count)
        return [Event(eid, f["t"], json.loads(f["d"])) for eid, f in entries]

    async def _finished(self, job_id: str) -> bool:
        status = await self.redis.hget(self.keys.job(job_id), "status")
        return status in (None, "succeeded", "failed", "cancelled", "expired")

    async def follow(self, job_id: str, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """Every event after ``last_event_id``, in order, until (and including) a terminal one.

        Raises NotFound if the job has no events (unknown, or expired).
        """
        last = last_event_id
        async with self._subscribe(self.keys.channel(job_id)) as q:
            if not await self.redis.exists(self.keys.events(job_id)):
                raise NotFound(f"No job found with id '{job_id}'.", param="job_id")
            while True:
                # Status first, stream second: a terminal status read here means the
                # terminal event is already in the stream read below (same Lua call).
                finished = await self._finished(job_id)
                batch = await self.backlog(job_id, last)
                for ev in batch:
                    last = ev.id
                    yield ev
                    if ev.terminal:
                        return
                if len(batch) >= 1000:
                    continue  # more backlog to read
                if not batch and finished:
                    return  # resumed at or after the terminal event: nothing more will come
                while True:
                    try:
                        ev = await asyncio.wait_for(q.get(), timeout=self.resync_s)
                    except TimeoutError:
                        break  # quiet for a while: re-read the stream as a safety net
                    if ev is None:
                        break  # pub/sub reconnected: messages may be lost, resync from the stream
                    if last is not None and _order(ev.id) <= _order(last):
                        continue  # already yielded from the backlog
                    last = ev.id
                    yield ev
                    if ev.terminal:
                        return


class ControlListener:
    """A worker's subscription to its model's control channel (cancel notices)."""

    def __init__(self, redis: Redis, keys: Keys, model: str) -> None:
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._channel = keys.control(model)

    async def __aenter__(self) -> ControlListener:
        await self._pubsub.subscribe(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pubsub.aclose()

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            msg = await self._pubsub.get_message(timeout=1.0)
            if msg and msg.get("type") == "message":
                yield msg["data"]
