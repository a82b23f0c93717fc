"""Every sampling parameter reaches vLLM's ``SamplingParams``, and the real engine honours them
(CPU, default model, one engine for the module: ~30 s to load).

The first tests capture the ``SamplingParams`` the engine builds for a real request; the
others check on real generations what a client sees: stop token ids, min/max tokens,
logit bias, seeds, logprobs, and structured outputs (JSON object, JSON schema, choice, regex).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("vllm")

from vllm import SamplingParams

from broker.contract import Sampling, StructuredOutputs
from worker.engine import Delta, EngineSettings, GenRequest, open_engine
from worker.engine import vllm_engine as ve

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

JSON_ASK = [{"role": "user", "content": "Give me a JSON object with a name and an age."}]
STORY = "Once upon a time, in a small village by the sea, there lived"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
GREEDY = Sampling(temperature=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator:
    eng = await open_engine(EngineSettings(kind="vllm", max_num_seqs=4, max_model_len=1024))
    try:
        yield eng
    finally:
        await eng.close()


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[SamplingParams]:
    """The SamplingParams the engine hands to vLLM, in order."""
    seen: list[SamplingParams] = []
    real = ve.sampling_params

    def spy(*args: Any, **kw: Any) -> SamplingParams:
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(ve, "sampling_params", spy)
    return seen


async def run(eng, req: GenRequest, timeout_s: float = 120) -> tuple[str, list[int], list[Delta]]:
    async def go() -> list[Delta]:
        return [d async for d in eng.generate(req)]

    deltas = await asyncio.wait_for(go(), timeout_s)
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


async def test_sampling_mirrors_sampling_params() -> None:
    """A field of Sampling that SamplingParams lacks would never reach vLLM."""
    missing = set(Sampling.model_fields) - set(SamplingParams.__struct_fields__)
    assert missing == set()


EVERYTHING = Sampling(
    temperature=0.7,
    top_p=0.9,
    top_k=20,
    min_p=0.02,
    presence_penalty=0.3,
    frequency_penalty=-0.2,
    repetition_penalty=1.1,
    seed=1234,
    stop=["\n\n\n"],
    stop_token_ids=[2],
    include_stop_str_in_output=True,
    ignore_eos=True,
    min_tokens=3,
    logprobs=2,
    logit_bias={30: 1.5},
    allowed_token_ids=list(range(20, 2000)),
    bad_words=["dragon"],
    skip_special_tokens=False,
    spaces_between_special_tokens=False,
)


async def test_every_parameter_reaches_sampling_params(engine, built: list[SamplingParams]) -> None:
    _, ids, deltas = await run(engine, GenRequest("all", prompt=STORY, max_tokens=6, sampling=EVERYTHING))
    (params,) = built
    for name in Sampling.model_fields:
        if name != "structured_outputs":
            assert getattr(params, name) == getattr(EVERYTHING, name), name
    assert params.max_tokens == 6 and params.output_kind is ve.RequestOutputKind.DELTA
    assert len(ids) == 6 and all(20 <= t < 2000 for t in ids)  # allowed_token_ids held
    assert sum(len(d.logprobs or []) for d in deltas) == 6

    so = StructuredOutputs(json=PERSON)
    await run(engine, GenRequest("so", messages=JSON_ASK, max_tokens=4, sampling=Sampling(structured_outputs=so)))
    assert built[1].structured_outputs.json == PERSON
    assert built[1].structured_outputs.json_object is None and built[1].structured_outputs.regex is None


async def test_resumed_request_owes_the_rest_of_min_tokens(engine, built: list[SamplingParams]) -> None:
    _, first, _ = await run(engine, GenRequest("r1", prompt=STORY, max_tokens=4, sampling=GREEDY))
    resumed = GenRequest("r2", prompt=STORY, max_tokens=12, resume_token_ids=first, sampling=Sampling(min_tokens=10))
    _, rest, _ = await run(engine, resumed)
    assert (built[1].max_tokens, built[1].min_tokens) == (8, 6)
    assert len(rest) >= 6


async def test_stop_token_ids_and_min_tokens_are_honoured(engine) -> None:
    _, ids, _ = await run(engine, GenRequest("g", prompt=STORY, max_tokens=10, sampling=GREEDY))
    stop_at = next(i for i in range(3, 10) if ids[i] not in ids[:i])
    stopped = Sampling(temperature=0, stop_token_ids=[ids[stop_at]])
    _, got, deltas = await run(engine, GenRequest("s", prompt=STORY, max_tokens=10, sampling=stopped))
    assert got == ids[: stop_at + 1] and deltas[-1].finish_reason == "stop"
    # the France answer ends with EOS after a few tokens; min_tokens holds EOS back
    france = [{"role": "user", "content": "What is the capital of France?"}]
    _, short, _ = await run(engine, GenRequest("f", messages=france, max_tokens=40, sampling=GREEDY))
    assert len(short) < 30
    longer = Sampling(temperature=0, min_tokens=30)
    _, long_ids, deltas = await run(engine, GenRequest("f2", messages=france, max_tokens=40, sampling=longer))
    assert len(long_ids) >= 30


async def test_logit_bias_and_seed(engine) -> None:
    biased = Sampling(temperature=0, logit_bias={1000: 100.0})
    _, ids, _ = await run(engine, GenRequest("b", prompt=STORY, max_tokens=3, sampling=biased))
    assert ids == [1000, 1000, 1000]
    seeded = Sampling(temperature=1.0, seed=42)
    a = await run(engine, GenRequest("s1", prompt=STORY, max_tokens=12, sampling=seeded))
    b = await run(engine, GenRequest("s2", prompt=STORY, max_tokens=12, sampling=seeded))
    assert a[1] == b[1]


async def test_logprobs_are_real_and_ranked(engine) -> None:
    _, ids, deltas = await run(
        engine, GenRequest("lp", prompt=STORY, max_tokens=8, sampling=Sampling(temperature=0, logprobs=3))
    )
    lps = [t for d in deltas for t in d.logprobs or []]
    assert len(lps) == len(ids) == 8
    for t in lps:
        assert len(t.top) == 3 and t.logprob <= 0
        assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
        assert t.top[0] == (t.token, t.logprob)  # greedy: the chosen token is the most likely
    assert "".join(t.token for t in lps) == "".join(d.text for d in deltas)
    _, _, plain = await run(engine, GenRequest("nolp", prompt=STORY, max_tokens=3, sampling=GREEDY))
    assert all(d.logprobs is None for d in plain)


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        (StructuredOutputs(json_object=True), lambda text: isinstance(json.loads(text), dict)),
        (StructuredOutputs(json=PERSON), lambda text: set(json.loads(text)) >= {"name", "age"}),
        (StructuredOutputs(choice=["yes", "no"]), lambda text: text in ("yes", "no")),
        (StructuredOutputs(regex=r"[0-9]{3}-[0-9]{4}"), lambda text: re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)),
    ],
    ids=["json_object", "json_schema", "choice", "regex"],
)
async def test_structured_outputs_are_honoured(engine, constraint: StructuredOutputs, check: Any) -> None:
    req = GenRequest(
        "so", messages=JSON_ASK, max_tokens=80, sampling=Sampling(temperature=0, structured_outputs=constraint)
    )
    text, _, deltas = await run(engine, req)
    assert deltas[-1].finish_reason == "stop", text
    assert check(text), text
