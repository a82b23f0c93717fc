"""The Lua scripts and the Python contract agree: every status, event type, error code and
return code a script emits is a member of broker/contract.py's enums (or broker.errors.Code),
and every key a script builds itself has the shape broker/keys.py gives it.

The checks are functions over the script sources, so the tests below also run them on
mutated scripts and require them to fail there: a check that cannot fail proves nothing.
"""

from __future__ import annotations

import os
import re
from importlib import resources

import pytest
import redis as redis_sync

from broker.contract import EventType, JobErrorCode, JobStatus
from broker.errors import Code
from broker.keys import Keys
from broker.scripts import NAMES

SHARED_REDIS = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

TABLES = {"STATUS": JobStatus, "EVENT": EventType, "ERROR": JobErrorCode}
LITERAL = re.compile(r"'([^'\\]*)'")
TABLE_DEF = re.compile(r"local (STATUS|EVENT|ERROR) = \{(.*?)\}", re.S)
TABLE_REF = re.compile(r"\b(STATUS|EVENT|ERROR)\.(\w+)")
# Variables that carry a status / event type / error code into the checked positions below.
ASSIGNED = {"status": JobStatus, "etype": EventType, "code": JobErrorCode}
ASSIGNMENT = re.compile(r"^\s*(?:local\s+)?(\w+(?:\s*,\s*\w+)*)\s*=\s*([^=\n][^\n]*)$", re.M)
RETURN_CODE = re.compile(r"return \{(\d+)\b")
# Positions whose value is a status / event type / error code: (pattern, enum)
VALUE_AFTER = [
    (re.compile(r"'status', ([^,)]+)"), JobStatus, "'HSET'"),  # HMGET lists field names only
    (re.compile(r"'error_code', ([^,)]+)"), JobErrorCode, "'HSET'"),
    (re.compile(r"\bcode = ([^,})]+)"), JobErrorCode, ""),
]


def _statements(src: str, containing: str) -> list[str]:
    """Lines of ``src`` (continuation lines joined) that contain ``containing``."""
    joined = re.sub(r",\n\s*", ", ", src)
    return [line for line in joined.splitlines() if containing in line]


def sources() -> dict[str, str]:
    """Every script in broker/lua, the batch ones (loaded by broker.batches) included."""
    lua = resources.files("broker") / "lua"
    return {p.name.removesuffix(".lua"): p.read_text() for p in lua.iterdir() if p.name.endswith(".lua")}


def test_the_checks_see_every_script() -> None:
    assert {"_lib", *NAMES, "batch_update", "batch_lease", "record_put", "record_drop"} <= set(sources())


def _call_args(src: str, func: str) -> list[list[str]]:
    """Top-level arguments of every call ``func(...)`` in ``src``."""
    calls = []
    for m in re.finditer(rf"(?<![\w.]){func}\(", src):
        if src[max(0, m.start() - 15) : m.start()].endswith("local function "):
            continue  # the definition
        depth, i, cur, args = 1, m.end(), "", []
        while depth:
            c = src[i]
            if c in "({[":
                depth += 1
            elif c in ")}]":
                depth -= 1
            if depth == 1 and c == ",":
                args.append(cur.strip())
                cur = ""
            elif depth:
                cur += c
            i += 1
        args.append(cur.strip())
        calls.append(args)
    return calls


def _check_value(expr: str, enum: type, where: str) -> list[str]:
    """An emitted value must be a table reference of the right table, or a variable."""
    expr = expr.strip()
    if m := TABLE_REF.fullmatch(expr):
        if TABLES[m.group(1)] is not enum:
            return [f"{where}: {expr} used where a {enum.__name__} belongs"]
        return []
    if lit := LITERAL.fullmatch(expr):
        return [f"{where}: literal '{lit.group(1)}' instead of a {enum.__name__} table entry"]
    return []  # a variable: checked where it is assigned


