"""`genq up` as a user runs it: its own Redis with AOF, the API and a worker (simulated
engine here; the real engine is covered by the e2e tests); Ctrl-C stops everything; a
second `genq up` finds the same data and the same key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


def start_up(data_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env["GENQ_DATA_DIR"] = str(data_dir)
    return subprocess.Popen(
        [sys.executable, "-m", "genq.cli", "up", "--engine", "simulated", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(url: str, key: Path, proc: subprocess.Popen, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if key.exists() and httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return key.read_text().strip()
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # a child process coming up: no event to wait on but its port
    raise TimeoutError("genq up did not become ready")


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


@pytest.mark.timeout(180)
def test_up_serves_stops_cleanly_and_keeps_its_data(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_up(tmp_path, port)
    try:
        key = wait_ready(url, tmp_path / "api_key", proc)
        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.post(
            f"{url}/v1/chat/completions",
            headers=auth,
            timeout=30,
            json={"model": "simulated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        job_id = r.json()["id"].removeprefix("chatcmpl-")
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "API key: " + key in out.replace("\n", "")
    assert "curl " in out
    redis_port = int((tmp_path / "redis.port").read_text())
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=1)
    assert list((tmp_path / "redis").glob("**/*.aof*")), "Redis kept no append-only file"

    proc = start_up(tmp_path, port)
    try:
        assert wait_ready(url, tmp_path / "api_key", proc) == key
        r = httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "succeeded"
        assert int((tmp_path / "redis.port").read_text()) == redis_port
    finally:
        code, out = stop(proc)
    assert code == 0, out
