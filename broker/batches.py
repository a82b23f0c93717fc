"""Files and batches metadata: records, per-tenant listings, and a batch's progress checkpoint.

File *content* never enters Redis (see ``batcher.storage``); this module keeps what a
file or a batch *is* and how far a batch got, so that a batcher killed at any point
resumes without running a line twice or dropping one:

- ``P:bjobs:<id>`` maps each line fed and not yet collected to its job id (or ``!`` +
  the error JSON of a line refused for good), written with the batch's ``next_line``
  in one guarded update;
- ``P:bsegs:<id>`` lists the output and error segment files already written, appended
  in the same update that forgets their lines and counts them.

Every change is guarded by the batch's lease (``P:blease:<id>``, one batcher at a
time) and by the statuses it may happen in (``batch_update.lua``), so a stale batcher
cannot commit and a cancel cannot be overwritten.

Every multi-key write is one script call (``record_put.lua``, ``record_drop.lua``,
``batch_update.lua``), never a MULTI pipeline, which redis-py's cluster client refuses:
the same code runs on standalone, Sentinel and Cluster, each call on the namespace's slot.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from broker import errors
from broker.connection import RedisClient
from broker.errors import Code, translate_public
from broker.keys import Keys
from broker.replies import typed_reply


class LeaseLost(errors.BrokerError):
    """Another batcher holds the batch's lease now: stop driving it."""

    code = "lease_lost"

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"the lease on batch {batch_id} is held by another batcher")
        self.batch_id = batch_id


class BatchStatusConflict(errors.BrokerError):
    """The batch is in a status that does not allow the change (e.g. cancelling a finished batch)."""

    code = "batch_status_conflict"

    def __init__(self, batch_id: str, status: str) -> None:
        super().__init__(f"batch {batch_id} is {status}")
        self.batch_id, self.status = batch_id, status


@functools.cache
def _source(name: str) -> str:
    return (resources.files("broker") / "lua" / f"{name}.lua").read_text()


def _script(redis: RedisClient, name: str) -> AsyncScript:
    # AsyncScript takes the cluster client too; redis-py annotates only the standalone one.
    return AsyncScript(cast(Redis, redis), _source(name))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Page:
    items: list[dict[str, str]]
    has_more: bool


