"""Process lifecycle on real processes (issue 11): `genq up` and the worker stop, whatever
happens to their parent or their terminal, and never double-start on one data folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHARED_REDIS, RedisServer, free_port
from tests.test_up import start_up, stop, wait_ready

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux"),
]


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps counts as gone: it holds no port, no file, no CPU)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def serving(folder: Path) -> list[int]:
    """redis-server processes whose data folder is ``folder`` (Redis chdirs into its --dir)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                is_redis = b"redis-server" in (d / "cmdline").read_bytes().split(b" ")[0]
                cwd = os.readlink(d / "cwd")
            except OSError:
                continue
            if is_redis and Path(cwd) == folder and alive(int(d.name)):
                found.append(int(d.name))
    return found


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)  # another process's exit: no event reaches us for a non-child
    return [p for p in pids if alive(p)]


def kill_all(pids: list[int]) -> None:
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_up_killed_or_hung_up_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    proc = start_up(tmp_path, port)
    kids: list[int] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", tmp_path / "api_key", proc)
        kids = children_of(proc.pid)
        assert len(kids) == 4, kids  # redis, api, worker, batcher
        proc.send_signal(sig)
        proc.communicate(timeout=30)
        left = wait_gone(kids, 10)
        assert not left, f"still running 10 s after {sig.name} of genq up: {left}"
        if sig is signal.SIGHUP:
            assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_all(kids)


def test_second_up_on_one_folder_refuses_and_a_leftover_redis_is_reused(tmp_path: Path) -> None:
    port = free_port()
    rdir = tmp_path / "redis"
    first = start_up(tmp_path, port)
    try:
        key = wait_ready(f"http://127.0.0.1:{port}", tmp_path / "api_key", first)
        second = start_up(tmp_path, free_port())
        try:
            out, _ = second.communicate(timeout=60)
        finally:
            if second.poll() is None:  # the old behaviour: a second stack on the same folder
                second.send_signal(signal.SIGINT)
                second.communicate(timeout=60)
        assert second.returncode != 0
        assert "another `genq up`" in out and str(tmp_path) in out, out
        assert len(serving(rdir)) == 1
    finally:
        code, out = stop(first)
    assert code == 0, out

    # A Redis still serving the folder without its `genq up` (as one killed mid-way leaves
    # it): the next `genq up` reuses it instead of starting a second one on the same AOF.
    leftover = RedisServer(int((tmp_path / "redis.port").read_text()), rdir, ["--appendonly", "yes"])
    leftover.start()
    try:
        proc = start_up(tmp_path, port)
        try:
            assert wait_ready(f"http://127.0.0.1:{port}", tmp_path / "api_key", proc) == key
            assert serving(rdir) == [leftover.proc.pid]
        finally:
            code, out = stop(proc)
        assert code == 0, out
        assert "reusing the redis-server" in out
        leftover.proc.wait(timeout=15)  # the stack stops the Redis it adopted
    finally:
        leftover.stop(kill=True)


def test_up_terminal_keeps_url_and_key_children_log_to_files(tmp_path: Path) -> None:
    port = free_port()
    proc = start_up(tmp_path, port)
    try:
        key = wait_ready(f"http://127.0.0.1:{port}", tmp_path / "api_key", proc)
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "API key: " + key in out.replace("\n", "") and "curl " in out
    for child_line in ("api started", "worker.engine_opening", "worker.stopped", "Uvicorn running"):
        assert child_line not in out, f"child log line {child_line!r} in the terminal:\n{out}"
    assert "api started" in (tmp_path / "logs" / "api.log").read_text()
    assert "worker.stopped" in (tmp_path / "logs" / "worker.log").read_text()
    env = {**os.environ, "GENQ_DATA_DIR": str(tmp_path)}
    logs = subprocess.run(
        [sys.executable, "-m", "genq.cli", "logs", "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert logs.returncode == 0 and "worker.engine_opening" in logs.stdout, logs.stderr


def test_up_shows_a_failing_childs_last_lines(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env["GENQ_DATA_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "genq.cli", "up", "--engine", "nonsense", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "worker exited with code 2" in proc.stderr, proc.stderr
    shown = proc.stderr.split("worker exited with code 2", 1)[1]
    assert "'nonsense'" in shown  # the child's own complaint, from its log file


def test_worker_with_a_dead_stderr_pipe_stops_on_sigterm(tmp_path: Path) -> None:
    queue = "t" + os.urandom(6).hex()
    env = {**os.environ, "GENQ_REDIS_URL": SHARED_REDIS, "GENQ_QUEUE": queue}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.main", "--engine", "simulated", "--heartbeat-s", "0.1", "--json-logs"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        import redis as redis_sync

        r = redis_sync.Redis.from_url(SHARED_REDIS)
        deadline = time.monotonic() + 60
        while not r.hlen(f"genq:{{{queue}}}:workers"):  # registered: its loop runs
            assert proc.poll() is None and time.monotonic() < deadline, "worker never came up"
            time.sleep(0.05)  # a child's start-up: no event reaches us but its heartbeat
        proc.stdout.close()  # nobody reads its output any more: every write now fails
        proc.stderr.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        r.delete(f"genq:{{{queue}}}:workers")


def test_up_with_a_dead_terminal_pipe_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = start_up(tmp_path, port)
    kids: list[int] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", tmp_path / "api_key", proc)
        kids = children_of(proc.pid)
        proc.stdout.close()  # `genq up | tee log` and tee has gone
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert not wait_gone(kids, 10)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_all(kids)
