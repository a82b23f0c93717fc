"""A graceful API restart (SIGTERM) mid-request, on real processes: the job keeps running,
and the client's reconnect (or the `openai` client's own retry) completes that same job."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from broker import Broker, BrokerSettings, JobStatus
from tests.conftest import SHARED_REDIS, free_port

pytestmark = pytest.mark.timeout(120)
ADMIN = "gq-" + secrets.token_urlsafe(32)  # the bootstrap key: tenant "admin"


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.queue = "t" + secrets.token_hex(6)
        self.env = {
            **os.environ,
            "GENQ_REDIS_URL": SHARED_REDIS,
            "GENQ_QUEUE": self.queue,
            "GENQ_MODELS": '["m"]',
            "GENQ_ADMIN_KEY": ADMIN,
            "GENQ_DRAIN_GRACE_S": "1",
            "GENQ_REATTACH_GRACE_S": "30",
        }
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        try:
            return subprocess.Popen([sys.executable, *args], env=self.env, stdout=log, stderr=log)
        finally:
            log.close()

    def start_worker(self, step_ms: float) -> None:
        self.worker = self._spawn(
            "worker",
            *("-m", "worker.main", "--engine", "simulated", "--served-model-name", "m"),
            *("--sim-step-ms", str(step_ms), "--sim-step-ms-per-seq", "0", "--heartbeat-s", "0.2"),
        )

    def start_api(self) -> None:
        self.api = self._spawn("api", "-m", "genq.cli", "api", "--port", str(self.port))
        deadline = time.monotonic() + 60
        while True:
            assert self.api.poll() is None, (self.tmp / "api.log").read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:  # a live worker too
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not become ready"
            time.sleep(0.1)  # a child process coming up: no event to wait on but its port

    def stop_api(self) -> None:
        assert self.api is not None
        self.api.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal it handled once it has stopped: "killed" by SIGTERM, cleanly
        assert self.api.wait(timeout=30) in (0, -signal.SIGTERM), (self.tmp / "api.log").read_text()[-3000:]

    def jobs(self) -> list:
        async def go() -> list:
            async with Broker.from_settings(BrokerSettings(redis_url=SHARED_REDIS, queue=self.queue)) as b:
                return (await b.job_page("admin", None, 100)).jobs

        return asyncio.run(go())

    def wait_job(self, status: JobStatus, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(j.status is status for j in self.jobs()):
            assert time.monotonic() < deadline, f"no {status} job"
            time.sleep(0.05)  # another process's state in Redis: poll it

    def close(self) -> None:
        for p in (self.api, self.worker):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()

        async def drop() -> None:
            async with Broker.from_settings(BrokerSettings(redis_url=SHARED_REDIS, queue=self.queue)) as b:
                await b.drop_namespace()

        asyncio.run(drop())


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


MESSAGES = [{"role": "user", "content": "tell me a long story"}]


def test_sigterm_mid_stream_keeps_the_job_and_a_reconnect_completes_it(procs: Procs) -> None:
    procs.start_worker(step_ms=30)  # 150 tokens: ~4.5 s
    procs.start_api()
    client = openai.OpenAI(base_url=f"{procs.url}/v1", api_key=ADMIN, max_retries=0)
    idem = {"Idempotency-Key": "story-" + secrets.token_hex(4)}
    got, sent = "", False
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=150, stream=True, extra_headers=idem
    )
    try:
        for chunk in stream:
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if len(got) > 10 and not sent:
                procs.api.send_signal(signal.SIGTERM)  # a graceful restart, mid-stream
                sent = True
    except (openai.APIError, httpx.HTTPError):
        pass  # the stream cut at the end of the drain grace
    assert sent and procs.api.wait(timeout=30) in (0, -signal.SIGTERM)
    (job,) = procs.jobs()
    assert job.status in (JobStatus.RUNNING, JobStatus.SUCCEEDED), job.status  # was: cancelled

    procs.start_api()
    again = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=150, stream=True, extra_headers=idem
    )
    text = "".join(c.choices[0].delta.content or "" for c in again if c.choices)
    (job,) = procs.jobs()
    assert job.status is JobStatus.SUCCEEDED and job.completion_tokens == 150
    assert text == job.output and text.startswith(got)


def test_openai_client_retry_after_a_restart_finds_the_same_job(procs: Procs) -> None:
    procs.start_worker(step_ms=40)  # 300 tokens: ~12 s, longer than the API's graceful stop
    procs.start_api()
    client = openai.OpenAI(base_url=f"{procs.url}/v1", api_key=ADMIN, max_retries=8, timeout=60)
    result: dict = {}

    def call() -> None:
        try:
            result["r"] = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=300)
        except Exception as e:  # noqa: BLE001 - reported below
            result["e"] = e

    caller = threading.Thread(target=call)
    caller.start()
    procs.wait_job(JobStatus.RUNNING)
    procs.stop_api()  # the request is cut; the client retries (no key of its own)
    procs.start_api()
    caller.join(60)
    assert "e" not in result, result.get("e")
    jobs = procs.jobs()
    assert len(jobs) == 1, [j.id for j in jobs]  # was 2: the retry made a second job
    assert jobs[0].status is JobStatus.SUCCEEDED
    assert result["r"].choices[0].message.content == jobs[0].output
