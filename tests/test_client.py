"""genq.Client and genq.AsyncClient against the in-process stack (real uvicorn, real Redis, the
simulated engine): every call, typed results and errors, idempotent submits, run_many, and an
event stream whose connection is really cut (tests/cut_proxy.py) resuming without a repeat."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cut_proxy import CutProxy, cut_streams, lose_first_answer
from test_api_support import Stack, make_stack  # noqa: F401 (fixture)

import genq
from broker.models import TenantLimits
from genq.client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    Event,
    EventType,
    GenqError,
    Job,
    JobRequest,
    JobStatus,
    NotFoundError,
    Progress,
    RateLimitError,
    WaitTimeout,
)

MESSAGES = [{"role": "user", "content": "tell me a story"}]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stack(make_stack) -> Stack:  # noqa: F811
    stack = make_stack(worker=False)
    stack.add_worker("m", sim_step_ms=15.0)  # ~65 tokens/s: a 60-token job streams for ~1 s
    return stack


def check_stream(events: list[Event], job: Job) -> None:
    """One clean pass over the job: ids strictly increasing, text == the stored output."""
    ids = [e.id for e in events if e.id is not None]
    assert len(ids) == len(set(ids))
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))
    assert events[-1].type is EventType.DONE and [e for e in events if e.terminal] == [events[-1]]
    tokens = [e for e in events if e.type is EventType.TOKEN]
    assert [e.data["seq"] for e in tokens] == list(range(1, len(tokens) + 1))
    assert "".join(e.text for e in tokens) == job.output and job.output
    assert sum(e.data["n"] for e in tokens) == job.usage.completion_tokens


def test_submit_get_wait_cancel_list(stack: Stack) -> None:
    with Client(stack.url, stack.key("acme")) as c:
        job = c.submit(model="m", messages=MESSAGES, max_tokens=20, metadata={"order": "7"})
        assert (
            isinstance(job, Job) and job.id.startswith("job_") and job.status in (JobStatus.QUEUED, JobStatus.RUNNING)
        )
        assert job.links["events"] == f"/v1/jobs/{job.id}/events" and job.metadata == {"order": "7"}
        done = c.wait(job.id, timeout_s=30)
        assert done.status is JobStatus.SUCCEEDED and done.terminal and done.finish_reason == "length"
        assert done.usage.completion_tokens == 20 and done.usage.total_tokens == done.usage.prompt_tokens + 20
        assert done.timings.finished_ms and done.timings.ttft_ms is not None
        assert c.get(job.id) == done
        with pytest.raises(ConflictError) as e:
            c.cancel(job.id)
        assert e.value.status == 409 and e.value.code == "already_terminal"

        # a long job, cancelled while it queues or runs
        queued = c.submit(JobRequest(model="m", prompt="wait", max_tokens=2000, priority=9))
        cancelled = c.cancel(queued.id)
        assert cancelled.cancel_requested and cancelled.id == queued.id

        first = c.list(limit=1)
        assert len(first.data) == 1 and first.has_more and first.next_after
        rest = c.list(limit=1, after=first.next_after)
        assert {j.id for j in first.data + rest.data} == {job.id, queued.id} and not rest.has_more
        assert [j.id for j in c.list(status="succeeded").data] == [job.id]
        assert {j.id for j in c.iter_jobs(page_size=1)} == {job.id, queued.id}
        assert c.wait(queued.id, timeout_s=10).status is JobStatus.CANCELLED


async def test_async_submit_get_wait_cancel_list(stack: Stack) -> None:
    async with AsyncClient(stack.url, stack.key("acme")) as c:
        job = await c.submit(model="m", prompt="hello there", max_tokens=12)
        events = [e async for e in c.stream(job.id)]
        done = await c.get(job.id)
        check_stream(events, done)
        assert await c.wait(job.id) == done and done.usage.completion_tokens == 12
        page = await c.list(status=JobStatus.SUCCEEDED)
        assert [j.id for j in page.data] == [job.id]
        assert [j.id async for j in c.iter_jobs()] == [job.id]
        with pytest.raises(ConflictError):
            await c.cancel(job.id)


def test_wait_times_out_and_the_job_keeps_running(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False)  # nobody claims: the job stays queued
    with Client(stack.url, stack.key("acme")) as c:
        job = c.submit(model="m", prompt="hi", max_tokens=4)
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as e:
            c.wait(job.id, timeout_s=0.5)
        assert 0.4 < time.monotonic() - started < 5 and e.value.job_id == job.id
        assert c.get(job.id).status is JobStatus.QUEUED


def test_wait_polls_with_back_off_when_no_stream_can_be_opened(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False, sse_per_tenant=1)
    stack.add_worker("m", sim_step_ms=15.0)
    key = stack.key("acme")
    seen: list[tuple[str, str]] = []
    hooks = {"request": [lambda r: seen.append((r.method, r.url.path))]}
    http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, event_hooks=hooks)
    with Client(stack.url, key) as holder, Client(http_client=http, max_retries=0) as c, http:
        long = holder.submit(model="m", prompt="long", max_tokens=2000)
        events = holder.stream(long.id)
        next(events)  # holds the tenant's one stream slot
        job = c.submit(model="m", prompt="short", max_tokens=20)
        done = c.wait(job.id, timeout_s=30)
        events.close()
        holder.cancel(long.id)
    assert done.status is JobStatus.SUCCEEDED and done.usage.completion_tokens == 20
    path = f"/v1/jobs/{job.id}"
    assert seen.count(("GET", path + "/events")) == 1  # refused (429 too_many_streams): then polled
    assert seen.count(("GET", path)) >= 3


def test_the_same_idempotency_key_is_the_same_job(stack: Stack) -> None:
    with Client(stack.url, stack.key("acme")) as c:
        a = c.submit(model="m", prompt="once", max_tokens=3, idempotency_key="order-17")
        b = c.submit({"model": "m", "prompt": "once", "max_tokens": 3, "idempotency_key": "order-17"})
        assert a.id == b.id
        other = c.submit(model="m", prompt="once", max_tokens=3)  # a fresh key each call: a new job
        assert other.id != a.id


def test_a_submit_whose_answer_was_lost_is_retried_into_the_same_job(stack: Stack) -> None:
    key = stack.key("acme")
    with CutProxy(stack, lose_first_answer(b"POST /v1/jobs ")) as proxy, Client(proxy.url, key) as c:
        job = c.submit(model="m", prompt="exactly once", max_tokens=3)
        assert proxy.cuts == 1  # the first answer never arrived: the client retried
        assert sum(b"POST /v1/jobs " in conn.sent for conn in proxy.conns) == 2
    with Client(stack.url, key) as c:
        assert [j.id for j in c.list().data] == [job.id]  # the server saw two submits, made one job


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_stream_cut_twice_resumes_with_no_repeated_text(stack: Stack, flavour: str) -> None:
    key = stack.key("acme")
    with CutProxy(stack, cut_streams(times=2, after_tokens=3)) as proxy:
        if flavour == "sync":
            with Client(proxy.url, key) as c:
                job = c.submit(model="m", messages=MESSAGES, max_tokens=60)
                events = list(c.stream(job.id))
                done = c.get(job.id)
        else:
            async with AsyncClient(proxy.url, key) as ac:
                job = await ac.submit(model="m", messages=MESSAGES, max_tokens=60)
                events = [e async for e in ac.stream(job.id)]
                done = await ac.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.usage.completion_tokens == 60
    check_stream(events, done)
    assert proxy.cuts == 2
    resumed = proxy.resumed_from()
    assert len(resumed) == 2 and resumed == [e.id for e in events if e.id in resumed]
    # each cut fell mid-generation, after a token event, and more tokens followed
    tokens = [e.id for e in events if e.type is EventType.TOKEN]
    assert 0 < tokens.index(resumed[0]) < tokens.index(resumed[1]) < len(tokens) - 1


def test_a_stream_that_keeps_breaking_gives_up_after_max_reconnects(stack: Stack) -> None:
    key = stack.key("acme")
    with (
        CutProxy(stack, cut_streams(times=100, after_tokens=0)) as proxy,
        Client(proxy.url, key, max_reconnects=2) as c,
    ):
        job = c.submit(model="m", messages=MESSAGES, max_tokens=60)
        events: list[Event] = []
        with pytest.raises(APIConnectionError):
            events.extend(c.stream(job.id))
        # every connection broke at its first token: the first brought queued and started, the
        # two reconnections allowed brought nothing, and no third was tried
        stored = [e.type for e in events if e.type is not EventType.POSITION]
        assert proxy.cuts == 3 and stored == [EventType.QUEUED, EventType.STARTED]


def test_run_many_keeps_input_order_and_reports_progress(stack: Stack) -> None:
    # later requests are shorter, so they finish out of input order
    lengths = [10 + 8 * (6 - i) for i in range(7)]
    requests = [
        {"model": "m", "prompt": f"n {i}", "max_tokens": n, "metadata": {"i": str(i)}} for i, n in enumerate(lengths)
    ]
    seen: list[Progress[Job]] = []
    with Client(stack.url, stack.key("acme")) as c:
        results = c.run_many(requests, concurrency=3, on_progress=seen.append)
    assert [r.metadata for r in results] == [{"i": str(i)} for i in range(7)]
    assert all(r.status is JobStatus.SUCCEEDED for r in results)
    assert [r.usage.completion_tokens for r in results] == lengths
    assert [p.done for p in seen] == list(range(1, 8)) and {p.total for p in seen} == {7}
    assert sorted(p.index for p in seen) == list(range(7)) and all(p.result is results[p.index] for p in seen)
    assert [p.index for p in seen] != list(range(7))  # they did finish out of order
    assert 2 <= max_overlap(results) <= 3


def max_overlap(jobs: list[Job]) -> int:
    """The most jobs alive (created, not finished) at once, by the server's clock."""
    edges = sorted([(j.timings.created_ms or 0, 1) for j in jobs] + [(j.timings.finished_ms or 0, -1) for j in jobs])
    alive = most = 0
    for _, step in edges:
        alive += step
        most = max(most, alive)
    return most


