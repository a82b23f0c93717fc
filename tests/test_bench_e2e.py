"""`python -m benchmarks e2e --quick` runs both paths on the real vLLM CPU engine and reports figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_REDIS

ROOT = Path(__file__).resolve().parent.parent  # benchmarks/ runs from the checkout, not the installed package

LAST = re.compile(
    r"genq bench e2e: (?P<genq>[\d.]+) vs (?P<direct>[\d.]+) tokens/s direct \(ratio (?P<ratio>[\d.]+)\); "
    r"TTFT added p50 (?P<p50>-?[\d.]+) ms, p99 (?P<p99>-?[\d.]+) ms; per-request rate ratio by users \{(?P<users>.*)\}"
)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_bench_e2e_quick_reports_both_paths() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "e2e",
            "--quick",
            "--max-num-seqs",
            "8",
            "--redis-url",
            SHARED_REDIS,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    m = LAST.fullmatch(lines[-1].strip())
    assert m, lines[-1]
    assert float(m["genq"]) > 0 and float(m["direct"]) > 0
    assert set(re.findall(r"(\d+):", m["users"])) == {"1", "2"}
