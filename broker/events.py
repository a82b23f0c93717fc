"""Job events: one Redis Stream per job, each event also PUBLISHed on the job's channel.

Token events are the exception: a delta is published but not stored (an entry per delta was
most of what Redis spent per streamed token). Its place goes to the job's token index instead,
16 hex digits per token event (the output's bytes and tokens after it), and :meth:`EventHub.backlog`
rebuilds the events from the index and the output, each with the id it was published with,
``<id of the stored event before it>-<seq>``, and its event count. Token events with logprobs are
stored as they are (the stream is their only copy).

:class:`EventHub` holds the process's single pub/sub connection and fans messages
out to per-follower queues. :meth:`EventHub.follow` subscribes *first*, then reads
the stream backlog after ``last_event_id``, then follows live messages, dropping
any whose id it has already yielded: no gap, no duplicate.

The per-event path is kept cheap (one API process fans out tens of thousands of
events per second): the reader blocks on the socket without a timer, and a
follower waits on its queue with a plain ``get``; its resync and tick deadlines
are served by one timer per deadline that drops a wake-up marker into the queue,
not by a timer per event. A follower's clean-up is synchronous (an ``UNSUBSCRIBE``
it needs runs in a task of its own), so it completes even inside a cancelled
scope (anyio's level-triggered cancellation, as in an SSE response).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog

from broker.connection import RedisClient
from broker.contract import TERMINAL, TERMINAL_EVENTS, EventType
from broker.errors import REDIS_DOWN, NotFound, Unavailable, translated
from broker.keys import Keys
from broker.replies import typed_reply
from broker.scripts import Script

log = structlog.get_logger(__name__)

_WAKE = object()  # a follower's deadline (resync or tick) has passed


# A job's first event, ``queued``, is not stored: admission would create a stream per queued job
# (~600 of the ~1,600 bytes a queued job holds), and its content is the job hash's. Readers make
# it from the hash, with an id below every stream entry id; resuming after it reads the stream.
QUEUED_EVENT_ID = "0-1"


@dataclass(frozen=True, slots=True)
class Event:
    # resumable, totally ordered within a job: a stream entry id (QUEUED_EVENT_ID for queued), or
    # for a token event not stored, the id of the stored event before it and its seq ("<ms>-<n>-<seq>")
    id: str
    type: EventType
    data: dict[str, Any]
    n: int = 0  # the job's event count at this event (1, 2, ...): reveals a gap

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def _order(event_id: str) -> tuple[int, int, int]:
    ms, _, rest = event_id.partition("-")
    n, _, seq = rest.partition("-")
    return int(ms), int(n or 0), int(seq or 0)


def _stored(eid: str, f: dict[str, str]) -> Event:
    return Event(eid, EventType(f["t"]), json.loads(f["d"]), int(f.get("n", 0)))


def _rebuild(entries: list[Any], start: str, seq: int, index: str, output: str, *, whole: bool) -> list[Event]:
    """The stored events read from ``start`` on (``start`` itself left out), with the token events
    of the index placed among them: a stored event's ``s`` (its job's token events so far) says
    which go before it. ``seq``: the token events before the index's records (the first record is
    seq's own then, its offsets where ``output`` starts). ``whole``: the entries reach the end of
    the stream, so the index's last records follow them; otherwise the page stops at its last entry.
    """
    records = [(int(index[i : i + 8], 16), int(index[i + 8 : i + 16], 16)) for i in range(0, len(index) - 15, 16)]
    b0 = k = 0
    if seq > 0 and records:
        (b0, k), records = records[0], records[1:]
    text, b, first, placed = output.encode(), b0, seq, seq
    out: list[Event] = []
    after: tuple[str, int, int] | None = (QUEUED_EVENT_ID, 1, 0) if start == "-" else None  # (id, n, s)

    def place(upto: int, *, emit: bool = True) -> None:
        nonlocal placed, b, k
        while placed < upto and placed - first < len(records):
            nb, nk = records[placed - first]
            placed += 1
            if emit and after is not None:
                aid, an, a_s = after
                data = {"seq": placed, "text": text[b - b0 : nb - b0].decode(errors="replace"), "n": nk - k}
                out.append(Event(f"{aid}-{placed}", EventType.TOKEN, data, an + placed - a_s))
            b, k = nb, nk

    for eid, fields in entries:
        f = dict(zip(fields[::2], fields[1::2], strict=True))
        s = int(f["s"]) if "s" in f else None  # none: a stream from before token indexes
        if eid == start:  # the resume point's stored event: the token events after it follow it
            after = None if s is None else (eid, int(f.get("n", 0)), s)
            continue
        ev = _stored(eid, f)
        if s is not None:
            place(s - 1 if ev.type is EventType.TOKEN else s)
            if ev.type is EventType.TOKEN:  # stored (it has logprobs): its record only moves the offsets
                place(s, emit=False)
        out.append(ev)
        after = None if s is None else (eid, ev.n, s)
    if whole:
        place(first + len(records))
    return out


def _parse_message(payload: str) -> Event:
    eid, n, etype, data = payload.split("\n", 3)
    return Event(eid, EventType(etype), json.loads(data), int(n))


class EventHub:
    """One pub/sub connection per process, shared by every follower."""

    def __init__(self, redis: RedisClient, keys: Keys, backlog: Script, resync_s: float = 5.0) -> None:
        self.redis = redis
        self.keys = keys
        self._backlog = backlog  # broker/lua/backlog.lua
        self.resync_s = resync_s
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._subs: dict[str, set[asyncio.Queue[Any]]] = defaultdict(set)
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._unsubscribing: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> EventHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        for task in list(self._unsubscribing):
            task.cancel()
        for queues in self._subs.values():
            for q in queues:
                q.put_nowait(None)
        self._subs.clear()
        await self._pubsub.aclose()

    @property
    def followers(self) -> int:
        return sum(len(q) for q in self._subs.values())

    def _resync_all(self) -> None:
        for queues in self._subs.values():
            for q in queues:
                q.put_nowait(None)

    async def _reconnect(self) -> None:
        """A fresh subscriber connection, subscribed to every followed channel: after a
        failover the old server may be gone (Sentinel's pool finds the new master; on a
        cluster, another node)."""
        async with self._lock:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            if self._subs:
                await self._pubsub.subscribe(*self._subs)
                self._watch()
        self._resync_all()  # messages published while away: read them from the streams

    def _watch(self) -> None:
        """Hear of the subscriber connection's reconnects. redis-py's retries ride out a short
        Redis restart and resubscribe by themselves, so no error reaches :meth:`_read`, but what
        was published meanwhile is lost: the followers must resync from their streams."""
        if self._pubsub.connection is not None:  # kept once, as a weak reference
            self._pubsub.connection.register_connect_callback(self._reconnected)

    def _reconnected(self, connection: object) -> None:
        log.info("pubsub reconnected; followers resync")
        self._resync_all()

    async def _read(self) -> None:
        broken = False
        while True:
            try:
                if broken:
                    await self._reconnect()
                    broken = False
                    log.info("pubsub connection back")
                if not self._pubsub.subscribed:
                    await asyncio.sleep(0.05)  # nothing subscribed yet: get_message would return at once
                    continue
                msg = await self._pubsub.get_message(timeout=None)  # block: no timer per message
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection lost: followers resync from the stream  # noqa: BLE001
                if not broken:
                    log.warning("pubsub connection lost; followers will resync", error=str(e))
                self._resync_all()
                broken = True
                await asyncio.sleep(0.2)
                continue
            if msg is None or msg.get("type") != "message":
                continue
            followers = self._subs.get(msg["channel"])
            if followers:
                try:
                    ev: Event | None = _parse_message(msg["data"])
                except (ValueError, TypeError) as e:  # e.g. a peer on another message format
                    log.warning("unreadable event message; followers resync", channel=msg["channel"], error=str(e))
                    ev = None
                for q in followers:
                    q.put_nowait(ev)

    @contextlib.asynccontextmanager
    async def _subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[Any]]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        async with self._lock:
            if not self._subs[channel]:
                try:
                    await self._pubsub.subscribe(channel)
                except REDIS_DOWN as e:
                    raise Unavailable(f"Redis unavailable: {type(e).__name__}: {e}") from e
                self._watch()
            self._subs[channel].add(q)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read(), name="genq-pubsub")
        try:
            yield q
        finally:  # no await here: this runs even where every await would be cancelled
            queues = self._subs.get(channel)
            if queues is not None:
                queues.discard(q)
                if not queues:
                    del self._subs[channel]
                    task = asyncio.get_running_loop().create_task(self._unsubscribe(channel))
                    self._unsubscribing.add(task)
                    task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, channel: str) -> None:
        async with self._lock:
            if channel not in self._subs:  # nobody followed it again meanwhile
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(channel)

    @translated
    async def backlog(self, job_id: str, after: str | None = None, count: int = 1000) -> list[Event]:
        """The job's events after ``after`` (from its first without), up to ``count`` stored ones
        and the token events among them."""
        k = self.keys
        keys = [k.events(job_id), k.output(job_id), k.token_index(job_id)]
        if after and after != QUEUED_EVENT_ID:
            ms, n, seq = _order(after)
            start = f"{ms}-{n}"  # a token event's id starts with its stored event's
            entries, seq, index, output = await self._backlog(keys, [start, seq or -1, count + 1])
            return _rebuild(entries, start, int(seq), index, output, whole=len(entries) <= count)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(k.job(job_id), ["priority", "model"])
        await self._backlog(keys, ["-", 0, count], client=pipe)
        (priority, model), (entries, seq, index, output) = await pipe.execute()
        events = _rebuild(entries, "-", int(seq), index, output, whole=len(entries) < count)
        # (a stream from before the queued event was synthesized begins with it, numbered 1)
        if after is None and model is not None and not (events and events[0].n == 1):
            events.insert(0, Event(QUEUED_EVENT_ID, EventType.QUEUED, {"priority": int(priority), "model": model}, 1))
        return events

    @translated
    async def _exists(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.job(job_id)))

    @translated
    async def _state(self, job_id: str) -> tuple[bool, int]:
        """(finished, events so far) of a job."""
        status, evn = await typed_reply(self.redis.hmget(self.keys.job(job_id), ["status", "evn"]))
        return status is None or status in TERMINAL, int(evn or 0)

    async def follow(
        self, job_id: str, last_event_id: str | None = None, tick_s: float | None = None
    ) -> AsyncGenerator[Event | None, None]:
        """Every event after ``last_event_id``, in order, until (and including) a terminal one.

        With ``tick_s``, also yields ``None`` each time ``tick_s`` passes while waiting for
        live events (measured from the previous tick), so a caller can interleave periodic
        work (e.g. queue positions) without a task or a timer per event.

        Raises NotFound if the job is unknown (or expired).
        """
        last = last_event_id
        last_n = 0 if last is None else -1  # -1: not known yet
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + tick_s if tick_s else None
        async with self._subscribe(self.keys.channel(job_id)) as q:
            if not await self._exists(job_id):
                raise NotFound(job_id)
            while True:
                # Status first, stream second: a terminal status read here means the
                # terminal event is already in the stream read below (same Lua call).
                # Likewise an empty backlog means `last` is the newest event, numbered `evn`.
                finished, evn = await self._state(job_id)
                batch = await self.backlog(job_id, last)
                if not batch and last_n < 0:
                    last_n = evn
                for ev in batch:
                    last, last_n = ev.id, ev.n
                    yield ev
                    if ev.terminal:
                        return
                if len(batch) >= 1000:
                    continue  # more backlog to read
                if not batch and finished:
                    return  # resumed at or after the terminal event: nothing more will come
                quiet_until = loop.time() + self.resync_s
                timer = None
                try:
                    while True:
                        if timer is None:  # one timer per deadline, not one per event
                            at = quiet_until if next_tick is None else min(quiet_until, next_tick)
                            timer = loop.call_at(at, q.put_nowait, _WAKE)
                        ev = await q.get()
                        if ev is _WAKE:
                            if timer is not None:  # a marker from an earlier timer: drop the live one too
                                timer.cancel()
                            timer, now = None, loop.time()
                            if next_tick is not None and now >= next_tick:
                                next_tick = now + tick_s  # type: ignore[operator]
                                yield None
                            if now >= quiet_until:
                                break  # quiet for a while: re-read the stream as a safety net
                            continue
                        if ev is None:
                            break  # pub/sub reconnected: messages may be lost, resync from the stream
                        if last is not None and _order(ev.id) <= _order(last):
                            continue  # already yielded from the backlog
                        if ev.n != last_n + 1:
                            break  # a live message was missed (reconnect, late subscribe): resync
                        last, last_n = ev.id, ev.n
                        quiet_until = loop.time() + self.resync_s
                        yield ev
                        if ev.terminal:
                            return
                finally:
                    if timer is not None:
                        timer.cancel()


class ControlListener:
    """A worker's subscription to its model's control channel (cancel notices)."""

    def __init__(self, redis: RedisClient, keys: Keys, model: str) -> None:
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