async def test_async_run_many_order_progress_and_errors(stack: Stack) -> None:
    lengths = [50, 34, 18, 42, 10]  # finishing out of input order
    requests: list[JobRequest | dict] = [
        JobRequest(model="m", prompt=f"n{i}", max_tokens=n) for i, n in enumerate(lengths)
    ]
    seen: list[Progress] = []

    async def note(p: Progress) -> None:
        seen.append(p)

    async with AsyncClient(stack.url, stack.key("acme")) as c:
        results = await c.run_many(requests, concurrency=2, on_progress=note)
        assert [r.usage.completion_tokens for r in results] == lengths
        assert [p.done for p in seen] == [1, 2, 3, 4, 5] and sorted(p.index for p in seen) == list(range(5))
        assert [p.index for p in seen] != list(range(5)) and all(p.result is results[p.index] for p in seen)
        assert max_overlap(results) == 2

        bad = [*requests[:2], {"model": "m", "prompt": "x", "max_tokens": 0}]
        mixed = await c.run_many(bad, concurrency=3, return_exceptions=True)
        assert isinstance(mixed[2], BadRequestError) and mixed[2].param == "max_tokens"
        assert [m.status for m in mixed[:2] if isinstance(m, Job)] == [JobStatus.SUCCEEDED] * 2
        with pytest.raises(BadRequestError):
            await c.run_many(bad, concurrency=3)


