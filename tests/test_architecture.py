"""Architecture rules, checked: `api` never imports vllm, `worker` never imports fastapi, only
`broker` knows Redis keys and Lua, and no package's modules import each other in a circle."""

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


@pytest.mark.parametrize("module", ["worker.main", "worker.loop", "worker.cli", "worker.process"])
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
    re.compile(r"""["'][^"'\n]*:m:[^"'\n]*:(stats|queued|leases|wake|wake_u|ctl)"""),
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


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Each module of ``package`` (under ``root``) → the modules of ``package`` it imports anywhere:
    at the top, inside functions, under ``TYPE_CHECKING``.  Importing ``a.b`` is not counted as
    importing ``a`` (every submodule would otherwise form a circle with its package)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = {f"{module}.{a.name}" for a in node.names}
                targets |= names if names <= files.keys() else names | {module}  # `from pkg import submodule`
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return None


@pytest.mark.parametrize("package", ["broker", "worker", "api", "genq"])
def test_no_import_cycles(package: str) -> None:
    graph = import_graph(ROOT, package)
    assert len(graph) > 3 and any(graph.values())  # the walk sees the package's modules and imports
    assert find_cycle(graph) is None


def test_the_cycle_check_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .c import C\n")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.c import C\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nclass C: ...\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a"},
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (pkg / "sub" / "c.py").write_text("class C: ...\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
