"""``python -m benchmarks instructions --quick`` counts what redis-server runs under callgrind.

Not a timing test: it checks that every phase was counted and that the counts are positive and
add up (a job's steps make its lifecycle)."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.bench_support import run_bench

LIFECYCLE = re.compile(
    r"^genq bench instructions: lifecycle \(50 jobs\): (?P<total>[\d,]+) instructions per job "
    r"\(admit (?P<admit>[\d,]+), claim (?P<claim>[\d,]+), complete (?P<complete>[\d,]+)\)$"
)
DELTA = re.compile(r"^genq bench instructions: deltas, 8 streaming jobs, 1 token each: (?P<n>[\d,]+) instructions")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_quick_run_counts_every_phase() -> None:
    stdout = run_bench("instructions", "--quick", timeout=600)
    out = [line for line in stdout.splitlines() if line.startswith("genq bench instructions: ")]
    life = LIFECYCLE.match(out[0])
    assert life, out
    n = {k: int(v.replace(",", "")) for k, v in life.groupdict().items()}
    assert all(v > 0 for v in n.values()), n
    assert abs(n["admit"] + n["claim"] + n["complete"] - n["total"]) <= 3  # rounding of each step
    delta = DELTA.match(out[1])
    assert delta and int(delta["n"].replace(",", "")) > 0, out