def test_run_many_raises_the_first_error(stack: Stack) -> None:
    with Client(stack.url, stack.key("acme")) as c, pytest.raises(NotFoundError) as e:
        c.run_many([{"model": "m", "prompt": "ok", "max_tokens": 5}, {"model": "nope", "prompt": "x"}], concurrency=2)
    assert e.value.code == "model_not_found"


def test_typed_errors(stack: Stack) -> None:
    with Client(stack.url, stack.key("acme")) as c:
        with pytest.raises(BadRequestError) as bad:
            c.submit(model="m", prompt="x", temperature=7)
        assert bad.value.status == 400 and bad.value.type == "invalid_request_error"
        assert bad.value.param == "temperature" and bad.value.body["error"]["message"] == bad.value.message
        with pytest.raises(NotFoundError) as missing:
            c.get("job_" + "0" * 32)
        assert missing.value.status == 404 and missing.value.code == "not_found"
        with pytest.raises(NotFoundError):
            list(c.stream("job_" + "0" * 32))
    with Client(stack.url, "gq-wrong") as c, pytest.raises(AuthenticationError) as unauth:
        c.list()
    assert unauth.value.status == 401 and unauth.value.code == "invalid_api_key"


def test_rate_limit_is_retried_after_retry_after_or_raised(stack: Stack) -> None:
    key = stack.key("metered", TenantLimits(rpm=60, rpm_burst=1))  # one request a second
    with Client(stack.url, key, max_retries=0) as c:
        c.submit(model="m", prompt="first", max_tokens=2)
        with pytest.raises(RateLimitError) as e:
            c.submit(model="m", prompt="second", max_tokens=2)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded" and e.value.retry_after_s
    with Client(stack.url, key, max_retries=3) as c:  # waits out Retry-After, then is admitted
        started = time.monotonic()
        c.submit(model="m", prompt="third", max_tokens=2)
        c.submit(model="m", prompt="fourth", max_tokens=2)
        assert time.monotonic() - started >= 0.9 * e.value.retry_after_s
    with Client(stack.url, key, max_retries=3, max_retry_delay_s=0.01) as c, pytest.raises(RateLimitError):
        c.submit(model="m", prompt="fifth", max_tokens=2)  # Retry-After longer than allowed: raised at once


