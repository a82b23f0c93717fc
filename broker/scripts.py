"""Loads the Lua scripts once; each is prefixed with the shared helpers of ``_lib.lua`` it uses.

redis-py's ``Script`` runs EVALSHA and falls back to EVAL on NOSCRIPT, so a
restarted Redis (which forgets loaded scripts) needs no special handling.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from broker.connection import ClusterClient, RedisClient

NAMES = ("admit", "claim", "renew", "append", "complete", "fail", "reap", "cancel", "backlog")


# On a Cluster every script call also names a key that never exists (Keys.slot_guard, last
# in KEYS; the script drops it first). Redis refuses a multi-key call with a missing key on a
# slot being resharded, before the script runs (TRYAGAIN on the source while some of its keys
# are there, ASK then TRYAGAIN on the target), so no script runs while its slot moves: the keys
# a script finds on its way (a tenant's queue, the queued index) may have left or not arrived,
# and a refused key stops a script half-way. On a stable slot a missing key costs nothing.
GUARD = "KEYS[#KEYS] = nil  -- the slot guard key (broker/scripts.py)\n"


def library() -> str:
    """The shared Lua helpers every script is built on (benchmarks build probes on them)."""
    return (resources.files("broker") / "lua" / "_lib.lua").read_text()


_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)\b", re.M)


def _units(lib: str) -> list[tuple[str, str]]:
    """The library's top-level definitions in order, as (name, text up to the next one)."""
    if several := re.search(r"^local [A-Za-z_][A-Za-z0-9_]*\s*,.*$", lib, re.M):
        raise ValueError(f"one name per top-level local in the Lua library: {several.group(0)!r}")
    starts = list(_DEFINITION.finditer(lib))
    ends = [m.start() for m in starts[1:]] + [len(lib)]
    return [(m.group(1), lib[m.start() : end]) for m, end in zip(starts, ends, strict=True)]


def used_library(body: str, lib: str) -> str:
    """The library's definitions that ``body`` names, directly or through each other, in order.

    Redis runs a script's whole text at every call, so each definition it carries costs every
    call (the whole library: about 4 µs of Redis CPU, a fifth of a small script). A reference
    is a name as a word (the library and the scripts call nothing by a computed name), so the
    closure misses nothing; a name in a comment only adds a definition that is never called.
    """
    units = _units(lib)
    wanted: set[str] = set()
    texts = [body]
    while texts:
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", texts.pop()))
        for name, text in units:
            if name in words and name not in wanted:
                wanted.add(name)
                texts.append(text)
    return "".join(text for name, text in units if name in wanted)


@functools.cache
def source(name: str, *, cluster: bool = False) -> str:
    lua = resources.files("broker") / "lua"
    guard = GUARD if cluster else ""
    body = (lua / f"{name}.lua").read_text()
    return used_library(guard + body, library()) + "\n" + guard + body


class Script(Protocol):
    """A loaded script (redis-py's AsyncScript); ``client`` is a pipeline of either client kind."""

    @property
    def sha(self) -> str: ...

    @property
    def script(self) -> Any: ...

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
    backlog: Script

    def all(self) -> list[Script]:
        return [getattr(self, name) for name in NAMES]

    @classmethod
    def register(cls, redis: RedisClient, slot_guard: str) -> Scripts:
        """The scripts for ``redis``; on a Cluster each call also names ``slot_guard`` (see GUARD)."""
        # AsyncScript takes a cluster client too (it runs EVALSHA / SCRIPT LOAD, routed by the
        # first key); redis-py annotates only the standalone one.
        if not isinstance(redis, ClusterClient):
            return cls(**{name: AsyncScript(redis, source(name)) for name in NAMES})
        scripts = {name: AsyncScript(cast(Redis, redis), source(name, cluster=True)) for name in NAMES}
        redis.script_sources.update({s.sha: str(s.script) for s in scripts.values()})  # for new primaries
        return cls(**{name: Guarded(s, slot_guard) for name, s in scripts.items()})


@dataclass(frozen=True, slots=True)
class Guarded:
    """A Cluster script: every call names the slot guard key last (see GUARD)."""

    inner: AsyncScript
    guard: str

    @property
    def sha(self) -> str:
        return str(self.inner.sha)

    @property
    def script(self) -> Any:
        return self.inner.script

    def __call__(self, keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Awaitable[Any]:
        return self.inner([*keys, self.guard], args, client)