def contract_problems(srcs: dict[str, str]) -> list[str]:
    problems: list[str] = []
    tables: dict[str, dict[str, str]] = {}
    for name, body in TABLE_DEF.findall(srcs["_lib"]):
        tables[name] = dict(re.findall(r"(\w+) = '([^']*)'", body))
    for name, enum in TABLES.items():
        entries = tables.get(name, {})
        members = {m.value for m in enum}
        for key, value in entries.items():
            if key != value or value not in members:
                problems.append(f"_lib: {name}.{key} = '{value}' is not a {enum.__name__} member")
        if name != "ERROR" and set(entries.values()) != members:  # ERROR: only what Lua itself writes
            problems.append(f"_lib: {name} lacks {sorted(members - set(entries.values()))}")
    codes = {c.value for c in Code}
    for script, src in srcs.items():
        for table, key in TABLE_REF.findall(src):
            if key not in tables.get(table, {}):
                problems.append(f"{script}: {table}.{key} is not defined")
        for code in RETURN_CODE.findall(src):
            if int(code) not in codes:
                problems.append(f"{script}: returns code {code}, not in broker.errors.Code")
        for pattern, enum, only_in in VALUE_AFTER:
            for stmt in _statements(src, only_in):
                for expr in pattern.findall(stmt):
                    problems += _check_value(expr, enum, script)
        for names, values in ASSIGNMENT.findall(src):
            for name, value in zip(names.split(","), values.split(","), strict=False):
                if (enum := ASSIGNED.get(name.strip())) is not None:
                    problems += _check_value(value, enum, f"{script} {name.strip()} =")
        for args in _call_args(src, "emit"):
            problems += _check_value(args[2], EventType, f"{script} emit")
        for func in ("emit_numbered",):
            for args in _call_args(src, func):
                problems += _check_value(args[3], EventType, f"{script} {func}")
        for args in _call_args(src, "finish"):
            problems += _check_value(args[1], JobStatus, f"{script} finish")
            problems += _check_value(args[2], EventType, f"{script} finish")
        for args in _call_args(src, "settle"):
            problems += _check_value(args[3], JobErrorCode, f"{script} settle")
    return problems


KEY_BUILDERS = {
    # Lua helper call (ARGV[1] = P, ARGV[2] = id, ARGV[3] = model, ARGV[4] = tenant) -> Keys builder
    "k_job(ARGV[1], ARGV[2])": lambda k: k.job("ID"),
    "k_events(ARGV[1], ARGV[2])": lambda k: k.events("ID"),
    "k_output(ARGV[1], ARGV[2])": lambda k: k.output("ID"),
    "k_output_ids(ARGV[1], ARGV[2])": lambda k: k.output_ids("ID"),
    "k_token_index(ARGV[1], ARGV[2])": lambda k: k.token_index("ID"),
    "k_channel(ARGV[1], ARGV[2])": lambda k: k.channel("ID"),
    "k_global(ARGV[1])": lambda k: k.global_,
    "k_tenant_state(ARGV[1], ARGV[4])": lambda k: k.tenant_state("acme"),
    "k_model(ARGV[1], ARGV[3])": lambda k: k.model_prefix("org/model:1"),
    "k_stats(k_model(ARGV[1], ARGV[3]))": lambda k: k.stats("org/model:1"),
    "k_queued(k_model(ARGV[1], ARGV[3]))": lambda k: k.queued("org/model:1"),
    "k_leases(k_model(ARGV[1], ARGV[3]))": lambda k: k.leases("org/model:1"),
    "k_deadlines(k_model(ARGV[1], ARGV[3]))": lambda k: k.deadlines("org/model:1"),
    "k_wake(k_model(ARGV[1], ARGV[3]))": lambda k: k.wake("org/model:1"),
    "k_wake_urgent(k_model(ARGV[1], ARGV[3]))": lambda k: k.wake_urgent("org/model:1"),
    "k_control(k_model(ARGV[1], ARGV[3]))": lambda k: k.control("org/model:1"),
    "k_tenants(k_model(ARGV[1], ARGV[3]), 7)": lambda k: k.tenants("org/model:1", 7),
    "k_vtc(k_model(ARGV[1], ARGV[3]), 7)": lambda k: k.vtc("org/model:1", 7),
    "k_tenant_queue(k_model(ARGV[1], ARGV[3]), 7, ARGV[4])": lambda k: k.tenant_queue("org/model:1", 7, "acme"),
    "k_webhooks(ARGV[1])": lambda k: k.webhooks,
}
KEY_CONCAT = re.compile(r"\.\.\s*'[^']*:")


