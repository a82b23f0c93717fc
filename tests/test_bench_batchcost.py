"""``python -m benchmarks batchcost --quick`` runs end to end on its own redis-server and prints a parseable summary.

Not a timing test: it checks both phases were measured, every figure is positive, the
unstreamed phase issued fewer Redis commands per job, and the private server is gone after.
"""

from __future__ import annotations

import re

import pytest
import redis as redis_sync

from tests.bench_support import run_bench

SUMMARY = re.compile(
    r"^genq bench batchcost: (?P<jobs>\d+) jobs x (?P<tokens>\d+) tokens; "
    r"Redis CPU per job streamed (?P<cpu_s>[\d,]+) us, unstreamed (?P<cpu_u>[\d,]+) us "
    r"\((?P<cpu_ratio>[\d.]+)x less, (?P<saved>-?[\d,]+) us saved per line\); "
    r"commands per job (?P<cmd_s>[\d,.]+) / (?P<cmd_u>[\d,.]+) \((?P<cmd_ratio>[\d.]+)x fewer\)$"
)


def test_quick_run_prints_a_parseable_last_line() -> None:
    stdout = run_bench("batchcost", "--quick", timeout=120)
    last = stdout.strip().splitlines()[-1]
    m = SUMMARY.match(last)
    assert m, f"unexpected last line: {last!r}"
    f = {k: float(v.replace(",", "")) for k, v in m.groupdict().items() if k != "saved"}
    assert (f["jobs"], f["tokens"]) == (8, 16)
    assert all(v > 0 for v in f.values()), f
    assert f["cmd_s"] > f["cmd_u"] and f["cmd_ratio"] > 1  # streamed: a fenced append every flush
    assert "token events" in stdout  # the table was printed
    url = re.search(r"Private redis-server (redis://[0-9.:]+/0) ", stdout)
    assert url, stdout
    with pytest.raises(redis_sync.ConnectionError):  # stopped with the run
        redis_sync.Redis.from_url(url.group(1), socket_connect_timeout=1).ping()
