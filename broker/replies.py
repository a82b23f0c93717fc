"""Typed replies of the asyncio Redis client.

redis-py types each command once for its sync and asyncio clients, as
``Awaitable[X] | X``; on :class:`redis.asyncio.Redis` the call is always awaitable.
:func:`typed_reply` says so to the type checker in one place instead of at every call.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar, cast

T = TypeVar("T")


async def typed_reply(call: Awaitable[T] | T) -> T:
    """Await one command of the asyncio client, typed by what the command returns."""
    return await cast("Awaitable[T]", call)
