"""``python -m benchmarks queue-arq --quick`` runs end to end against the real Redis and prints a parseable summary.

Not a timing test: it checks that both systems were measured and every figure is positive.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import redis as redis_sync

from benchmarks.common import percentile

ROOT = Path(__file__).resolve().parent.parent  # benchmarks/ runs from the checkout, not the installed package
REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

SUMMARY = re.compile(
    r"^genq bench queue: latency p50 (?P<g50>[\d.]+) ms / p99 (?P<g99>[\d.]+) ms "
    r"\(arq (?P<a50>[\d.]+) / (?P<a99>[\d.]+) ms, (?P<r50>[\d.]+)x / (?P<r99>[\d.]+)x faster\); "
    r"drain (?P<g_rate>[\d,]+) jobs/s \(arq (?P<a_rate>[\d,]+) jobs/s, (?P<r_rate>[\d.]+)x\)$"
)


def test_quick_run_prints_a_parseable_last_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "queue-arq", "--quick", "--redis-url", REDIS_URL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = SUMMARY.match(last)
    assert m, f"unexpected last line: {last!r}"
    figures = {k: float(v.replace(",", "")) for k, v in m.groupdict().items()}
    assert all(v > 0 for v in figures.values()), figures
    assert "arq 0.28" in proc.stdout  # the table was printed
    # Its random namespace (logged at the start) is gone afterwards, genq's and arq's keys alike.
    ns = re.search(r'"queue": "(bench[0-9a-f]+)"', proc.stderr)
    assert ns, proc.stderr[-3000:]
    client = redis_sync.Redis.from_url(REDIS_URL)
    assert not list(client.scan_iter(match=f"*{ns.group(1)}*", count=1000))


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([5.0, 1.0], 50) == 1.0
