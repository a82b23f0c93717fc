"""Real ``genq api`` and ``genq worker`` processes for the tests that stop, kill or restart them.

Each test gets its own queue namespace (dropped at the end) on the Redis it names; the
bootstrap admin key authenticates as tenant ``admin`` without touching Redis. Holds no tests.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from broker import Broker, BrokerSettings, JobStatus
from tests.conftest import SHARED_REDIS, free_port

ADMIN = "gq-" + secrets.token_urlsafe(32)  # the bootstrap key: tenant "admin"


class Procs:
    """One API process (at most) and any number of workers, each logging to ``tmp/<name>.log``."""

    def __init__(self, tmp: Path, redis_url: str = SHARED_REDIS, **env: str) -> None:
        self.tmp, self.port, self.redis_url = tmp, free_port(), redis_url
        self.queue = "t" + secrets.token_hex(6)
        self.env = {
            **os.environ,
            "GENQ_REDIS_URL": redis_url,
            "GENQ_QUEUE": self.queue,
            "GENQ_MODELS": '["m"]',
            "GENQ_ADMIN_KEY": ADMIN,
            "GENQ_DRAIN_GRACE_S": "1",
            "GENQ_REATTACH_GRACE_S": "30",
            **env,
        }
        self.api: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        try:
            return subprocess.Popen([sys.executable, *args], env=self.env, stdout=log, stderr=log)
        finally:
            log.close()

    def start_worker(self, step_ms: float, *extra: str, name: str = "worker") -> subprocess.Popen:
        """A simulated-engine worker; ``name`` is its log file and, with ``--worker-id``, its id."""
        assert name not in self.workers or self.workers[name].poll() is not None
        self.workers[name] = self._spawn(
            name,
            *("-m", "worker.main", "--engine", "simulated", "--served-model-name", "m"),
            *("--sim-step-ms", str(step_ms), "--sim-step-ms-per-seq", "0", "--heartbeat-s", "0.2"),
            *extra,
        )
        return self.workers[name]

    def kill_worker(self, name: str) -> None:
        proc = self.workers[name]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL

    def stop_worker(self, name: str) -> int:
        proc = self.workers[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)

    def start_api(self, timeout_s: float = 60) -> None:
        """Until ``/readyz`` answers 200: Redis reachable and a live worker."""
        self.api = self._spawn("api", "-m", "genq.cli", "api", "--port", str(self.port))
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.api.poll() is None, self.log("api")[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not become ready"
            time.sleep(0.1)  # a child process coming up: no event to wait on but its port

    def stop_api(self) -> None:
        assert self.api is not None
        self.api.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal it handled once it has stopped: "killed" by SIGTERM, cleanly
        assert self.api.wait(timeout=30) in (0, -signal.SIGTERM), self.log("api")[-3000:]

    def kill_api(self) -> None:
        assert self.api is not None
        self.api.send_signal(signal.SIGKILL)
        assert self.api.wait(timeout=30) == -signal.SIGKILL

    def broker_settings(self) -> BrokerSettings:
        return BrokerSettings(redis_url=self.redis_url, queue=self.queue)

    def jobs(self) -> list:
        async def go() -> list:
            async with Broker.from_settings(self.broker_settings()) as b:
                return (await b.job_page("admin", None, 100)).jobs

        return asyncio.run(go())

    def wait_workers(self, *ids: str, timeout_s: float = 60) -> None:
        """Until each worker's heartbeat is in Redis (started with ``--worker-id``)."""

        async def live() -> set[str]:
            async with Broker.from_settings(self.broker_settings()) as b:
                return {w["id"] for w in await b.workers()}

        deadline = time.monotonic() + timeout_s
        while not set(ids) <= asyncio.run(live()):
            for name in ids:
                proc = self.workers.get(name)
                assert proc is None or proc.poll() is None, self.log(name)[-3000:]
            assert time.monotonic() < deadline, f"workers {ids} never came up"
            time.sleep(0.05)  # a child's start-up: no event reaches us but its heartbeat

    def wait_job(self, status: JobStatus, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(j.status is status for j in self.jobs()):
            assert time.monotonic() < deadline, f"no {status} job"
            time.sleep(0.05)  # another process's state in Redis: poll it

    def close(self) -> None:
        for p in (self.api, *self.workers.values()):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=30)

        async def drop() -> None:
            async with Broker.from_settings(self.broker_settings()) as b:
                await b.drop_namespace()

        if self.redis_url == SHARED_REDIS:  # a private server goes with its folder
            asyncio.run(drop())
