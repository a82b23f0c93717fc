"""Webhooks: the queue of webhooks due, their delivery records, and the tenants' signing secrets.

A job or a batch with a webhook is added to the stream ``P:webhooks`` by the very Lua call
that ends it (``finish`` in ``_lib.lua``, ``batch_update.lua``), so no terminal state is
missed and nobody polls jobs. Batchers read the stream as one consumer group: an entry is
acknowledged and deleted only once its delivery is queued (arq), and an entry a batcher read
but never acknowledged (it died) is claimed by another after ``min_idle_ms``. Delivery is
idempotent: it checks the record's state first, so an entry handed out twice is harmless.

A delivery's attempts and state live on the job's or the batch's own hash (``wh_attempts``,
``wh_state``), so they expire with a job's result.
"""

from __future__ import annotations

import base64
import inspect
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from broker.connection import RedisClient
from broker.contract import WebhookKind, WebhookState
from broker.errors import translated
from broker.keys import Keys
from broker.replies import typed_reply

GROUP = "batchers"
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass(frozen=True, slots=True)
class Due:
    """One webhook due: the stream entry and the job or batch it is for."""

    entry_id: str
    kind: WebhookKind
    object_id: str


def _due(entries: Sequence[Any]) -> list[Due]:
    out = []
    for entry_id, fields in entries:
        if fields and fields.get("k") in WebhookKind.__members__.values() and fields.get("id"):
            out.append(Due(entry_id, WebhookKind(fields["k"]), fields["id"]))
    return out


class WebhookStore:
    """Typed wrappers over the webhook keys; reached as ``Broker.webhooks``."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis, self._keys = redis, keys
        lua = (resources.files("broker") / "lua" / "webhook_note.lua").read_text()
        # AsyncScript takes the cluster client too; redis-py annotates only the standalone one.
        self._note = AsyncScript(cast(Redis, redis), lua)

    # -- signing secrets ----------------------------------------------------
    async def secret(self, tenant: str, *, rotate: bool = False) -> str:
        """The tenant's signing secret, made on first need; ``rotate`` replaces it."""
        key = self._keys.webhook_secret(tenant)
        if rotate:
            fresh = new_secret()
            await self._redis.set(key, fresh)
            return fresh
        await self._redis.set(key, new_secret(), nx=True)
        current: str = await typed_reply(self._redis.get(key))
        return current

    # -- webhooks due -------------------------------------------------------
    async def ensure_group(self) -> None:
        """Create the batchers' consumer group (from the stream's start: nothing added before is missed)."""
        try:
            await self._redis.xgroup_create(self._keys.webhooks, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def due(self, consumer: str, block_ms: int, count: int = 100) -> list[Due]:
        """Webhooks due that no batcher has read yet; blocks up to ``block_ms`` for one."""
        try:
            reply = await self._redis.xreadgroup(
                GROUP, consumer, {self._keys.webhooks: ">"}, count=count, block=block_ms
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group()  # the stream was deleted (e.g. a namespace dropped)
            return []
        return [d for _, entries in reply or [] for d in _due(entries)]

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int = 100) -> list[Due]:
        """Webhooks another batcher read at least ``min_idle_ms`` ago and never acknowledged."""
        try:
            reply = await self._redis.xautoclaim(self._keys.webhooks, GROUP, consumer, min_idle_ms, "0-0", count)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            return []
        return _due(reply[1])

    async def done(self, entry_ids: Sequence[str]) -> None:
        """Forget entries whose delivery is queued."""
        if entry_ids:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xack(self._keys.webhooks, GROUP, *entry_ids)
            pipe.xdel(self._keys.webhooks, *entry_ids)
            await pipe.execute()

    async def pending(self) -> int:
        """Entries in the stream (read or not): webhooks not yet handed to arq."""
        n: int = await typed_reply(self._redis.xlen(self._keys.webhooks))
        return n

    # -- delivery records ---------------------------------------------------
    async def note(
        self, kind: WebhookKind, object_id: str, attempts: Sequence[dict[str, Any]], state: WebhookState
    ) -> bool:
        """Record a delivery's attempts and state on its job or batch; False when it is gone."""
        key = self._keys.job(object_id) if kind is WebhookKind.JOB else self._keys.batch(object_id)
        written = await self._note([key], [json.dumps(list(attempts), separators=(",", ":")), state.value])
        return bool(written)


for _name, _fn in list(vars(WebhookStore).items()):
    if not _name.startswith("_") and inspect.iscoroutinefunction(_fn):
        setattr(WebhookStore, _name, translated(_fn))
