"""OpenAI streams as vLLM's server sends them, and re-attaching to a job after a dropped connection.

- Nothing is sent before the job's first token: the role chunk goes out with it, so a
  client's time to first token is the job's, not the admission's.
- A comment line goes out only after `keepalive_s` of silence, never while tokens flow.
- With an `Idempotency-Key`, a dropped request's job waits `reattach_grace_s` before it is
  cancelled; a retry with the same key (on any API process) follows it from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import openai
import pytest
from test_api_support import HandWorker, Stack, auth, make_stack  # noqa: F401 (fixture)

MESSAGES = [{"role": "user", "content": "tell me a story"}]
QUIET_S = 1.0  # how long a test watches for bytes that must not come


def data_events(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]


async def test_stream_sends_nothing_before_the_first_token(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False)  # keepalive_s is 15 s: no comment within the test
    stack.call(lambda b: b.register_model("hand", 4096))
    worker = HandWorker(stack, "hand")  # live (its heartbeat), but it claims only on cue
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "hand", "messages": MESSAGES, "max_tokens": 5, "stream": True}
        async with h.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            [job] = (await h.get("/v1/jobs")).json()["data"]
            chunks = r.aiter_raw()
            first = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({first}, timeout=QUIET_S)
            assert not done, "bytes sent while the job was queued"
            [lease] = worker.claim()
            assert lease.id == job["id"]
            done, _ = await asyncio.wait({first}, timeout=QUIET_S)
            assert not done, "bytes sent when the job started, before its first token"
            worker.token(lease, "Hello")
            raw = await asyncio.wait_for(first, 10)
            while len(data_events(raw)) < 2:
                raw += await asyncio.wait_for(anext(chunks), 10)
            role, token = (json.loads(d) for d in data_events(raw)[:2])
            assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert token["choices"][0]["delta"] == {"content": "Hello"}
            worker.finish(lease)
            async for more in chunks:
                raw += more
    events = data_events(raw)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    assert not [line for line in raw.decode().splitlines() if line.startswith(":")]


async def test_completion_stream_opens_with_its_first_token(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False)
    stack.call(lambda b: b.register_model("hand", 4096))
    worker = HandWorker(stack, "hand")
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "hand", "prompt": "Once", "max_tokens": 5, "stream": True}
        async with h.stream("POST", "/v1/completions", json=body) as r:
            chunks = r.aiter_raw()
            first = asyncio.ensure_future(anext(chunks))
            [lease] = worker.claim()
            done, _ = await asyncio.wait({first}, timeout=QUIET_S)
            assert not done, "bytes sent before the first token"
            worker.token(lease, " upon")
            raw = await asyncio.wait_for(first, 10)
            assert json.loads(data_events(raw)[0])["choices"][0]["text"] == " upon"
            worker.finish(lease)
            async for more in chunks:
                raw += more
    assert data_events(raw)[-1] == "[DONE]"


def vllm_bench_client(reads: list[bytes]) -> tuple[str, int | None]:
    """What vLLM's ``bench serve`` client makes of a ``/v1/completions`` stream that arrives in these
    reads: (text, the usage's completion_tokens). Its StreamedResponseHandler (vllm 0.32,
    benchmarks/lib/endpoint_request_func.py) strips each read, splits messages on ``\\n\\n`` and takes a
    rest that is one whole ``data:`` JSON; it counts output tokens from the usage chunk, else re-tokenizes
    the text it got."""
    buffer, text, tokens = "", "", None
    for read in reads:
        if not read.strip():
            continue
        buffer += read.strip().decode()
        messages = []
        while "\n\n" in buffer:
            message, buffer = buffer.split("\n\n", 1)
            if message.strip():
                messages.append(message.strip())
        rest = buffer.removeprefix("data: ").strip()
        if buffer.startswith("data: ") and rest:
            with contextlib.suppress(json.JSONDecodeError):
                if rest != "[DONE]":
                    json.loads(rest)
                messages.append(buffer.strip())
                buffer = ""
        for m in messages:
            chunk = m.removeprefix("data: ")
            if m.startswith(":") or chunk == "[DONE]":
                continue
            data = json.loads(chunk)
            if choices := data.get("choices"):
                text += choices[0].get("text") or ""
            elif usage := data.get("usage"):
                tokens = usage.get("completion_tokens")
    return text, tokens


def read_patterns(reads: list[bytes]) -> list[list[bytes]]:
    """Reads as they came, all in one (writes coalesced), and split in two at every read boundary.
    (Not at any byte: a read ending inside ``data: `` breaks vLLM's client with any server.)"""
    return [reads, [b"".join(reads)], *([b"".join(reads[:k]), b"".join(reads[k:])] for k in range(1, len(reads)))]


WORDS = [" upon", " a", " time", " there", " was"]
BODY = {"model": "hand", "prompt": "Once", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}


async def test_vllm_bench_client_counts_every_token_however_the_stream_is_read(make_stack) -> None:  # noqa: F811
    """Messages end in ``\\n\\n`` (OpenAI's and vLLM's servers send ``data: ...\\n\\n``): with sse-starlette's
    ``\\r\\n`` two messages read together stayed glued in vLLM's bench client, which then lost every later
    one, the usage among them, and counted 43-49 of 128 tokens from partial text."""
    stack: Stack = make_stack(worker=False)
    stack.call(lambda b: b.register_model("hand", 4096))
    worker = HandWorker(stack, "hand")
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        async with h.stream("POST", "/v1/completions", json=BODY) as r:
            chunks = r.aiter_raw()
            first = asyncio.ensure_future(anext(chunks))
            [lease] = worker.claim()
            for i, text in enumerate(WORDS):
                worker.token(lease, text, token_id=i + 1)
            worker.finish(lease, "length")
            reads = [await asyncio.wait_for(first, 10)]
            async for more in chunks:
                reads.append(more)
    raw = b"".join(reads)
    assert b"\r" not in raw and raw.endswith(b"data: [DONE]\n\n")
    for pattern in read_patterns(reads):
        assert vllm_bench_client(pattern) == ("".join(WORDS), 5), pattern


async def test_vllm_bench_client_counts_every_token_after_a_keepalive_comment(make_stack) -> None:  # noqa: F811
    """A job that waits longer than ``keepalive_s`` for its first token gets a comment first. Read alone,
    it lost its blank line in vLLM's bench client (each read is stripped) and swallowed every later
    message: the message after a comment opens with an empty comment, which restores the blank line."""
    stack: Stack = make_stack(worker=False, keepalive_s=QUIET_S)
    stack.call(lambda b: b.register_model("hand", 4096))
    worker = HandWorker(stack, "hand")
    key = stack.key("acme")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth(key), timeout=30) as h:
        async with h.stream("POST", "/v1/completions", json=BODY) as r:
            chunks = r.aiter_raw()
            ping = await asyncio.wait_for(anext(chunks), 10 * QUIET_S)  # the queued job's silence
            assert ping.strip() == b": ping"
            [lease] = worker.claim()
            for i, text in enumerate(WORDS):
                worker.token(lease, text, token_id=i + 1)
            worker.finish(lease, "length")
            rest = [more async for more in chunks]
    for reads in read_patterns(rest):
        assert vllm_bench_client([ping, *reads]) == ("".join(WORDS), 5), reads
    events = data_events(ping + b"".join(rest))
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 5


