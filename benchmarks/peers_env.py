"""Where each system of ``python -m benchmarks queue`` runs: its interpreter, script and environment.

Peers whose pins clash with genq's venv get their own, created on first use under a cache folder
(``$GENQ_BENCH_CACHE``, default ``~/.cache/genq-bench/peers``) with pinned versions from the
package registries: arq 0.28 needs redis-py < 6 (genq's venv has it), bullmq 3.x needs >= 6.2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)
ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"


@dataclass(frozen=True)
class System:
    name: str
    label: str  # the table's column
    script: str  # in benchmarks/peers/
    pip: tuple[str, ...] = ()  # pinned requirements of its own venv; () = genq's venv
    npm: tuple[str, ...] = ()  # pinned npm packages of a Node peer
    retention: str = ""  # what a finished job leaves in Redis by default
    setup: str = ""
    latency_gap_s: tuple[float, float] = (0.005, 0.010)  # idle time before each probe
    env: dict[str, str] = field(default_factory=dict)


SYSTEMS = {
    s.name: s
    for s in (
        System(
            "genq",
            "genq",
            "genq_peer.py",
            retention="job hash + events until result_ttl_s (24 h)",
            setup="2 x admit_many(128); worker 4 x claim(32) + complete_many",
        ),
        System(
            "bullmq-node",
            "BullMQ (Node 6.7)",
            "bullmq_peer.cjs",
            npm=("bullmq@6.7.0", "ioredis@5.9.3"),  # ioredis is an optional peer dependency of bullmq 6
            retention="completed jobs kept (removeOnComplete unset) + events stream (~10k)",
            setup="addBulk(1,000); Worker concurrency 128",
        ),
        System(
            "bullmq-py",
            "BullMQ (Py 3.4)",
            "bullmq_peer.py",
            pip=("bullmq==3.4.*", "redis>=6.2"),
            retention="completed jobs kept (removeOnComplete unset)",
            setup="addBulk(1,000); Worker concurrency 128",
        ),
        System(
            "saq",
            "SAQ 0.26",
            "saq_peer.py",
            pip=("saq[redis]==0.26.4", "typing_extensions"),
            retention="job kept for its ttl (600 s)",
            setup="20 concurrent enqueue; Worker concurrency 16",
        ),
        System(
            "arq",
            "arq 0.28",
            "arq_peer.py",
            retention="result kept keep_result (3,600 s)",
            setup="32 concurrent enqueue_job; Worker max_jobs 100 (stock), poll 0.5 s",
            latency_gap_s=(0.0, 0.5),  # a random phase against its 0.5 s poll
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("GENQ_BENCH_CACHE", Path.home() / ".cache" / "genq-bench" / "peers"))


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    log.info("installing a peer", cmd=" ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _ensure_venv(s: System) -> Path:
    """The peer's venv, created and filled on first use; its python."""
    home = cache_dir() / s.name
    python, stamp = home / "bin" / "python", home / ".genq-installed"
    wanted = "\n".join(s.pip)
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    if home.exists():
        shutil.rmtree(home)
    _run([sys.executable, "-m", "venv", str(home)])
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *s.pip])
    stamp.write_text(wanted)
    return python


def _ensure_node(s: System) -> Path:
    """node_modules with the pinned npm package, installed on first use."""
    home = cache_dir() / s.name
    stamp = home / ".genq-installed"
    if not (shutil.which("node") and shutil.which("npm")):
        raise RuntimeError("node and npm are needed for the Node BullMQ peer")
    wanted = "\n".join(s.npm)
    if not (stamp.exists() and stamp.read_text() == wanted):
        home.mkdir(parents=True, exist_ok=True)
        _run(["npm", "install", "--no-audit", "--no-fund", "--silent", "--save-exact", *s.npm], cwd=home)
        stamp.write_text(wanted)
    return home / "node_modules"


def command(s: System) -> tuple[list[str], dict[str, str]]:
    """The argv prefix (interpreter and script) and environment that run ``s``'s peer script."""
    script = str(PEERS / s.script)
    env = dict(os.environ)
    if s.npm:
        env["NODE_PATH"] = str(_ensure_node(s))
        return [shutil.which("node") or "node", script], env
    if s.pip:
        env.pop("PYTHONPATH", None)  # nothing of genq's venv or checkout leaks into a peer's
        return [str(_ensure_venv(s)), script], env
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return [sys.executable, script], env
