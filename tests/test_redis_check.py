"""The start-up check of Redis durability settings, against real servers of our own."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from broker import BrokerSettings
from broker.errors import RedisMisconfigured
from broker.redis_check import check_redis

pytestmark = pytest.mark.asyncio


async def problems_of(url: str, env: str = "development") -> list[str]:
    client = Redis.from_url(url, decode_responses=True)
    try:
        return await check_redis(client, BrokerSettings(redis_url=url, env=env))
    finally:
        await client.aclose()


async def test_no_aof_is_reported(redis_server) -> None:
    srv = redis_server()  # appendonly no (the default)
    problems = await problems_of(srv.url)
    assert len(problems) == 1
    assert "`appendonly no`" in problems[0] and "`appendonly yes`" in problems[0]


async def test_evicting_policy_is_reported(redis_server) -> None:
    srv = redis_server("--appendonly", "yes", "--maxmemory-policy", "allkeys-lru")
    problems = await problems_of(srv.url)
    assert len(problems) == 1
    assert "`maxmemory-policy allkeys-lru`" in problems[0]
    assert "`maxmemory-policy noeviction`" in problems[0]


async def test_both_problems_and_production_refuses(redis_server) -> None:
    srv = redis_server("--maxmemory-policy", "volatile-ttl")
    problems = await problems_of(srv.url)
    assert len(problems) == 2
    assert "appendonly" in problems[0] and "maxmemory-policy volatile-ttl" in problems[1]
    with pytest.raises(RedisMisconfigured) as info:
        await problems_of(srv.url, env="production")
    assert info.value.code == "redis_misconfigured"
    assert "appendonly" in str(info.value) and "maxmemory-policy" in str(info.value)


async def test_good_config_passes_in_production(redis_server) -> None:
    srv = redis_server("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")
    assert await problems_of(srv.url) == []
    assert await problems_of(srv.url, env="production") == []


async def test_large_stream_nodes_get_advice_never_a_refusal(redis_server) -> None:
    from structlog.testing import capture_logs

    default = redis_server("--appendonly", "yes")  # stream-node-max-bytes 4096, Redis's default
    with capture_logs() as logs:
        assert await problems_of(default.url, env="production") == []  # memory, not durability
    advice = [e["advice"] for e in logs if e["event"] == "redis tuning"]
    assert len(advice) == 2 and "`stream-node-max-bytes 4096`" in advice[0]
    assert "`stream-node-max-bytes 320`" in advice[0]
    assert "`hash-max-listpack-value 64`" in advice[1] and "`hash-max-listpack-value 1024`" in advice[1]

    older = redis_server("--appendonly", "yes", "--stream-node-max-bytes", "512", "--hash-max-listpack-value", "1024")
    with capture_logs() as logs:
        await problems_of(older.url)  # what an earlier deploy/redis.conf set
    [advice] = [e["advice"] for e in logs if e["event"] == "redis tuning"]
    assert "`stream-node-max-bytes 512`" in advice and "`stream-node-max-bytes 320`" in advice

    tuned = redis_server("--appendonly", "yes", "--stream-node-max-bytes", "320", "--hash-max-listpack-value", "1024")
    with capture_logs() as logs:
        await problems_of(tuned.url)
    assert not [e for e in logs if e["event"] == "redis tuning"]
