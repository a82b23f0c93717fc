"""A model no live worker serves: listed as such, native submits queue with a warning, OpenAI calls
answer 503 `no_worker` after a short grace (their job cancelled) instead of waiting `sync_timeout_s`."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)

MESSAGES = [{"role": "user", "content": "hello"}]
GRACE_S = 0.5


def _jobs(h: httpx.Client) -> list[dict]:
    return h.get("/v1/jobs").json()["data"]


def test_models_say_which_have_a_live_worker(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack()  # a simulated worker on "m"
    stack.call(lambda b: b.register_model("idle", 4096))
    c = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key("acme"), max_retries=0, timeout=30)
    models = {m.id: m for m in c.models.list().data}
    assert (models["m"].workers, models["m"].ready) == (1, True)
    assert (models["idle"].workers, models["idle"].ready) == (0, False)
    assert models["idle"].object == "model" and models["idle"].owned_by == "genq"  # OpenAI's shape otherwise
    assert c.models.retrieve("idle").ready is False and c.models.retrieve("m").workers == 1


def test_native_submit_queues_but_says_no_worker(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack()
    stack.call(lambda b: b.register_model("idle", 4096))
    with httpx.Client(base_url=stack.url, headers=auth(stack.key("acme")), timeout=30) as h:
        r = h.post("/v1/jobs", json={"model": "idle", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 202 and r.headers["x-genq-warning"] == "no_worker"
        job = r.json()
        assert job["status"] == "queued" and job["eta_s"] is None and job["eta_range_s"] is None
        assert job["warning"]["code"] == "no_worker" and "idle" in job["warning"]["message"]
        assert h.get(f"/v1/jobs/{job['id']}").json()["warning"]["code"] == "no_worker"
        served = h.post("/v1/jobs", json={"model": "m", "prompt": "x", "max_tokens": 3})
        assert served.status_code == 202 and "x-genq-warning" not in served.headers
        assert "warning" not in served.json()


def test_sync_call_answers_503_within_the_grace_and_cancels_its_job(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False, no_worker_grace_s=GRACE_S, sync_timeout_s=60)
    key = stack.key("acme")
    c = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        for stream in (False, True):
            started = time.monotonic()
            try:
                c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, stream=stream)
                raise AssertionError("no error")
            except openai.InternalServerError as e:
                elapsed = time.monotonic() - started
                assert e.status_code == 503 and e.body["code"] == "no_worker", e.body
                assert e.body["type"] == "overloaded_error" and "cancelled" in e.body["message"]
                assert int(e.response.headers["retry-after"]) >= 1
            assert GRACE_S * 0.9 <= elapsed < 10, elapsed  # the grace, not sync_timeout_s
        r = h.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
        jobs = _jobs(h)
        assert len(jobs) == 3 and {j["status"] for j in jobs} == {"cancelled"}  # nobody waits for them


def test_a_worker_that_starts_within_the_grace_serves_the_call(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False, no_worker_grace_s=20)
    key = stack.key("acme")
    c = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=60)
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        call = pool.submit(c.chat.completions.create, model="m", messages=MESSAGES, max_tokens=3)
        deadline = time.monotonic() + 10
        while not _jobs(h):  # the call is admitted (and waiting for a worker): no event to wait on here
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stack.add_worker("m")
        r = call.result(timeout=30)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_keyed_call_keeps_its_job_for_a_retry(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False, no_worker_grace_s=GRACE_S, reattach_grace_s=30)
    key = stack.key("acme")
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body, headers = {"model": "m", "messages": MESSAGES, "max_tokens": 3}, {"Idempotency-Key": "order-7"}
        r = h.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
        assert "Idempotency-Key" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 15  # within the re-attach grace
        [job] = _jobs(h)
        assert job["status"] == "queued"  # kept for the retry
        stack.add_worker("m")
        again = h.post("/v1/chat/completions", json=body, headers=headers)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == f"chatcmpl-{job['id']}"
        assert again.json()["usage"]["completion_tokens"] == 3
