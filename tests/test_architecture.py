"""Architecture rules, checked: `api` never imports vllm, `worker` never imports fastapi, and only
`broker` knows Redis keys and Lua."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OTHER_PACKAGES = ("api", "worker", "genq", "batcher", "benchmarks")


def imported_modules(*modules: str, run: str = "") -> set[str]:
    """Import ``modules`` in a fresh interpreter and return every module name it then holds."""
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + run + "print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def top_level(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_api_never_imports_vllm() -> None:
    # building the app too, not only importing it
    loaded = top_level(imported_modules("api.app", "api.cli", run="api.app.create_app()\n"))
    assert "vllm" not in loaded
    assert "api" in loaded and "fastapi" in loaded  # the probe itself works


def test_api_cli_is_light() -> None:
    """`genq/cli.py` imports api.cli at every `genq` call: no web stack, no Redis, no vllm."""
    loaded = top_level(imported_modules("api.cli"))
    assert not loaded & {"fastapi", "uvicorn", "starlette", "redis", "vllm", "transformers"}


def present(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("module", ["worker.main", "worker.loop", "worker.cli"])
def test_worker_never_imports_fastapi(module: str) -> None:
    assert present(module), f"{module} is gone: update this test rather than let it pass vacuously"
    loaded = top_level(imported_modules(module))
    assert not loaded & {"fastapi", "starlette", "sse_starlette", "uvicorn"}
    assert module.split(".")[0] in loaded


# Literal fragments of Redis key names (see broker/keys.py) and Lua file references.
FORBIDDEN = [
    re.compile(r"genq:\{"),
    re.compile(r"\.lua\b"),
    re.compile(
        r"""["'][^"'\n]*:(job|ev|ch|tjobs|idem|apikeys|tenant|ts|workers|global|file|tfiles|batch|tbatches|bjobs|bsegs|blease)(:|["'])"""
    ),
    re.compile(r"""["'][^"'\n]*:m:[^"'\n]*:(stats|queued|leases|wake|ctl)"""),
    re.compile(r"\b(EVALSHA|EVAL|register_script)\b"),
]


def test_only_broker_knows_redis_keys_and_lua() -> None:
    offenders = []
    for pkg in OTHER_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if any(p.search(line) for p in FORBIDDEN):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_the_key_grep_would_catch_a_key() -> None:
    """The patterns above match the key shapes broker/keys.py really builds."""
    from broker.keys import Keys

    k = Keys("q")
    for key in (k.job("j"), k.events("j"), k.channel("j"), k.api_keys, k.tenant("t"), k.stats("m"), k.wake("m")):
        assert any(p.search(f'"{key}"') for p in FORBIDDEN), key
        assert any(p.search(f'"x{key.removeprefix(k.prefix)}"') for p in FORBIDDEN[2:4]), key
    assert FORBIDDEN[1].search('resources.files("broker") / "claim.lua"')


PRIVATE = {"redis", "keys", "_redis", "_keys", "_scripts", "scripts"}


def layering_offences(path: Path) -> list[str]:
    """``import redis`` anywhere (inside functions too), or a broker's Redis client, key map or
    scripts reached from outside ``broker/``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        if any(n == "redis" or n.startswith("redis.") for n in names):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {names}")
        owner = node.value if isinstance(node, ast.Attribute) else None
        if (
            isinstance(node, ast.Attribute)
            and node.attr in PRIVATE
            and isinstance(owner, (ast.Name, ast.Attribute))
            and ast.unparse(owner).endswith("broker")
        ):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_redis_outside_the_broker() -> None:
    files = [
        # batcher reaches Redis through the broker; arq (which it imports) opens its own pool from the URL
        p
        for pkg in ("api", "worker", "genq", "batcher")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if "bench" not in p.parts
    ]
    assert len(files) > 20
    offences = [o for f in files for o in layering_offences(f)]
    # genq up may start a redis-server and ping it before any broker exists
    assert [o for o in offences if not o.startswith("genq/up.py")] == []


def test_layering_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    bad = ROOT / "api" / "_layering_probe.py"
    bad.write_text("def f(b):\n    import redis.asyncio\n    return b.broker._redis, rt.broker.keys.job('x')\n")
    try:
        found = layering_offences(bad)
    finally:
        bad.unlink()
    assert len(found) == 3, found
