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


def source(name: str) -> str:
    lua = resources.files("broker") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


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
        scripts = {name: AsyncScript(cast(Redis, redis), source(name)) for name in NAMES}
        if isinstance(redis, ClusterClient):  # its pipelines load what a new primary lacks
            redis.script_sources.update({s.sha: str(s.script) for s in scripts.values()})
        return cls(**scripts)
