"""The broker's fleet records: admissible models, tenants' limits, live workers, API keys.

Plain hashes, no scripts; a part of :class:`broker.client.Broker` (its methods are the broker's).
"""

from __future__ import annotations

import json
import time
from typing import Any

from broker.connection import RedisClient
from broker.keys import Keys
from broker.models import TenantLimits
from broker.replies import typed_reply


def now_ms() -> int:
    """The one wall clock on the Python side (Lua uses Redis ``TIME``)."""
    return time.time_ns() // 1_000_000


class FleetRecords:
    _redis: RedisClient
    _keys: Keys

    async def register_model(
        self, model: str, max_model_len: int = 0, *, tokenizer: str | None = None, only_if_absent: bool = False
    ) -> None:
        """Make a model admissible; ``tokenizer`` is a local folder the API may count tokens with.

        ``only_if_absent`` never overwrites a record (a worker's knows max_model_len).
        """
        info: dict[str, Any] = {"max_model_len": max_model_len}
        if tokenizer:
            info["tokenizer"] = tokenizer
        record = json.dumps(info)
        if only_if_absent:
            await typed_reply(self._redis.hsetnx(self._keys.models, model, record))
        else:
            await typed_reply(self._redis.hset(self._keys.models, model, record))

    async def models(self) -> dict[str, dict[str, Any]]:
        raw = await typed_reply(self._redis.hgetall(self._keys.models))
        return {m: json.loads(v) for m, v in raw.items()}

    async def set_tenant(self, tenant: str, limits: TenantLimits) -> None:
        data = limits.model_dump()
        data["priorities"] = "".join(str(p) for p in sorted(set(limits.priorities)))
        # Every field is written, so one HSET replaces the record atomically (no MULTI: a
        # cluster client has none).
        await typed_reply(self._redis.hset(self._keys.tenant(tenant), mapping=data))

    async def get_tenant(self, tenant: str) -> TenantLimits | None:
        raw = await typed_reply(self._redis.hgetall(self._keys.tenant(tenant)))
        if not raw:
            return None
        raw["priorities"] = [int(c) for c in raw.get("priorities", "")]
        return TenantLimits.model_validate(raw)

    async def heartbeat(self, worker_id: str, record: dict[str, Any]) -> None:
        record = {**record, "id": worker_id, "seen_ms": now_ms()}
        await typed_reply(self._redis.hset(self._keys.workers, worker_id, json.dumps(record)))

    async def deregister(self, worker_id: str) -> None:
        await typed_reply(self._redis.hdel(self._keys.workers, worker_id))

    async def workers(self, max_age_ms: int = 15_000) -> list[dict[str, Any]]:
        raw = await typed_reply(self._redis.hgetall(self._keys.workers))
        cutoff, alive, dead = now_ms() - max_age_ms, [], []
        for wid, rec in raw.items():
            r = json.loads(rec)
            if r.get("seen_ms", 0) >= cutoff:
                alive.append(r)
            else:
                dead.append(wid)
        if dead:
            await typed_reply(self._redis.hdel(self._keys.workers, *dead))
        return alive

    # -- API keys (stored only as hashes) ---------------------------------
    async def put_api_key(self, key_hash: str, record: dict[str, Any]) -> None:
        await typed_reply(self._redis.hset(self._keys.api_keys, key_hash, json.dumps(record)))

    async def get_api_key(self, key_hash: str) -> dict[str, Any] | None:
        raw = await typed_reply(self._redis.hget(self._keys.api_keys, key_hash))
        return json.loads(raw) if raw else None

    async def api_keys(self) -> dict[str, dict[str, Any]]:
        return {h: json.loads(v) for h, v in (await typed_reply(self._redis.hgetall(self._keys.api_keys))).items()}

    async def delete_api_key(self, key_hash: str) -> bool:
        return bool(await typed_reply(self._redis.hdel(self._keys.api_keys, key_hash)))
