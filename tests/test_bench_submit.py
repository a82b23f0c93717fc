"""``python -m benchmarks submit --quick`` runs end to end (its own redis-server and ``genq api``).

Not a timing test: the figures are there and consistent. One admission script call per submit,
and the 202 is answered from what admission returned: the job hash is read once per submit (inside
the script), its output never (a new job has none).
"""

from __future__ import annotations

import re

from tests.bench_support import run_bench

LINE = re.compile(
    r"^genq bench submit: 20 submits through one genq api: Redis CPU (?P<us>[\d.]+) µs and "
    r"(?P<cmds>[\d.]+) commands per submit \((?P<by>.*)\)$"
)


def test_quick_run_counts_the_commands_of_a_submit() -> None:
    stdout = run_bench("submit", "--quick", timeout=300)
    (m,) = [m for line in stdout.splitlines() if (m := LINE.match(line))]
    assert float(m["us"]) > 0 and 10 < float(m["cmds"]) < 60
    by = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in m["by"].split(", "))}
    assert 0.9 <= by["evalsha"] <= 1.3  # the admission (the model cache may refresh once)
    assert by.get("hgetall", 0) < 0.1  # the job as admitted is what the script wrote: no read of it
    assert by.get("xadd", 0) < 0.1  # nor a stored queued event (broker.events makes it from the job)
    assert "get" not in by  # nor of its (empty) output
    assert "answer wall time p50" in stdout
