"""Child processes of the benchmarks: one (:class:`Child`) or a stack (:class:`Procs`), waiting for
one to answer HTTP, their CPU shares, and the machine's one-vLLM-at-a-time lock."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)


@dataclass
class Child:
    """A subprocess in its own session (so its own children stop with it), logging to a file."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> Child:
        path = log_dir / f"{name}.log"
        with path.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("started", child=name, pid=proc.pid, log=str(path))
        return cls(name, proc, path)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; log tail:\n{tail}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the process shuts its own children down
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("child did not stop in time; killing it", child=self.name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left behind (vLLM's engine core)
        self.proc.wait()


class Watched(Protocol):
    def check(self) -> None: ...


async def wait_http(watched: Watched, url: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    """Until ``url`` answers 200, while ``watched`` (a Child, Procs) still runs. A child's start-up
    (an engine loading) has no event to wait on but its port."""
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10.0, headers=headers) as client:
        while True:
            watched.check()
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


class CpuMeter:
    """CPU seconds of named processes over a window, as a share of one core (empty without psutil)."""

    def __init__(self, pids: dict[str, int]) -> None:
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil, self.procs = psutil, {}
        for name, pid in pids.items() if psutil else ():
            with contextlib.suppress(psutil.Error):
                self.procs[name] = psutil.Process(pid)
        self.t0, self.c0 = time.monotonic(), self._now()
        if psutil:
            psutil.cpu_percent(None)

    def _now(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            with contextlib.suppress(self.psutil.Error):
                t = p.cpu_times()
                out[name] = t.user + t.system
        return out

    def shares(self) -> dict[str, float]:
        if self.psutil is None:
            return {}
        dt, c1 = time.monotonic() - self.t0, self._now()
        out = {name: (c1[name] - self.c0[name]) / dt for name in c1 if name in self.c0}
        out["machine"] = self.psutil.cpu_percent(None) / 100 * (os.cpu_count() or 1)
        return out


@contextlib.contextmanager
def vllm_lock(path: str) -> Iterator[None]:
    """The machine's one-engine-at-a-time lock (flock), held while anything loads vLLM."""
    with open(path, "a") as f:
        log.info("waiting for the vLLM lock", path=path)
        fcntl.flock(f, fcntl.LOCK_EX)
        log.info("vLLM lock held", path=path)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Procs:
    """Child processes of the genq phase, stopped (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.procs = folder, []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.procs.append((name, proc))
        return proc

    def pids(self) -> list[tuple[str, int]]:
        return [(name, proc.pid) for name, proc in self.procs]

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} exited early (code {proc.returncode}):\n{tail}")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
