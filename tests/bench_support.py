"""Runs a benchmark's command for the bench tests, as a user would: ``python -m benchmarks ...``
from the checkout (benchmarks/ is not part of the installed package). Holds no tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, timeout: float) -> str:
    """The command's standard output; it must exit 0 (else its standard error's tail is shown)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
