"""Start-up check of the Redis server genq depends on for durability."""

from __future__ import annotations

from typing import Any

import structlog

from broker.connection import ClusterClient, RedisClient
from broker.errors import RedisMisconfigured
from broker.settings import BrokerSettings

log = structlog.get_logger(__name__)

MIN_VERSION = (6, 2)


async def check_redis(redis: RedisClient, settings: BrokerSettings) -> list[str]:
    """Return the problems found; raise RedisMisconfigured for them in production.

    Uses INFO only, which managed Redis services allow even where CONFIG is disabled.
    """
    if isinstance(redis, ClusterClient):  # every primary holds queues
        infos = list((await redis.info(target_nodes=ClusterClient.PRIMARIES)).values())
    else:
        infos = [await redis.info()]
    problems: list[str] = []
    for info in infos:
        for p in _problems(info):
            if p not in problems:
                problems.append(p)
    for p in problems:
        log.warning("redis misconfigured", problem=p, env=settings.env)
    for a in await tuning_advice(redis):
        log.warning("redis tuning", advice=a)
    if problems and settings.env == "production":
        raise RedisMisconfigured("; ".join(problems))
    return problems


def _problems(info: dict[str, Any]) -> list[str]:
    problems = []
    version = tuple(int(x) for x in str(info.get("redis_version", "0.0")).split(".")[:2])
    if version < MIN_VERSION:
        problems.append(f"Redis {info.get('redis_version')} is too old: genq needs >= 6.2 (LMOVE, XAUTOCLAIM, GETDEL)")
    if int(info.get("aof_enabled", 0)) != 1:
        problems.append("Redis has `appendonly no`: acknowledged jobs are lost on a restart; set `appendonly yes`")
    policy = info.get("maxmemory_policy", "noeviction")
    if policy != "noeviction":
        problems.append(
            f"Redis has `maxmemory-policy {policy}`: it may evict queued jobs; set `maxmemory-policy noeviction`"
        )
    return problems


# Settings that cost memory, not durability (deploy/redis.conf sets both):
# - a job's event stream holds a few small entries; Redis sizes a stream's nodes by
#   stream-node-max-bytes, so the default (4096) made a finished no-op job cost 5,262 B where 512
#   made it 1,678 B and 320 1,486 B (`genq bench queue --systems genq`); a stream of 130 token
#   events costs about 2 % more at 320 than at 512 (more, smaller nodes);
# - a job hash holds its request JSON, longer than Redis's default hash-max-listpack-value (64):
#   the whole hash then leaves the compact listpack encoding (a finished job's hash: 1,830 B
#   instead of 616 B, MEMORY USAGE on Redis 7.0).
STREAM_NODE_MAX_BYTES = 320
HASH_MAX_LISTPACK_VALUE = 1024


async def _config(redis: RedisClient, name: str) -> int | None:
    value = (await redis.config_get(name)).get(name)
    return None if value is None else int(value)


async def tuning_advice(redis: RedisClient) -> list[str]:
    """Settings that cost memory (not durability): advice, never fatal. Needs CONFIG GET,
    which some managed services refuse: then there is nothing to say."""
    try:
        nodes = await _config(redis, "stream-node-max-bytes")
        values = await _config(redis, "hash-max-listpack-value")  # None before Redis 7 (ziplist)
    except Exception:  # noqa: BLE001 - CONFIG disabled or renamed
        return []
    advice = []
    if nodes is not None and not 0 < nodes <= STREAM_NODE_MAX_BYTES:  # 0: no limit at all
        advice.append(
            f"Redis has `stream-node-max-bytes {nodes}`: each job's event stream then takes more memory "
            f"(a finished job keeps ~190 B more at 512 and ~3.8 KB more at 4096 than at {STREAM_NODE_MAX_BYTES}); "
            f"set `stream-node-max-bytes {STREAM_NODE_MAX_BYTES}`"
        )
    if values is not None and values < HASH_MAX_LISTPACK_VALUE:
        advice.append(
            f"Redis has `hash-max-listpack-value {values}`: a job hash (it holds the request) then leaves "
            f"the compact encoding, about 3x the memory; set `hash-max-listpack-value {HASH_MAX_LISTPACK_VALUE}`"
        )
    return advice
