"""`python -m benchmarks batch` at a tiny size runs both paths on the real vLLM CPU engine and reports figures."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_api_openai import VLLM_LOCK

ROOT = Path(__file__).resolve().parent.parent  # benchmarks/ runs from the checkout, not the installed package

LAST = re.compile(
    r"genq bench batch: (?P<genq>[\d.]+) vs (?P<vllm>[\d.]+) tokens/s run_batch \(ratio (?P<ratio>[\d.]+)\); "
    r"Redis CPU (?P<cpu>[\d.]+) ms/line; "
    r"TTFT idle (?P<idle>[\d.]+) ms, busy (?P<busy>[\d.]+|nan) ms \(x(?P<x>[\d.]+|nan)\)"
)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_bench_batch_tiny_reports_both_paths() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
    }
    cmd = [sys.executable, "-m", "benchmarks", "batch", "--lines", "8", "--max-tokens", "8", "--max-num-seqs", "4"]
    with open(VLLM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one real engine per machine at a time
        out = subprocess.run(
            [*cmd, "--ttft-samples", "2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=880
        )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    m = LAST.fullmatch(lines[-1].strip())
    assert m, lines[-1]
    assert float(m["genq"]) > 0 and float(m["vllm"]) > 0 and float(m["cpu"]) > 0 and float(m["idle"]) > 0
    answered = next(ln for ln in lines if "lines answered 200" in ln).split()
    assert answered[-2:] == ["8", "8"]  # every line answered by both
