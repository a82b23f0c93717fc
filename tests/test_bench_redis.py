"""``python -m benchmarks redis --quick`` runs end to end on its own redis-server and prints its figures.

Not a timing test: it checks that every phase was measured and that the figures are positive and
consistent (a delta costs commands; a finished job keeps bytes).
"""

from __future__ import annotations

import re

from tests.bench_support import run_bench

LIFECYCLE = re.compile(
    r"^genq bench redis: lifecycle \(100 jobs\): (?P<total>[\d.]+) µs Redis CPU per job \(admit (?P<admit>[\d.]+) µs / "
    r"(?P<admit_cmds>[\d.]+) cmds, claim (?P<claim>[\d.]+) µs / [\d.]+ cmds, complete (?P<complete>[\d.]+) µs / "
    r"[\d.]+ cmds\); (?P<kept>[\d,]+) B kept$"
)
DELTAS = re.compile(r"^genq bench redis: deltas, (?P<n>\d+) streaming job\(s\), 1 token\(s\) each: (?P<us>[\d.]+) µs")


def test_quick_run_measures_every_phase() -> None:
    stdout = run_bench("redis", "--quick", timeout=300)
    out = [line for line in stdout.splitlines() if line.startswith("genq bench redis: ")]
    life = LIFECYCLE.match(out[0])
    assert life, out[0]
    figures = {k: float(v.replace(",", "")) for k, v in life.groupdict().items()}
    assert all(v > 0 for v in figures.values()), figures
    assert abs(figures["admit"] + figures["claim"] + figures["complete"] - figures["total"]) < 0.5
    streams = [DELTAS.match(line) for line in out[1:3]]
    assert [int(m["n"]) for m in streams if m] == [1, 8], out
    assert all(float(m["us"]) > 0 for m in streams if m)
    assert out[3].startswith("genq bench redis: implied: ")
