"""``python -m benchmarks slot-guard``: Redis CPU of the Cluster reshard guard per script call.

On a private 3-master Cluster, calls of an empty script built on genq's script library, with
and without the guard key every genq script call names on a Cluster (broker/scripts.py GUARD),
alternating; Redis's own ``usec_per_call`` of those calls from ``INFO commandstats``.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis, RedisCluster

from benchmarks.redis_server import servers
from broker.keys import Keys
from broker.scripts import GUARD, library


async def measure(calls: int = 20_000, rounds: int = 2) -> list[str]:
    lib = library()
    keys = Keys("bench")
    key = keys.stats("m")
    variants = {
        "without": (lib + "\nreturn 1\n", [key]),
        "with": (lib + "\n" + GUARD + "return 1\n", [key, keys.slot_guard]),
    }
    lines = []
    async with servers(3, cluster=True) as ports:
        cluster = RedisCluster(host="127.0.0.1", port=ports[0])
        await cluster.initialize()
        node = cluster.get_node_from_key(key)  # the master of the queue's slot
        await cluster.aclose()
        r = Redis(host=node.host, port=node.port)
        try:
            for _ in range(rounds):
                for name, (src, ks) in variants.items():
                    sha = await r.script_load(src)
                    await r.config_resetstat()
                    for i in range(0, calls, 500):
                        pipe = r.pipeline(transaction=False)
                        for _ in range(min(500, calls - i)):
                            pipe.evalsha(sha, len(ks), *ks)
                        await pipe.execute()
                    st = (await r.info("commandstats"))["cmdstat_evalsha"]
                    us, n = st["usec_per_call"], st["calls"]
                    lines.append(f"{name:>7} the guard key: {us:.2f} us per script call ({n} calls)")
        finally:
            await r.aclose()
    return lines


def run() -> list[str]:
    return asyncio.run(measure())