def key_problems(srcs: dict[str, str], client: redis_sync.Redis) -> list[str]:
    problems = []
    # 1. Keys are built only by the k_* helpers of _lib.lua.
    for script, src in srcs.items():
        for n, line in enumerate(src.splitlines(), 1):
            if KEY_CONCAT.search(line) and not line.startswith("local function k_"):
                problems.append(f"{script}:{n}: builds a key outside the k_* helpers: {line.strip()}")
    helpers = set(re.findall(r"^local function (k_\w+)\(", srcs["_lib"], re.M))
    tested = {call.split("(")[0] for call in KEY_BUILDERS}
    if helpers != tested:
        problems.append(f"k_* helpers without a test: {sorted(helpers - tested)}")
    # 2. Each helper builds exactly what broker/keys.py builds (evaluated by Redis itself).
    keys = Keys("q-1")
    script = srcs["_lib"] + "\nreturn {" + ", ".join(KEY_BUILDERS) + "}"
    got = client.eval(script, 0, keys.prefix, "ID", "org/model:1", "acme")
    for (call, build), value in zip(KEY_BUILDERS.items(), got, strict=True):
        if value.decode() != build(keys):
            problems.append(f"{call} builds {value.decode()!r}, broker/keys.py {build(keys)!r}")
    return problems


@pytest.fixture
def client() -> redis_sync.Redis:
    return redis_sync.Redis.from_url(SHARED_REDIS)


def test_every_emitted_name_is_a_contract_member() -> None:
    assert contract_problems(sources()) == []


@pytest.mark.parametrize(
    ("script", "old", "new"),
    [
        ("_lib", "EVENT.token, data, seq)", "EVENT.tokens, data, seq)"),  # an undefined table entry (nil in Lua)
        ("claim", "EVENT.started", "'starting'"),  # a bare literal event type (emit_numbered)
        ("_lib", "emit(J, maxlen, EVENT.retry", "emit(J, maxlen, 'again'"),  # a bare literal event type (emit)
        ("complete", "STATUS.succeeded, EVENT.done", "'success', EVENT.done"),
        ("reap", "settle(P, J, jid, ERROR.worker_lost", "settle(P, J, jid, 'lost'"),
        ("_lib", "cancelled = 'cancelled', expired", "cancelled = 'canceled', expired"),
        ("renew", "out[#out + 1] = 21", "out[#out + 1] = 21; return {29}"),
        ("_lib", "'error_code', ERROR.deadline_exceeded", "'error_code', 'too_late'"),
    ],
)
def test_contract_check_fails_on_a_mutated_script(script: str, old: str, new: str) -> None:
    srcs = sources()
    assert old in srcs[script]
    srcs[script] = srcs[script].replace(old, new, 1)
    assert contract_problems(srcs) != []


def test_every_key_a_script_builds_matches_broker_keys(client: redis_sync.Redis) -> None:
    assert key_problems(sources(), client) == []


@pytest.mark.parametrize(
    ("script", "old", "new"),
    [
        ("_lib", "P .. ':ev:' .. jid", "P .. ':evt:' .. jid"),  # a helper drifts from keys.py
        ("reap", "local J = job_keys(P, jid)", "local J = job_keys(P, jid); local x = P .. ':job:' .. jid"),
        ("_lib", "mp .. ':deadlines'", "mp .. ':deadline'"),
        ("record_put", "'ZADD', KEYS[2]", "'ZADD', 'genq:{q}' .. ':tfiles:' .. ARGV[1]"),
    ],
)
def test_key_check_fails_on_a_mutated_script(client: redis_sync.Redis, script: str, old: str, new: str) -> None:
    srcs = sources()
    assert old in srcs[script]
    srcs[script] = srcs[script].replace(old, new, 1)
    assert key_problems(srcs, client) != []


def test_the_claim_script_reads_the_fields_the_client_names():
    from broker.client import CLAIMED_FIELDS

    src = sources()["claim"]
    hmget = re.search(r"redis\.call\('HMGET', J\.job, (.*?)\)", src, re.S)
    assert hmget, "claim.lua reads the job with one HMGET"
    assert (*re.findall(r"'(\w+)'", hmget.group(1)), "output", "output_ids") == CLAIMED_FIELDS
