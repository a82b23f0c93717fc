"""A graceful API restart (SIGTERM) mid-request, on real processes: the job keeps running,
and the client's reconnect (or the `openai` client's own retry) completes that same job."""

from __future__ import annotations

import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from broker import JobStatus
from tests.proc_support import ADMIN, Procs

pytestmark = pytest.mark.timeout(120)


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