def test_no_comment_while_tokens_flow_one_after_a_silence(make_stack) -> None:  # noqa: F811
    stack: Stack = make_stack(worker=False, keepalive_s=QUIET_S)
    stack.add_worker("m", sim_step_ms=20.0)  # a token every ~20 ms for ~3 s: never a second of silence
    stack.call(lambda b: b.register_model("hand", 4096))
    HandWorker(stack, "hand")  # live, claims nothing: the job stays queued, the stream silent
    key = stack.key("acme")
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 150, "stream": True}
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = list(r.iter_lines())
        comments = [line for line in lines if line.startswith(":")]
        assert comments == [], f"{len(comments)} comment(s) between tokens"
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert len(chunks) > 20 and chunks[-1]["choices"][0]["finish_reason"] == "length"  # tokens did flow
        started = time.monotonic()
        with h.stream("POST", "/v1/chat/completions", json={**body, "model": "hand"}) as r:
            seen = []
            for line in r.iter_lines():
                seen.append(line)
                if line.startswith(":"):
                    break
        waited = time.monotonic() - started
        assert [line for line in seen if line] == [": ping"], seen  # the comment, and nothing before it
        assert waited >= QUIET_S * 0.9  # (leaving the stream cancels its job)


@pytest.fixture
def slow_stack(make_stack) -> Stack:  # noqa: F811
    stack = make_stack(worker=False, reattach_grace_s=1.0)
    stack.add_worker("m", sim_step_ms=20.0)  # 50 tokens/s: 200 tokens outlast the grace several times
    return stack


