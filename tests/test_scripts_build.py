"""Each script carries the library definitions it names, directly or through each other, and no more."""

from __future__ import annotations

import json
import re

import pytest
import redis as redis_sync
from hypothesis import given, settings
from hypothesis import strategies as st
from test_lua_contract import SHARED_REDIS

from broker.scripts import NAMES, _units, library, source, used_library

LIB = """-- header
local A = {x = 'x'}
local function f() return A.x end
-- f's neighbour
local function g() return f() end
local function h() return 1 end
"""


def test_a_definition_named_through_another_comes_along_in_library_order() -> None:
    assert used_library("return g()", LIB) == "".join(t for n, t in _units(LIB) if n in {"A", "f", "g"})
    assert "function h" not in used_library("return g()", LIB)
    assert used_library("return 1", LIB) == ""


def test_a_top_level_local_naming_two_is_refused() -> None:
    with pytest.raises(ValueError, match="one name per top-level local"):
        used_library("return b", LIB + "local a, b = 1, 2\n")


def test_every_library_name_a_built_script_uses_is_defined_in_it() -> None:
    names = {n for n, _ in _units(library())}
    for name in NAMES:
        for cluster in (False, True):
            src = source(name, cluster=cluster)
            defined = {n for n in names if re.search(rf"^local (function )?{n}\b", src, re.M)}
            used = names & set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", src))
            assert used == defined, (name, used - defined)


def test_a_small_script_carries_a_small_part_of_the_library() -> None:
    renew = source("renew")
    assert "local function k_job" in renew and "local function enqueue" not in renew
    assert len(renew) < len(library()) / 4


@settings(max_examples=60, deadline=None)
@given(st.text(), st.integers(0, 10**6), st.integers(1, 64), st.sampled_from(["", '{"token":"a","logprob":-0.5}']))
def test_a_token_events_data_is_json_of_its_fields(text: str, seq: int, n: int, logprobs: str) -> None:
    script = library() + "\nreturn token_event(tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4])"
    data = json.loads(redis_sync.Redis.from_url(SHARED_REDIS).eval(script, 0, seq, text, n, logprobs))
    want = {"seq": seq, "text": text, "n": n} | ({"logprobs": [json.loads(logprobs)]} if logprobs else {})
    assert data == want
