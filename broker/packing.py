"""Commands packed in C.

redis-py 5's asyncio connections pack each command in Python: for an admission's 37
arguments about 37 µs of the client's CPU, its largest cost per job. hiredis (a dependency,
``redis[hiredis]``) packs the same bytes in about a tenth of that. Anything it refuses (a
type it does not pack, another text encoding) goes to redis-py's packer and its errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is a dependency
    _pack = None


class HiredisPacking(AbstractConnection):
    """A connection mixin: ``pack_command`` by hiredis, byte for byte what redis-py sends."""

    def pack_command(self, *args: Any) -> list[bytes]:
        enc = self.encoder
        if _pack is None or enc.encoding != "utf-8" or enc.encoding_errors != "strict":
            return super().pack_command(*args)
        head = args[0]
        if isinstance(head, str) and " " in head:  # 'SCRIPT LOAD': sent as two arguments (as redis-py)
            args = (*head.encode().split(), *args[1:])
        elif isinstance(head, bytes) and b" " in head:
            args = (*head.split(), *args[1:])
        try:
            return [_pack(args)]
        except TypeError:  # e.g. a memoryview, or a value redis-py refuses with its own error
            return super().pack_command(*args)


class PackedConnection(HiredisPacking, Connection):
    pass


class PackedSSLConnection(HiredisPacking, SSLConnection):
    pass


class PackedSentinelConnection(HiredisPacking, SentinelManagedConnection):
    pass


class PackedSentinelSSLConnection(HiredisPacking, SentinelManagedSSLConnection):
    pass


def packed_class(cls: type[Connection]) -> type[Connection]:
    """The hiredis-packing class for a Cluster node's connection class (plain or TLS)."""
    return PackedSSLConnection if issubclass(cls, SSLConnection) else PackedConnection
