"""``python -m benchmarks fleet --quick`` drains on its own redis-server with real worker processes.

Not a timing test: it checks that each step drained every job and measured Redis and the
workers (positive figures, one row per worker count) and named a limit.
"""

from __future__ import annotations

import re

from tests.bench_support import run_bench

ROW = re.compile(
    r"^genq bench fleet: redis +(?P<workers>\d+) +(?P<rate>[\d,]+) +(?P<drain>[\d.]+)  (?P<redis>\d+)% +"
    r"(?P<avg>\d+)% / (?P<max>\d+)% +\d+% +[\d.]+ +[\d.]+  (?P<limit>\S.*)$"
)


def test_quick_run_drains_and_measures_every_step() -> None:
    stdout = run_bench("fleet", "--quick", timeout=300)
    rows = [m for line in stdout.splitlines() if (m := ROW.match(line))]
    assert [int(m["workers"]) for m in rows] == [1, 2], stdout
    for m in rows:
        assert float(m["rate"].replace(",", "")) > 0 and float(m["drain"]) > 0, m.group(0)
        assert int(m["redis"]) > 0 and int(m["max"]) > 0, m.group(0)
    assert "load average before" in stdout
