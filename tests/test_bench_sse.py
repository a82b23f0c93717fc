"""``python -m benchmarks sse --quick`` runs end to end (a real ``genq api`` subprocess, real Redis, httpx
SSE clients, the simulated producer) and prints a parseable summary as its last line.

Not a timing test: it checks that every part was measured and every figure is positive.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import redis as redis_sync

ROOT = Path(__file__).resolve().parent.parent  # benchmarks/ runs from the checkout, not the installed package
REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

NUMBER = r"[\d,]+(?:\.\d+)?"
SUMMARY = re.compile(
    rf"^genq bench sse: (?P<followers>\d+) followers, (?P<delivered>{NUMBER}) tokens/s delivered "
    rf"\(target (?P<target>{NUMBER})\), latency p50 (?P<p50>{NUMBER}) ms / p99 (?P<p99>{NUMBER}) ms; "
    rf"submit (?P<submit>{NUMBER}) jobs/s; "
    rf"chat TTFT (?:skipped|1 user genq (?P<g1>{NUMBER}) ms vs vLLM server (?P<v1>{NUMBER}) ms, "
    rf"16 users genq (?P<g16>{NUMBER}) ms vs vLLM (?P<v16>{NUMBER}) ms)$"
)


def figures(line: str) -> dict[str, float] | None:
    m = SUMMARY.match(line)
    if m is None:
        return None
    return {k: float(v.replace(",", "")) for k, v in m.groupdict().items() if v is not None}


def test_quick_run_prints_a_parseable_last_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "sse", "--quick", "--redis-url", REDIS_URL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    got = figures(last)
    assert got is not None, f"unexpected last line: {last!r}"
    assert set(got) == {"followers", "delivered", "target", "p50", "p99", "submit"}  # --quick skips vLLM
    assert all(v > 0 for v in got.values()), got
    assert "SIMULATED PRODUCER" in proc.stdout  # the table names the producer for what it is
    # Its random namespace (logged at the start) is gone afterwards.
    ns = re.search(r'"queue": "(benchsse[0-9a-f]+)"', proc.stderr)
    assert ns, proc.stderr[-3000:]
    client = redis_sync.Redis.from_url(REDIS_URL)
    assert not list(client.scan_iter(match=f"*{ns.group(1)}*", count=1000))


def test_summary_pattern_reads_both_forms() -> None:
    full = (
        "genq bench sse: 200 followers, 49,800 tokens/s delivered (target 50,000), latency p50 4.1 ms / "
        "p99 21.0 ms; submit 1,850 jobs/s; chat TTFT 1 user genq 95 ms vs vLLM server 80 ms, 16 users genq "
        "410 ms vs vLLM 380 ms"
    )
    assert figures(full) == {
        "followers": 200,
        "delivered": 49800,
        "target": 50000,
        "p50": 4.1,
        "p99": 21.0,
        "submit": 1850,
        "g1": 95,
        "v1": 80,
        "g16": 410,
        "v16": 380,
    }
    assert figures(full.split("; chat")[0] + "; chat TTFT skipped") is not None
    assert figures(full.replace("jobs/s", "jobs")) is None
