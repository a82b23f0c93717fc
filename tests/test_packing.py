"""Commands packed by hiredis are byte for byte what redis-py's own packer sends, and refused alike."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from broker.connection import RetriedConnection
from broker.packing import HiredisPacking

ARG = st.one_of(
    st.text(),
    st.binary(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)


def packed(conn: Connection, *args: Any) -> bytes:
    return b"".join(bytes(chunk) for chunk in conn.pack_command(*args))


@given(st.sampled_from(["EVALSHA", "HSET", b"XADD", "SCRIPT LOAD", b"CONFIG GET"]), st.lists(ARG, max_size=40))
def test_the_same_bytes_as_redis_py(head: str | bytes, args: list[Any]) -> None:
    ours, theirs = RetriedConnection(), Connection()
    assert isinstance(ours, HiredisPacking)
    assert packed(ours, head, *args) == packed(theirs, head, *args)


def test_a_large_value_and_a_memoryview() -> None:
    big = "x" * 100_000
    assert packed(RetriedConnection(), "SET", "k", big) == packed(Connection(), "SET", "k", big)
    view = memoryview(b"abc")
    assert packed(RetriedConnection(), "SET", "k", view) == packed(Connection(), "SET", "k", view)


@pytest.mark.parametrize("bad", [None, True, object()])
def test_what_redis_py_refuses_is_refused_with_its_error(bad: object) -> None:
    with pytest.raises(DataError):
        RetriedConnection().pack_command("SET", "k", bad)
