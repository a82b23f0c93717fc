"""Sampling parameters through the OpenAI endpoints (official `openai` client, simulated worker).

Each parameter must reach the job's :class:`broker.contract.Sampling` (what the worker hands
to vLLM; tests/test_engine_vllm_params.py checks the last step on the real engine), logprobs
must come back in OpenAI's chat and completions shapes, and a parameter genq cannot honour
must answer 400 naming it. The simulated engine's logprobs are FAKE (``sim_logprobs``): a
known function of each token, so every value is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)

from broker.contract import Sampling, StructuredOutputs
from worker.engine.base import GenRequest
from worker.engine.simulated import request_key, sim_logprobs, sim_token_id

MESSAGES = [{"role": "user", "content": "Count for me."}]


@pytest.fixture
def stack(make_stack) -> Stack:  # noqa: F811
    return make_stack()


@pytest.fixture
def key(stack: Stack) -> str:
    return stack.key("acme")


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)


def fake_logprobs(n: int, top: int, **req: Any) -> list:
    """What the simulated engine answers for the first n tokens of a request."""
    key = request_key(GenRequest("x", **req))
    return [sim_logprobs(sim_token_id(key, i), top) for i in range(n)]


def job_sampling(stack: Stack, job_id: str) -> Sampling:
    """The sampling stored with a job (``chatcmpl-<job id>`` or ``cmpl-<job id>`` also do)."""
    job_id = job_id.split("-", 1)[-1]
    return stack.call(lambda b: b.get_job(job_id)).request.sampling


def test_chat_logprobs_in_openai_shape(stack: Stack, key: str) -> None:
    c = client(stack, key)
    want = fake_logprobs(6, 3, messages=MESSAGES)
    r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == [w.token for w in want]
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for got, w in zip(content, want, strict=True):
        assert got.logprob == w.logprob and got.bytes == list(w.token.encode())
        assert [(a.token, a.logprob) for a in got.top_logprobs] == list(w.top) and len(got.top_logprobs) == 3
        assert all(a.bytes == list(a.token.encode()) for a in got.top_logprobs)
    assert job_sampling(stack, r.id).logprobs == 3

    chunks = list(
        c.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, stream=True
        )
    )
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]

    # logprobs=true alone: each token's own logprob, no alternatives
    r0 = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, logprobs=True)
    assert [t.top_logprobs for t in r0.choices[0].logprobs.content] == [[], []]
    # not asked: none, and the token events carry none (no Redis cost)
    plain = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None
    assert stack.call(lambda b: b.logprobs(plain.id.split("-", 1)[1])) == []


def test_completion_logprobs_in_legacy_shape(stack: Stack, key: str) -> None:
    c = client(stack, key)
    want = fake_logprobs(5, 2, prompt="Once upon")
    r = c.completions.create(model="m", prompt="Once upon", max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [w.token for w in want] and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == [w.logprob for w in want]
    assert lp.top_logprobs == [{**dict(w.top), w.token: w.logprob} for w in want]
    assert lp.text_offset == [sum(len(w.token) for w in want[:i]) for i in range(5)]
    chunks = list(c.completions.create(model="m", prompt="Once upon", max_tokens=5, logprobs=2, stream=True))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset  # offsets run on across chunks
    # a finished completion retrieved later keeps its logprobs
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        again = h.get(f"/v1/completions/{r.id}").json()
    assert again["choices"][0]["logprobs"]["tokens"] == lp.tokens


def test_every_parameter_reaches_the_jobs_sampling(stack: Stack, key: str) -> None:
    c = client(stack, key)
    extra = {
        "top_k": 7,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "stop_token_ids": [2, 3],
        "min_tokens": 2,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "include_stop_str_in_output": True,
        "bad_words": ["zebra"],
        "allowed_token_ids": [5, 6, 7],
        "ignore_eos": True,
    }
    r = c.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=3,
        temperature=0.5,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=11,
        stop=["never"],
        logit_bias={"5": 10, "6": -100},
        logprobs=True,
        top_logprobs=4,
        response_format={"type": "json_object"},
        extra_body=extra,
    )
    s = job_sampling(stack, r.id)
    assert s == Sampling(
        temperature=0.5,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=11,
        stop=["never"],
        logit_bias={5: 10.0, 6: -100.0},
        logprobs=4,
        structured_outputs=StructuredOutputs(json_object=True),
        **extra,
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, response_format=fmt)
    assert job_sampling(stack, r.id).structured_outputs == StructuredOutputs(json=schema)
    # vLLM's own spelling on either endpoint
    r = c.completions.create(
        model="m", prompt="x", max_tokens=2, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}
    )
    assert job_sampling(stack, r.id).structured_outputs == StructuredOutputs(choice=["yes", "no"])
    # null means the default
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 2, "temperature": None, "top_k": None}
        ok = h.post("/v1/chat/completions", json=body)
    assert ok.status_code == 200 and job_sampling(stack, ok.json()["id"]) == Sampling()
    # the native API takes them too (vLLM's spelling)
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        job = h.post("/v1/jobs", json={"model": "m", "prompt": "x", "max_tokens": 2, "top_k": 3, "logprobs": 1})
    assert job.status_code == 202
    assert job_sampling(stack, job.json()["id"]) == Sampling(top_k=3, logprobs=1)


CHAT_REFUSED = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
    ({"no_such_parameter": 1}, "no_such_parameter"),
    ({"use_beam_search": True}, "use_beam_search"),
]
COMPLETION_REFUSED = [
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
]


@pytest.mark.parametrize(("extra", "param"), CHAT_REFUSED, ids=[p for _, p in CHAT_REFUSED])
def test_chat_parameter_genq_cannot_honour_is_400(stack: Stack, key: str, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(stack, key).chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


@pytest.mark.parametrize(("extra", "param"), COMPLETION_REFUSED, ids=[p for _, p in COMPLETION_REFUSED])
def test_completion_parameter_genq_cannot_honour_is_400(stack: Stack, key: str, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(stack, key).completions.create(model="m", prompt="x", max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body


def test_harmless_values_of_unsupported_parameters_are_accepted(stack: Stack, key: str) -> None:
    c = client(stack, key)
    r = c.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=2,
        tool_choice="none",
        modalities=["text"],
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        user="u-1",
        extra_body={"safety_identifier": "s-1", "prompt_cache_key": "k"},
    )
    assert r.choices[0].finish_reason == "length"
    assert c.completions.create(model="m", prompt="x", max_tokens=2, echo=False, best_of=1).choices


# -- n choices: one job each ---------------------------------------------------------------
def sim_text(n: int, **req: Any) -> str:
    return "".join(t.token for t in fake_logprobs(n, 0, **req))


def test_n_choices_non_stream(stack: Stack, key: str) -> None:
    c = client(stack, key)
    r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, n=3, seed=5, logprobs=True)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    # choice i samples with seed + i (as vLLM's parallel sampling): three different answers
    for i, ch in enumerate(r.choices):
        assert ch.message.content == sim_text(4, messages=MESSAGES, sampling=Sampling(seed=5 + i))
        assert "".join(t.token for t in ch.logprobs.content) == ch.message.content
    assert len({ch.message.content for ch in r.choices}) == 3
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 3  # the prompt counted once
    jobs = stack.call(lambda b: b.list_jobs("acme"))
    assert sorted(j.request.sampling.seed for j in jobs) == [5, 6, 7]
    t = c.completions.create(model="m", prompt="Once", max_tokens=3, n=2, seed=1, logprobs=1)
    assert [ch.text for ch in t.choices] == [sim_text(3, prompt="Once", sampling=Sampling(seed=s)) for s in (1, 2)]
    assert all(
        ch.logprobs.text_offset == [0, len(ch.logprobs.tokens[0]), sum(map(len, ch.logprobs.tokens[:2]))]
        for ch in t.choices
    )


def test_n_choices_stream(stack: Stack, key: str) -> None:
    chunks = list(
        client(stack, key).chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=5,
            n=2,
            seed=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for i in (0, 1):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(x.delta.content or "" for x in mine) == sim_text(
            5, messages=MESSAGES, sampling=Sampling(seed=9 + i)
        )
        assert [x.finish_reason for x in mine if x.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({ch.id for ch in chunks}) == 1


def test_n_choices_with_idempotency_key_and_background(stack: Stack, key: str) -> None:
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 3, "n": 2, "seed": 3}
        first = h.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "k" * 128})
        again = h.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "k" * 128})
        assert first.status_code == again.status_code == 200, first.text
        assert again.headers["idempotent-replayed"] == "true" and again.json()["choices"] == first.json()["choices"]
        assert len(h.get("/v1/jobs").json()["data"]) == 2  # one job per choice, each found again
        refused = h.post("/v1/chat/completions", json={**body, "background": True})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"


def test_n_choices_all_cancelled_when_the_stream_is_dropped(make_stack) -> None:  # noqa: F811
    slow = make_stack(worker=False)
    slow.add_worker("m", sim_step_ms=20.0)
    key = slow.key("acme")
    with httpx.Client(base_url=slow.url, headers=auth(key), timeout=30) as h:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 2000, "n": 2, "stream": True}
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content": " tok' in line:
                    break
        for job in h.get("/v1/jobs").json()["data"]:
            with h.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
                kinds = [line[7:] for line in events.iter_lines() if line.startswith("event: ")]
            assert kinds[-1] == "cancelled", kinds


# -- batches: a line is one job --------------------------------------------------------------
def test_batch_lines_keep_logprobs_and_refuse_n(make_stack, tmp_path: Path) -> None:  # noqa: F811
    from test_batches import Batcher, finished, jsonl, lines_of, upload

    stack = make_stack(files_url=str(tmp_path / "files"))
    batcher = Batcher(stack)
    try:
        c = client(stack, stack.key("acme"))
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 3, "logprobs": True, "top_logprobs": 1}
        row = {"custom_id": "lp", "method": "POST", "url": "/v1/chat/completions", "body": body}
        b = finished(c, c.batches.create(input_file_id=upload(c, jsonl([row])), **BATCH).id)
        (out,) = lines_of(c, b.output_file_id)
        content = out["response"]["body"]["choices"][0]["logprobs"]["content"]
        assert [(t["token"], t["logprob"]) for t in content] == [
            (w.token, w.logprob) for w in fake_logprobs(3, 1, messages=MESSAGES)
        ]
        two = {**row, "body": {**body, "n": 2}}
        b = finished(c, c.batches.create(input_file_id=upload(c, jsonl([two])), **BATCH).id)
        assert b.status == "failed" and b.errors.data[0].param == "body.n"
    finally:
        batcher.stop()


BATCH = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
