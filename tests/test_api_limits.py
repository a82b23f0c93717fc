"""Admission answers over HTTP: 429 and 503 with Retry-After, x-ratelimit headers, 413, SSE slots, context."""

from __future__ import annotations

import asyncio
import time

import httpx
import structlog
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)

from broker.models import TenantLimits

log = structlog.get_logger(__name__)
JOB = {"model": "m", "prompt": "hello", "max_tokens": 4}


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["code"] == code, err
    return err


async def test_rate_limit_5_per_s_burst_5_offered_20_per_s(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False)  # admission only: the jobs may stay queued
    key = stack.key("metered", TenantLimits(rpm=300, rpm_burst=5))
    offered_per_s, duration_s = 20, 5.0
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        await h.get("/healthz")  # connect before the clock starts
        t0 = time.monotonic()
        sent: list[float] = []

        async def one(i: int) -> httpx.Response:
            await asyncio.sleep(max(0.0, t0 + i / offered_per_s - time.monotonic()))  # the offered load's schedule
            sent.append(time.monotonic())
            return await h.post("/v1/jobs", json=JOB)

        responses = await asyncio.gather(*(one(i) for i in range(int(offered_per_s * duration_s))))
        # burst 5 + 5/s refill over the window the load was really offered in (first to last send: a stalled
        # response at the end offers nothing more, so the time until it answers earns no admissions)
        elapsed = max(sent) - min(sent)
        accepted = [r for r in responses if r.status_code == 202]
        refused = [r for r in responses if r.status_code != 202]
        allowed = 5 + 5 * elapsed
        log.info(
            "rate limit run",
            offered=len(responses),
            accepted=len(accepted),
            expected=round(allowed, 1),
            elapsed_s=round(elapsed, 2),
        )
        assert abs(len(accepted) - allowed) <= 2, (len(accepted), allowed)
        assert 28 <= len(accepted) <= 32
        for r in refused:
            err = assert_error(r, 429, "rate_limit_exceeded")
            assert err["type"] == "requests"
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["x-ratelimit-limit-requests"] == "300"
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
        for r in accepted:
            assert r.headers["x-ratelimit-limit-requests"] == "300"
            assert 0 <= int(r.headers["x-ratelimit-remaining-requests"]) <= 4
            assert r.headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
        # honouring Retry-After succeeds
        wait_s = int(refused[-1].headers["retry-after"])
        await asyncio.sleep(wait_s)  # what the header asks for: the test is that this is enough
        again = await h.post("/v1/jobs", json=JOB)
        assert again.status_code == 202, again.text


async def test_token_limit_and_tenant_queue(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False)
    key = stack.key("tok", TenantLimits(tpm=600, tpm_burst=100, max_queued=3))
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        # prompt "hello" is estimated at 5 // 2 + 8 = 10 tokens; 10 + 40 reserved per job
        body = {"model": "m", "prompt": "hello", "max_tokens": 40}
        first = await h.post("/v1/jobs", json=body)
        assert first.status_code == 202
        assert first.headers["x-ratelimit-limit-tokens"] == "600"
        assert first.headers["x-ratelimit-remaining-tokens"] == "50"
        await h.post("/v1/jobs", json=body)
        third = await h.post("/v1/jobs", json=body)
        err = assert_error(third, 429, "rate_limit_exceeded")
        assert err["type"] == "tokens" and int(third.headers["retry-after"]) >= 1
        too_big = await h.post("/v1/jobs", json={**body, "max_tokens": 500})
        assert assert_error(too_big, 400, "invalid_request")["param"] == "max_tokens"

    key2 = stack.key("few", TenantLimits(max_queued=2))
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key2), timeout=30) as h:
        ids = [(await h.post("/v1/jobs", json=JOB)).json()["id"] for _ in range(2)]
        full = await h.post("/v1/jobs", json=JOB)
        assert_error(full, 429, "tenant_queue_full")
        assert int(full.headers["retry-after"]) >= 1
        assert (await h.delete(f"/v1/jobs/{ids[0]}")).json()["status"] == "cancelled"
        assert (await h.post("/v1/jobs", json=JOB)).status_code == 202


async def test_queue_full_503_with_retry_after(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False, fresh_queue=True, max_queued_global=3)
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        ids = [(await h.post("/v1/jobs", json=JOB)).json()["id"] for _ in range(3)]
        full = await h.post("/v1/jobs", json=JOB)
        err = assert_error(full, 503, "queue_full")
        assert err["type"] == "overloaded_error" and int(full.headers["retry-after"]) >= 1
        chat = await h.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert_error(chat, 503, "queue_full")
        await h.delete(f"/v1/jobs/{ids[0]}")
        assert (await h.post("/v1/jobs", json=JOB)).status_code == 202
        metrics = (await h.get("/metrics")).text
        assert 'genq_rejections_total{reason="queue_full"} 2.0' in metrics


async def test_body_too_large_413(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False, max_body_bytes=4096)
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        big = {"model": "m", "prompt": "x" * 5000}
        assert_error(await h.post("/v1/jobs", json=big), 413, "request_too_large")

        async def chunked():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b"x" * 1000

        assert_error(
            await h.post("/v1/jobs", content=chunked(), headers={"content-type": "application/json"}),
            413,
            "request_too_large",
        )
        assert (await h.post("/v1/jobs", json={"model": "m", "prompt": "x" * 1000})).status_code == 202


async def test_sse_streams_per_tenant(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False, sse_per_tenant=2)
    key, other = stack.key("acme"), stack.key("other")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        ids = [(await h.post("/v1/jobs", json=JOB)).json()["id"] for _ in range(3)]
        async with h.stream("GET", f"/v1/jobs/{ids[0]}/events") as s1, h.stream("GET", f"/v1/jobs/{ids[1]}/events"):
            assert s1.status_code == 200
            third = await h.get(f"/v1/jobs/{ids[2]}/events")
            assert_error(third, 429, "too_many_streams")
            assert third.headers["retry-after"] == "1"
            other_stream = await h.get(f"/v1/jobs/{ids[2]}/events", headers=auth(other))
            assert other_stream.status_code == 404  # another tenant's limit is its own; the job is not theirs
        # both closed: the server notices the disconnects and frees the slots (no event reaches the client)
        deadline = time.monotonic() + 10
        while True:
            async with h.stream("GET", f"/v1/jobs/{ids[2]}/events") as s3:
                if s3.status_code == 200:
                    break
            assert time.monotonic() < deadline, "stream slots were not released"
            await asyncio.sleep(0.05)


async def test_context_length_checked_before_queueing(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False)
    stack.call(lambda b: b.register_model("tiny", 40))
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        long_prompt = {"model": "tiny", "prompt": "word " * 40}  # 200 bytes -> 108 estimated tokens
        err = assert_error(await h.post("/v1/jobs", json=long_prompt), 400, "context_length_exceeded")
        assert "40 tokens" in err["message"]
        over = await h.post("/v1/jobs", json={"model": "tiny", "prompt": "hi", "max_tokens": 35})
        assert assert_error(over, 400, "context_length_exceeded")["param"] == "prompt"
        # max_tokens omitted: what the context leaves after the prompt (9 tokens estimated), like vLLM
        ok = await h.post("/v1/jobs", json={"model": "tiny", "prompt": "hi"})
        assert ok.status_code == 202 and ok.json()["max_tokens"] == 40 - 9
        admin = {"Authorization": f"Bearer {stack.admin_key}"}
        queues = {q["model"]: q for q in (await h.get("/v1/admin/queues", headers=admin)).json()["data"]}
        assert queues["tiny"]["depth"] == 1  # only the accepted one was queued
