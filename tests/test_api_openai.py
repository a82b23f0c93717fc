"""The official `openai` client against a live genq API (uvicorn) and a real worker loop.

Fast tests use the simulated engine, whose output is a known function of the
request, so every answer is checked token for token. The `e2e` test runs the real
vLLM CPU engine in a `genq worker` subprocess and asks a real question.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import structlog
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)

from api.tokens import estimate_tokens
from broker.contract import Sampling
from worker.engine.base import GenRequest
from worker.engine.simulated import count_words, request_key, sim_token_id, sim_token_text

log = structlog.get_logger(__name__)
# One vLLM engine per machine at a time (benchmarks and other test runs take the same lock).
VLLM_LOCK = os.environ.get("GENQ_VLLM_LOCK", "/work/vllm.lock" if os.path.isdir("/work") else "/tmp/genq-vllm.lock")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count for me."}]


def expected(
    n: int,
    *,
    messages: list[dict] | None = None,
    prompt: str | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> tuple[str, str]:
    """The simulated engine's answer: (text, finish_reason) for n tokens."""
    key = request_key(GenRequest("x", prompt=prompt, messages=messages, sampling=Sampling(seed=seed)))
    out = []
    for i in range(n):
        text = sim_token_text(sim_token_id(key, i))
        hits = [text.find(s) for s in stop or [] if s in text]
        if hits:
            out.append(text[: min(hits)])
            return "".join(out), "stop"
        out.append(text)
    return "".join(out), "length"


@pytest.fixture
def stack(make_stack) -> Stack:  # noqa: F811
    return make_stack()


@pytest.fixture
def key(stack: Stack) -> str:
    return stack.key("acme")


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_non_stream(stack: Stack, key: str) -> None:
    r = client(stack, key).chat.completions.create(model="m", messages=MESSAGES, max_tokens=7)
    text, reason = expected(7, messages=MESSAGES)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason == "length"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-job_") and r.model == "m"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == count_words(None, MESSAGES)  # the engine's count, reported at completion
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_chat_stream_with_usage(stack: Stack, key: str) -> None:
    chunks = list(
        client(stack, key).chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    text, _ = expected(12, messages=MESSAGES)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_stop_sequence_and_seed(stack: Stack, key: str) -> None:
    full, _ = expected(6, messages=MESSAGES, seed=7)
    third = full.split(" ")[3]  # " tokA tokB tokC ..." -> "tokC"
    want, reason = expected(6, messages=MESSAGES, seed=7, stop=[third])
    r = client(stack, key).chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, seed=7, stop=[third])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, reason)
    assert reason == "stop" and want == full[: full.index(third)]


def test_completions_stream_and_not(stack: Stack, key: str) -> None:
    c = client(stack, key)
    text, _ = expected(9, prompt="Once upon a time")
    r = c.completions.create(model="m", prompt="Once upon a time", max_tokens=9)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.id.startswith("cmpl-job_") and r.usage.completion_tokens == 9
    chunks = list(c.completions.create(model="m", prompt="Once upon a time", max_tokens=9, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    # OpenAI's default max_tokens for this endpoint is 16
    assert c.completions.create(model="m", prompt="x").usage.completion_tokens == 16


async def test_async_client_concurrent(stack: Stack, key: str) -> None:
    c = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)

    async def chat(i: int) -> None:
        msgs = [{"role": "user", "content": f"question {i}"}]
        want, _ = expected(5 + i, messages=msgs)
        if i % 2:
            stream = await c.chat.completions.create(model="m", messages=msgs, max_tokens=5 + i, stream=True)
            got = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        else:
            r = await c.chat.completions.create(model="m", messages=msgs, max_tokens=5 + i)
            got = r.choices[0].message.content
        assert got == want

    async def complete(i: int) -> None:
        want, _ = expected(4, prompt=f"p{i}")
        if i % 2:
            stream = await c.completions.create(model="m", prompt=f"p{i}", max_tokens=4, stream=True)
            got = "".join([ch.choices[0].text async for ch in stream])
        else:
            got = (await c.completions.create(model="m", prompt=f"p{i}", max_tokens=4)).choices[0].text
        assert got == want

    async with asyncio.timeout(60):
        await asyncio.gather(*(chat(i) for i in range(8)), *(complete(i) for i in range(8)))
    await c.close()


def job_delivery(stack: Stack, key: str) -> dict[str, tuple[bool, list[int]]]:
    """Each of the tenant's jobs: (streamed?, tokens per token event)."""
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        jobs = h.get("/v1/jobs").json()["data"]

    async def events(b, jid: str) -> list[int]:  # type: ignore[no-untyped-def]
        return [e.data["n"] for e in await b.event_hub().backlog(jid) if e.type == "token"]

    return {j["id"]: (j["stream"], stack.call(lambda b, jid=j["id"]: events(b, jid))) for j in jobs}


def test_only_streamed_calls_stream_their_jobs(stack: Stack) -> None:
    key = stack.key("delivery")
    c = client(stack, key)
    # non-streaming, n=2, seeded, with logprobs: each choice a job written once, the answer as before
    r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, n=2, seed=3, logprobs=True)
    assert [ch.message.content for ch in r.choices] == [expected(40, messages=MESSAGES, seed=s)[0] for s in (3, 4)]
    assert all(len(ch.logprobs.content) == 40 for ch in r.choices)
    first = dict(job_delivery(stack, key))
    assert sorted(first.values()) == [(False, [40]), (False, [40])]
    # the same request streamed: its jobs stream (the 5 ms flush of the test worker: several deltas)
    chunks = list(
        c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, n=2, seed=3, logprobs=True, stream=True)
    )
    for i, ch in enumerate(r.choices):
        parts = [x.choices[0] for x in chunks if x.choices and x.choices[0].index == i]
        assert "".join(p.delta.content or "" for p in parts) == ch.message.content
        streamed_lp = [t for p in parts if p.logprobs for t in p.logprobs.content]
        assert [(t.token, t.logprob) for t in streamed_lp] == [(t.token, t.logprob) for t in ch.logprobs.content]
    second = {j: d for j, d in job_delivery(stack, key).items() if j not in first}
    assert len(second) == 2 and all(streamed and len(n) > 1 and sum(n) == 40 for streamed, n in second.values())