def _stream_until_first_token(stack: Stack, key: str, idem: str, max_tokens: int) -> tuple[str, str]:
    """Start a keyed stream, drop it after its first token; returns (job id, text seen)."""
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
        with h.stream("POST", "/v1/chat/completions", json=body, headers={"Idempotency-Key": idem}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"][0]["delta"].get("content"):
                        return chunk["id"].removeprefix("chatcmpl-"), chunk["choices"][0]["delta"]["content"]
    raise AssertionError("the stream ended before its first token")


@pytest.mark.parametrize("where", ["same process", "another process"])
def test_keyed_stream_retried_after_a_drop_reattaches(slow_stack: Stack, make_stack, where: str) -> None:  # noqa: F811
    key = slow_stack.key("acme")
    job_id, _ = _stream_until_first_token(slow_stack, key, "story-1", 200)
    # the retry is a fresh request: on this API process, or on a second one sharing the queue
    retry_at = slow_stack if where == "same process" else make_stack(worker=False, reattach_grace_s=1.0)
    c = openai.OpenAI(base_url=retry_at.url + "/v1", api_key=key, max_retries=0, timeout=30)
    raw = c.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, max_tokens=200, stream=True, extra_headers={"Idempotency-Key": "story-1"}
    )
    assert raw.http_response.headers["idempotent-replayed"] == "true"
    chunks = list(raw.parse())
    assert {ch.id for ch in chunks} == {f"chatcmpl-{job_id}"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    with httpx.Client(base_url=slow_stack.url, headers=auth(key), timeout=30) as h:
        job = h.get(f"/v1/jobs/{job_id}").json()
    # not cancelled though the grace (1 s) passed while the retry followed the job (~4 s)
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] == 200
    assert text == job["output"]  # from the start: the text before the drop too, once
    assert chunks[-1].choices[0].finish_reason == "length"


def test_keyed_non_stream_retried_after_a_drop_reattaches(slow_stack: Stack) -> None:
    key = slow_stack.key("acme")
    with httpx.Client(base_url=slow_stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 150}
        headers = {"Idempotency-Key": "sync-1"}
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/chat/completions", json=body, headers=headers, timeout=httpx.Timeout(30, read=0.5))
        again = h.post("/v1/chat/completions", json=body, headers=headers)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        job_id = again.json()["id"].removeprefix("chatcmpl-")
        job = h.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and again.json()["choices"][0]["message"]["content"] == job["output"]
        assert len(h.get("/v1/jobs").json()["data"]) == 1


def test_keyed_stream_not_retried_is_cancelled_after_the_grace(slow_stack: Stack) -> None:
    key = slow_stack.key("acme")
    job_id, _ = _stream_until_first_token(slow_stack, key, "story-2", 2000)
    dropped_ms = time.time() * 1000
    with httpx.Client(base_url=slow_stack.url, headers=auth(key), timeout=30) as h:
        # Poll the job: following its events would count as re-attaching and keep it alive.
        deadline = time.monotonic() + 15
        while (job := h.get(f"/v1/jobs/{job_id}").json())["status"] != "cancelled":
            assert time.monotonic() < deadline, job["status"]
            time.sleep(0.1)
    assert job["timings"]["finished_ms"] - dropped_ms >= 900, "cancelled before the grace"
    assert 0 < job["usage"]["completion_tokens"] < 2000
