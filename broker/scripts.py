"""Loads the Lua scripts once; each is prefixed with the shared helpers in ``_lib.lua``.

redis-py's ``Script`` runs EVALSHA and falls back to EVAL on NOSCRIPT, so a
restarted Redis (which forgets loaded scripts) needs no special handling.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

NAMES = ("admit", "claim", "renew", "append", "complete", "fail", "reap", "cancel")


def source(name: str) -> str:
    lua = resources.files("broker") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Scripts:
    admit: AsyncScript
    claim: AsyncScript
    renew: AsyncScript
    append: AsyncScript
    complete: AsyncScript
    fail: AsyncScript
    reap: AsyncScript
    cancel: AsyncScript

    def all(self) -> list[AsyncScript]:
        return [getattr(self, name) for name in NAMES]

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(**{name: redis.register_script(source(name)) for name in NAMES})