class BatchStore:
    """Typed wrappers over the files/batches keys; reached as ``Broker.batches``."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis, self._keys = redis, keys
        self._lease = _script(redis, "batch_lease")
        self._update = _script(redis, "batch_update")
        # Scripts, not MULTI: redis-py's cluster client refuses transactions (record_put.lua).
        self._put = _script(redis, "record_put")
        self._drop = _script(redis, "record_drop")

    async def _put_record(self, keys: list[str], record: Mapping[str, Any]) -> None:
        rid = str(record["id"])
        await self._put(keys, [rid, _now_ms(), json.dumps({f: str(v) for f, v in record.items()})])

    # -- files ------------------------------------------------------------
    async def put_file(self, record: Mapping[str, Any]) -> None:
        k = self._keys
        await self._put_record([k.file(str(record["id"])), k.tenant_files(str(record["tenant"]))], record)

    async def get_file(self, file_id: str, tenant: str | None = None) -> dict[str, str] | None:
        rec: dict[str, str] = await typed_reply(self._redis.hgetall(self._keys.file(file_id)))
        return rec if rec and (tenant is None or rec.get("tenant") == tenant) else None

    async def delete_file(self, file_id: str, tenant: str) -> dict[str, str] | None:
        rec = await self.get_file(file_id, tenant)
        if rec is None:
            return None
        deleted = await self._drop([self._keys.file(file_id), self._keys.tenant_files(tenant)], [file_id, tenant])
        return rec if deleted else None

    async def list_files(self, tenant: str, limit: int, after: str | None = None, purpose: str | None = None) -> Page:
        """The tenant's files, newest first, after the cursor ``after`` (a file id)."""
        page = await self._page(self._keys.tenant_files(tenant), self._keys.file, limit, after, purpose)
        return page

    # -- batches ----------------------------------------------------------
    async def create_batch(self, record: Mapping[str, Any]) -> None:
        k = self._keys
        keys = [k.batch(str(record["id"])), k.tenant_batches(str(record["tenant"])), k.batches_active]
        await self._put_record(keys, record)

    async def get_batch(self, batch_id: str, tenant: str | None = None) -> dict[str, str] | None:
        rec: dict[str, str] = await typed_reply(self._redis.hgetall(self._keys.batch(batch_id)))
        return rec if rec and (tenant is None or rec.get("tenant") == tenant) else None

    async def list_batches(self, tenant: str, limit: int, after: str | None = None) -> Page:
        return await self._page(self._keys.tenant_batches(tenant), self._keys.batch, limit, after)

    async def active_batches(self) -> list[str]:
        """Batches not yet in a terminal status (what a batcher's sweep drives)."""
        members: set[str] = await typed_reply(self._redis.smembers(self._keys.batches_active))
        return sorted(members)

    async def lease(self, batch_id: str, owner: str, ttl_ms: int, *, release: bool = False) -> tuple[bool, int]:
        """Take or renew (or give up) the lease on driving a batch: (held now, takeover epoch)."""
        k = self._keys
        held, epoch = await self._lease(
            [k.batch_lease(batch_id), k.batch(batch_id)], [owner, ttl_ms, "1" if release else "0"]
        )
        return bool(held), int(epoch)

    async def lease_holder(self, batch_id: str) -> str | None:
        holder: str | None = await self._redis.get(self._keys.batch_lease(batch_id))
        return holder

    async def update(
        self,
        batch_id: str,
        *,
        owner: str = "",
        allowed: Iterable[str] = (),
        set: Mapping[str, Any] | None = None,
        incr: Mapping[str, int] | None = None,
        lines: Mapping[int, str] | None = None,
        unline: Iterable[int] = (),
        segs: Iterable[str] = (),
        done: bool = False,
    ) -> str:
        """One atomic, guarded change (see ``batch_update.lua``); returns the status after it.

        Raises NotFound, LeaseLost (``owner`` given and not the lease holder) and
        BatchStatusConflict (the batch is not in one of ``allowed``).
        """
        k = self._keys
        op: dict[str, Any] = {}
        if set:
            op["set"] = {f: str(v) for f, v in set.items()}
        if incr:
            op["incr"] = dict(incr)
        if lines:
            op["lines"] = {str(n): j for n, j in lines.items()}
        if unlined := [str(n) for n in unline]:
            op["unline"] = unlined
        if segs := list(segs):
            op["segs"] = segs
        if done:
            op["done"] = True
        keys = [k.batch(batch_id), k.batch_jobs(batch_id), k.batch_segments(batch_id), k.batch_lease(batch_id)]
        code, status = await self._update(
            [*keys, k.batches_active, k.webhooks],
            [owner, ",".join(allowed), json.dumps(op)],
        )
        result = Code(int(code))
        if result is Code.NOT_FOUND:
            raise errors.NotFound(batch_id)
        if result is Code.STALE_LEASE:
            raise LeaseLost(batch_id)
        if result is Code.ALREADY_TERMINAL:
            raise BatchStatusConflict(batch_id, str(status))
        return str(status)

    async def fed_lines(self, batch_id: str) -> dict[int, str]:
        """Lines fed and not yet collected: line -> job id (or ``!`` + error JSON)."""
        raw: dict[str, str] = await typed_reply(self._redis.hgetall(self._keys.batch_jobs(batch_id)))
        return {int(n): v for n, v in raw.items()}

    async def segments(self, batch_id: str) -> list[str]:
        segs: list[str] = await typed_reply(self._redis.lrange(self._keys.batch_segments(batch_id), 0, -1))
        return segs

    # -- shared -----------------------------------------------------------
    async def _page(
        self, index: str, record_key: Any, limit: int, after: str | None, purpose: str | None = None
    ) -> Page:
        start = 0
        if after:
            rank = await self._redis.zrevrank(index, after)
            if rank is None:
                return Page([], False)
            start = rank + 1
        items: list[dict[str, str]] = []
        while True:  # a purpose filter may skip records: read on until the page is full
            ids = await self._redis.zrevrange(index, start, start + limit)
            if not ids:
                return Page(items, False)
            pipe = self._redis.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(record_key(i))
            for rec in await pipe.execute():
                if rec and (purpose is None or rec.get("purpose") == purpose):
                    if len(items) == limit:
                        return Page(items, True)
                    items.append(rec)
            start += len(ids)


translate_public(BatchStore)
