"""Loads the Lua scripts once; each is prefixed with the shared helpers in ``_lib.lua``.

redis-py's ``Script`` runs EVALSHA and falls back to EVAL on NOSCRIPT, so a
restarted Redis (which forgets loaded scripts) needs no special handling.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from broker.connection import ClusterClient, RedisClient

NAMES = ("admit", "claim", "renew", "append", "complete", "fail", "reap", "cancel")


# On a Cluster every script first refuses to run while its slot is being resharded (see
# slot_in_transition in _lib.lua): the keys a script discovers may have left, or not arrived.
GUARD = (
    "if CLUSTER and slot_in_transition(KEYS[1]) then\n"
    "  return redis.error_reply('TRYAGAIN the queue slot is being resharded; retry')\nend\n"
)


def source(name: str, *, cluster: bool = False) -> str:
    lua = resources.files("broker") / "lua"
    flag = f"local CLUSTER = {'true' if cluster else 'false'}\n"
    return flag + (lua / "_lib.lua").read_text() + "\n" + GUARD + (lua / f"{name}.lua").read_text()


class Script(Protocol):
    """A loaded script (redis-py's AsyncScript); ``client`` is a pipeline of either client kind."""

    sha: str
    script: Any

    def __call__(self, keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class Scripts:
    admit: Script
    claim: Script
    renew: Script
    append: Script
    complete: Script
    fail: Script
    reap: Script
    cancel: Script

    def all(self) -> list[Script]:
        return [getattr(self, name) for name in NAMES]

    @classmethod
    def register(cls, redis: RedisClient) -> Scripts:
        # AsyncScript takes a cluster client too (it runs EVALSHA / SCRIPT LOAD, routed by the
        # first key); redis-py annotates only the standalone one.
        cluster = isinstance(redis, ClusterClient)
        scripts = {name: AsyncScript(cast(Redis, redis), source(name, cluster=cluster)) for name in NAMES}
        if cluster:  # its pipelines load what a new primary lacks
            redis.script_sources.update({s.sha: str(s.script) for s in scripts.values()})
        return cls(**scripts)
