"""``python -m benchmarks queue --quick --systems genq,bullmq-node`` runs end to end on its own
redis-server, installing the Node BullMQ peer (npm) into its cache folder on first use.

Not a timing test: it checks that both systems were measured on every measure, that the figures
are positive, and that the summary names the peer on each ratio. Skipped only where the peer
cannot run at all (no node/npm on the machine); a failing npm install fails the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # benchmarks/ runs from the checkout, not the installed package
MEASURE = re.compile(
    r"(?P<label>[a-zA-Z0-9 ()/µ]+?) (?P<genq>[\d.,]+) vs (?P<peer>[\d.,]+) BullMQ \(Node 6\.7\) "
    r"= (?P<ratio>[\d.]+)x"
)
LABELS = [
    "latency p50 (ms)",
    "latency p99 (ms)",
    "enqueue (jobs/s)",
    "drain (jobs/s)",
    "Redis CPU per job (µs)",
    "commands per job",
    "bytes kept per finished job",
]


@pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")), reason="node and npm are not installed")
@pytest.mark.timeout(90)  # ~15 s once the peer is installed; an npm install adds ~10 s
def test_quick_run_against_node_bullmq() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "queue", "--quick", "--systems", "genq,bullmq-node"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=85,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    prefix = "genq bench queue: genq vs the strongest peer on each (ratio genq/peer): "
    assert last.startswith(prefix), last
    found = [MEASURE.fullmatch(part.strip()) for part in last.removeprefix(prefix).split(";")]
    assert all(found), last
    assert [m["label"] for m in found if m] == LABELS
    for m in found:
        assert m is not None
        genq, peer = float(m["genq"].replace(",", "")), float(m["peer"].replace(",", ""))
        assert genq > 0 and peer > 0, m.group(0)
        assert abs(float(m["ratio"]) - genq / peer) <= 0.01 + 0.01 * genq / peer, m.group(0)
    # The table has both columns and reports its sample counts.
    assert "BullMQ (Node 6.7)" in proc.stdout and "latency samples" in proc.stdout


def test_unknown_system_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "queue", "--quick", "--systems", "genq,celery"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "celery" in proc.stderr