def test_models(stack: Stack, key: str) -> None:
    c = client(stack, key)
    models = c.models.list()
    assert "m" in [m.id for m in models.data]
    assert all(m.object == "model" and m.owned_by == "genq" for m in models.data)
    assert c.models.retrieve("m").id == "m"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def test_client_errors_are_typed(stack: Stack, key: str) -> None:
    c = client(stack, key)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=MESSAGES, tool_choice="required")
    assert e.value.body["param"] == "tool_choice" and e.value.body["code"] == "unsupported_value"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"X-Priority": "12"})
    assert e.value.body["param"] == "X-Priority"
    with pytest.raises(openai.BadRequestError) as e:  # FastAPI's 422 is answered as 400, param named
        c.chat.completions.create(model="m", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages.0.role" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        client(stack, "gq-wrong").chat.completions.create(model="m", messages=MESSAGES)


def test_priority_and_idempotency_headers(stack: Stack, key: str) -> None:
    headers = {"X-Priority": "1", "Idempotency-Key": "order-42"}
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 3}
        first = h.post("/v1/chat/completions", json=body, headers=headers).json()
        again = h.post("/v1/chat/completions", json=body, headers=headers)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first["id"] and again.json()["choices"] == first["choices"]
        job = h.get(f"/v1/jobs/{first['id'].removeprefix('chatcmpl-')}").json()
        assert job["priority"] == 1 and job["status"] == "succeeded"


def _wait_for_event(h: httpx.Client, job_id: str, wanted: str) -> list[str]:
    """Follow the job's SSE stream until its terminal event; return the event types seen."""
    seen = []
    with h.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
                if seen[-1] in ("done", "failed", "cancelled"):
                    break
    assert seen[-1] == wanted, seen
    return seen


def test_background_mode_answers_an_object_the_openai_client_parses(stack: Stack, key: str) -> None:
    c = client(stack, key)
    r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, extra_headers={"X-Background": "true"})
    # a chat.completion without choices: the id is the job's, genq's fields are attributes
    assert r.object == "chat.completion" and r.id.startswith("job_") and r.model == "m"
    assert r.choices == [] and r.usage is None
    assert r.status in ("queued", "running", "succeeded") and r.priority == 5
    assert r.links == {
        "self": f"/v1/jobs/{r.id}",
        "events": f"/v1/jobs/{r.id}/events",
        "result": f"/v1/chat/completions/{r.id}",
    }
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        _wait_for_event(h, r.id, "done")
        done = c.chat.completions.retrieve(r.id)  # the official client's own call for a stored completion
        assert done.id == r.id and done.status == "succeeded" and done.object == "chat.completion"
        assert done.choices[0].message.content == expected(4, messages=MESSAGES)[0]
        assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 4
        assert h.get(f"/v1/jobs/{r.id}").json()["stream"] is False  # nobody follows a background job live

        raw = c.completions.with_raw_response.create(
            model="m", prompt="x", max_tokens=4, extra_body={"background": True}
        )
        assert raw.http_response.status_code == 202
        r2 = raw.parse()
        assert r2.object == "text_completion" and r2.choices == [] and r2.id.startswith("job_")
        _wait_for_event(h, r2.id, "done")
        assert h.get(f"/v1/jobs/{r2.id}").json()["output"] == expected(4, prompt="x")[0]
        text = h.get(f"/v1/completions/{r2.id}").json()
        assert text["choices"][0]["text"] == expected(4, prompt="x")[0] and text["status"] == "succeeded"
        # a synchronous answer's id retrieves too; another tenant's job is not found
        sync = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert c.chat.completions.retrieve(sync.id).choices[0].message.content == sync.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            client(stack, stack.key("other")).chat.completions.retrieve(r.id)


@pytest.fixture
def slow_stack(make_stack) -> Stack:  # noqa: F811
    stack = make_stack(worker=False)
    stack.add_worker("m", sim_step_ms=20.0)  # 50 tokens/s: long enough to walk away mid-stream
    return stack


