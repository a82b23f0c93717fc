"""What a client expects of the job contract over HTTP: Idempotency-Key reuse, one result TTL,
queue deadlines expired by the reaper, and header parsers that answer 400, never 500."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from test_api_support import auth, make_stack  # noqa: F401 (fixture)

from broker import Broker, BrokerSettings, JobSpec
from broker.contract import EventType, JobStatus

JOB = {"model": "m", "prompt": "hello", "max_tokens": 4}


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


async def test_same_idempotency_key_with_another_body_is_422(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False)
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        first = await h.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-17"})
        assert first.status_code == 202
        again = await h.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-17"})
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        for other in ({**JOB, "prompt": "goodbye"}, {**JOB, "max_tokens": 5}, {**JOB, "temperature": 0.5}):
            r = await h.post("/v1/jobs", json=other, headers={"Idempotency-Key": "order-17"})
            err = assert_error(r, 422, "idempotency_key_reused", "Idempotency-Key")
            assert first.json()["id"] in err["message"]
        # the OpenAI endpoint shares the rule
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "background": True}
        r1 = await h.post("/v1/chat/completions", json=chat, headers={"Idempotency-Key": "chat-1"})
        assert r1.status_code == 202
        r2 = await h.post("/v1/chat/completions", json={**chat, "seed": 3}, headers={"Idempotency-Key": "chat-1"})
        assert_error(r2, 422, "idempotency_key_reused")
        # a fresh key is a fresh job
        r = await h.post("/v1/jobs", json={**JOB, "prompt": "goodbye"}, headers={"Idempotency-Key": "order-18"})
        assert r.status_code == 202 and r.json()["id"] != first.json()["id"]


async def test_the_result_ttl_is_the_one_set_at_admission(settings: BrokerSettings) -> None:
    api_side = Broker.from_settings(settings.model_copy(update={"result_ttl_s": 100}))
    worker_side = Broker.from_settings(settings.model_copy(update={"result_ttl_s": 5}))
    async with api_side, worker_side:
        await api_side.register_model("m", 4096)
        adm = await api_side.admit(JobSpec(tenant="acme", model="m", kind="completion", prompt="x", max_tokens=2))
        short = await api_side.admit(
            JobSpec(tenant="acme", model="m", kind="completion", prompt="y", max_tokens=2, result_ttl_s=30)
        )
        leases = await worker_side.claim("m", "w", 2)
        assert {lease.id for lease in leases} == {adm.job_id, short.job_id}
        for lease in leases:
            await worker_side.complete(lease, "length", "ok", [1])
        ttl_ms = await api_side._redis.pttl(api_side._keys.job(adm.job_id))
        assert 95_000 < ttl_ms <= 100_000  # the API's setting, not the completing worker's 5 s
        assert 25_000 < await api_side._redis.pttl(api_side._keys.job(short.job_id)) <= 30_000
        assert 95_000 < await api_side._redis.pttl(api_side._keys.events(adm.job_id)) <= 100_000


@pytest.mark.parametrize("how", ["body", "header"])
async def test_a_queued_job_expires_at_its_deadline(make_stack, how: str) -> None:  # noqa: F811
    stack = make_stack(worker=False)  # nobody claims: only the reaper can expire it
    reap_s = stack.settings.reap_interval_ms / 1000
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        if how == "body":
            r = await h.post("/v1/jobs", json={**JOB, "max_time_in_queue_s": 1.5})
        else:
            r = await h.post("/v1/jobs", json=JOB, headers={"X-Max-Queue-Time": "1.5"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        keeper = (await h.post("/v1/jobs", json=JOB)).json()["id"]  # no deadline: stays queued
        events: list[tuple[str, dict]] = []
        async with asyncio.timeout(1.5 + reap_s + 5):
            async with h.stream("GET", f"/v1/jobs/{job_id}/events") as s:
                etype = None
                async for line in s.aiter_lines():
                    if line.startswith("event:"):
                        etype = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and etype:
                        events.append((etype, json.loads(line.split(":", 1)[1])))
                        if etype in {e.value for e in EventType if e in (EventType.EXPIRED, EventType.DONE)}:
                            break
        assert [e for e, _ in events if e != "position"] == ["queued", "expired"]
        assert events[-1][1]["code"] == "deadline_exceeded"
        job = (await h.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == JobStatus.EXPIRED
        late_ms = job["timings"]["finished_ms"] - (job["timings"]["created_ms"] + 1500)
        assert 0 <= late_ms <= reap_s * 1000 + 500, late_ms  # at the deadline, within one reap interval
        assert (await h.get(f"/v1/jobs/{keeper}")).json()["status"] == "queued"
        queues = (await h.get("/v1/admin/queues", headers=auth(stack.admin_key))).json()["data"]
        assert {q["model"]: q["depth"] for q in queues}["m"] == 1  # its queue slot was freed


async def test_an_expired_job_answers_the_openai_client_408(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False)
    key = stack.key("acme")
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_time_in_queue_s": 0.5}
        r = await h.post("/v1/chat/completions", json=body)
    assert_error(r, 408, "deadline_exceeded")
    assert r.headers["x-should-retry"] == "false"
    assert time.monotonic() - t0 < 0.5 + stack.settings.reap_interval_ms / 1000 + 3


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Priority", "²"),
        ("X-Priority", "10"),
        ("X-Priority", "-1"),
        ("X-Max-Queue-Time", "soon"),
        ("X-Max-Queue-Time", "-1"),
        ("X-Max-Queue-Time", "0"),
        ("X-Max-Queue-Time", "inf"),
        ("X-Max-Queue-Time", "nan"),
        ("X-Max-Queue-Time", "1e400"),
        ("X-Max-Queue-Time", "٣"),
        ("Idempotency-Key", "a b"),
    ],
)
async def test_bad_headers_answer_400_naming_the_header(make_stack, header: str, value: str) -> None:  # noqa: F811
    stack = make_stack(worker=False)
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        r = await h.post("/v1/jobs", json=JOB, headers={header: value.encode()})
        assert_error(r, 400, "invalid_request", header)