def genq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "genq.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_genq_submit_streams_through_the_client(stack: Stack) -> None:
    key = stack.key("acme")
    out = genq_cli("submit", "hello", "--model", "m", "--url", stack.url, "--key", key, "--max-tokens", "9")
    assert out.returncode == 0, out.stderr
    job_id = out.stderr.split()[1]
    assert re.match(rf"job {job_id} (queued|running)", out.stderr) and "\n[done] {" in out.stderr
    with Client(stack.url, key) as c:
        assert out.stdout == c.get(job_id).output + "\n"
    bad = genq_cli("submit", "x", "--model", "nope", "--url", stack.url, "--key", key)
    assert bad.returncode == 1 and bad.stderr.startswith("error 404: ") and "model_not_found" in bad.stderr


def test_unreachable_api_is_a_connection_error() -> None:
    with Client("http://127.0.0.1:9", "k", max_retries=1) as c, pytest.raises(GenqError) as e:
        c.get("job_" + "0" * 32)
    assert type(e.value).__name__ == "APIConnectionError"


def test_the_client_shapes_match_the_server_contract() -> None:
    from broker import contract

    assert {s.value for s in JobStatus} == {s.value for s in contract.JobStatus}
    assert {t.value for t in EventType} - {"position", "error"} == {t.value for t in contract.EventType}


def test_importing_the_client_loads_no_server_code() -> None:
    code = "import sys, genq\nfrom genq import Client, AsyncClient\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = {m.split(".")[0] for m in out.stdout.split()}
    assert "httpx" in loaded and "genq" in loaded
    assert not loaded & {"redis", "fastapi", "starlette", "uvicorn", "broker", "api", "worker", "vllm", "typer"}
    assert genq.Client is Client and genq.AsyncClient is AsyncClient
    assert genq.__all__ == sorted(genq.client.__all__) and all(getattr(genq, n) for n in genq.__all__)


def test_base_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_URL", "http://example.invalid:1234/v1/")
    monkeypatch.setenv("GENQ_API_KEY", "gq-from-env")
    with Client() as c:
        assert c.options.base_url == "http://example.invalid:1234"
        assert c._http.headers["authorization"] == "Bearer gq-from-env"
    monkeypatch.delenv("GENQ_URL")
    with Client(timeout=3) as c:
        assert c.options.base_url == "http://127.0.0.1:8000" and c.options.timeout == httpx.Timeout(3)