def test_stream_disconnect_cancels_job(slow_stack: Stack) -> None:
    key = slow_stack.key("acme")
    with httpx.Client(base_url=slow_stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 2000, "stream": True}
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content": " tok' in line:
                    job_id = json.loads(line[6:])["id"].removeprefix("chatcmpl-")
                    break
        seen = _wait_for_event(h, job_id, "cancelled")
        assert "token" in seen
        job = h.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and 0 < job["usage"]["completion_tokens"] < 2000


def test_non_stream_disconnect_cancels_job(slow_stack: Stack) -> None:
    key = slow_stack.key("acme")
    with httpx.Client(base_url=slow_stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 2000}
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        jobs = h.get("/v1/jobs").json()["data"]
        assert len(jobs) == 1
        _wait_for_event(h, jobs[0]["id"], "cancelled")


# -- end to end on the real vLLM CPU engine ------------------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_e2e_vllm_capital_of_france(make_stack) -> None:  # noqa: F811
    from broker.settings import DEFAULT_MODEL

    stack = make_stack(worker=False, models=[DEFAULT_MODEL])
    env = {
        **os.environ,
        "GENQ_REDIS_URL": stack.settings.redis_url,
        "GENQ_QUEUE": stack.settings.queue,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "HF_HUB_OFFLINE": "1",
    }
    genq = os.path.join(os.path.dirname(sys.executable), "genq")
    # The machine-wide one-engine lock (the flock(2) lock `flock /work/vllm.lock` takes), held by this
    # test until the worker, which closes its engine before exiting, has exited.
    with open(VLLM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [genq, "worker", "--engine", "vllm", "--max-model-len", "2048"], env=env, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            with httpx.Client(base_url=stack.url, timeout=10) as h:
                admin = {"Authorization": f"Bearer {stack.admin_key}"}
                # another process's heartbeat: no event to wait on
                while not {m["id"]: m["ready"] for m in h.get("/v1/models", headers=admin).json()["data"]}.get(
                    DEFAULT_MODEL
                ):
                    assert proc.poll() is None, "worker exited"
                    assert time.monotonic() < deadline, "worker did not become ready"
                    time.sleep(1)
            _ask_france(stack, DEFAULT_MODEL)
        finally:
            proc.send_signal(signal.SIGTERM)  # the worker drains and closes its engine itself
            try:
                assert proc.wait(90) == 0
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def _ask_france(stack: Stack, model: str) -> None:
    key = stack.key("e2e")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    kw = {"model": model, "messages": question, "max_tokens": 24, "temperature": 0}
    c = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=300)
    r = c.chat.completions.create(**kw)
    log.info("e2e answer", answer=r.choices[0].message.content, usage=r.usage.model_dump())
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    from transformers import AutoTokenizer

    info = stack.call(lambda b: b.models())[model]
    tok = AutoTokenizer.from_pretrained(info["tokenizer"])
    ids = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert r.usage.prompt_tokens == len(ids)  # counted with the worker's tokenizer, not estimated
    streamed = "".join(
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True) if ch.choices
    )
    assert "Paris" in streamed and streamed == r.choices[0].message.content  # greedy: same text
    # real logprobs in OpenAI's shape; the tokens spell the answer (then the end token, as vLLM's server)
    lp = c.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert lp.choices[0].message.content == r.choices[0].message.content
    assert "".join(t.token for t in content).startswith(lp.choices[0].message.content)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in content)
    ask = [{"role": "user", "content": "Give me a JSON object with a name and an age."}]
    js = c.chat.completions.create(
        model=model, messages=ask, max_tokens=80, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(js.choices[0].message.content), dict), js.choices[0].message.content

    async def async_side() -> None:
        ac = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=300)
        r1 = await ac.chat.completions.create(**kw)
        chunks = [ch async for ch in await ac.chat.completions.create(**kw, stream=True)]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert "Paris" in r1.choices[0].message.content and "Paris" in text
        await ac.close()

    asyncio.run(async_side())


def test_prompt_tokens_counted_with_the_registered_tokenizer(make_stack) -> None:  # noqa: F811
    """A worker registers `tokenizer=<folder>`; the API counts chat prompts with that tokenizer's template."""
    from transformers import AutoTokenizer

    from worker.model import prepare_default_model

    folder = str(prepare_default_model())
    stack = make_stack(worker=False)
    stack.call(lambda b: b.register_model("real", 64, tokenizer=folder))
    key = stack.key("acme")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
    n = len(ids if isinstance(ids, list) else ids["input_ids"])
    assert n != estimate_tokens(None, question)  # so the check below tells the two apart
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=60) as h:
        job = h.post("/v1/jobs", json={"model": "real", "messages": question}).json()
        # max_tokens omitted: the context (64) minus the exact prompt length
        assert job["max_tokens"] == 64 - n and job["usage"]["prompt_tokens"] == n
        long = h.post("/v1/jobs", json={"model": "real", "messages": [{"role": "user", "content": "Paris " * 70}]})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    stack.call(lambda b: b.cancel(job["id"]))
