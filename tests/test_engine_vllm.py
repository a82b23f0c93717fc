"""The vLLM engine on the CPU with the default model (slow: one engine, ~30 s)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("vllm")

from broker.contract import Sampling
from worker.engine import (
    Delta,
    EngineArgsError,
    EngineDeadError,
    EngineSettings,
    GenRequest,
    InvalidRequestError,
    PromptTooLongError,
    open_engine,
)
from worker.model import DEFAULT_MODEL_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, in a small village by the sea, there lived"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator:
    settings = EngineSettings(
        kind="vllm",
        max_num_seqs=8,
        max_model_len=1024,
        scheduler_stats=True,
        # engine arguments read by vLLM's parser (test_engine_arguments_reach_vllm); the CPU default block is 128
        engine_args={"block_size": "64", "max_logprobs": "7"},
    )
    eng = await open_engine(settings)
    try:
        yield eng
    finally:
        await eng.close()


async def collect(eng, req: GenRequest, timeout_s: float = 120) -> list[Delta]:
    async def run() -> list[Delta]:
        return [d async for d in eng.generate(req)]

    return await asyncio.wait_for(run(), timeout_s)


def joined(deltas: list[Delta]) -> tuple[str, list[int]]:
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]


async def test_identity(engine) -> None:
    assert engine.model_name == DEFAULT_MODEL_NAME
    assert engine.capacity == 8
    assert engine.max_model_len == 1024


async def test_engine_arguments_reach_vllm(engine) -> None:
    config = engine._llm.vllm_config
    assert config.cache_config.block_size == 64
    assert config.model_config.max_logprobs == 7
    assert config.scheduler_config.policy == "priority"  # genq's own, kept
    assert config.scheduler_config.max_num_seqs == 8


async def test_engine_configuration_refused_before_any_load(engine) -> None:
    from worker.engine.vllm_engine import VllmEngine

    # valid for the parser, refused by vLLM's config check (more active sequences than slots)
    doomed = VllmEngine(EngineSettings(kind="vllm", max_num_seqs=8, engine_args={"max_num_active_seqs": "16"}))
    with pytest.raises(
        EngineArgsError, match=r"configuration: SchedulerConfig: .*max_num_active_seqs \(16\) cannot be greater than"
    ):
        await doomed.start()
    assert doomed._llm is None  # refused while building the configuration: no engine core was started


async def test_capital_of_france(engine) -> None:
    out = await collect(engine, GenRequest("france", messages=FRANCE, max_tokens=32, sampling=Sampling(temperature=0)))
    text, ids = joined(out)
    assert "Paris" in text
    assert out[-1].finish_reason in ("stop", "length")
    assert all(d.finish_reason is None for d in out[:-1])
    # the streamed deltas add up to the decoded completion
    assert text == engine._tokenizer.decode(ids, skip_special_tokens=True)
    assert out[0].prompt_tokens == engine.count_prompt_tokens(None, FRANCE)
    assert all(d.prompt_tokens == out[0].prompt_tokens for d in out)


async def test_plain_prompt_token_count_and_length(engine) -> None:
    out = await collect(
        engine,
        GenRequest("plain", prompt=STORY, max_tokens=7, sampling=Sampling(temperature=0, ignore_eos=True)),
    )
    assert out[0].prompt_tokens == engine.count_prompt_tokens(STORY, None) > 5
    assert len(joined(out)[1]) == 7
    assert out[-1].finish_reason == "length"


async def test_resume_continues_greedy_sequence(engine) -> None:
    base = dict(prompt=STORY, max_tokens=20, sampling=Sampling(temperature=0, ignore_eos=True))
    full_text, full_ids = joined(await collect(engine, GenRequest("full", **base)))
    assert len(full_ids) == 20
    rest = await collect(engine, GenRequest("resumed", **base, resume_token_ids=full_ids[:8]))
    rest_text, rest_ids = joined(rest)
    assert rest_ids == full_ids[8:]
    assert rest[0].prompt_tokens == engine.count_prompt_tokens(STORY, None)
    assert rest[-1].finish_reason == "length"
    head = engine._tokenizer.decode(full_ids[:8], skip_special_tokens=True)
    assert head + rest_text == full_text

    spent = await collect(engine, GenRequest("spent", **{**base, "max_tokens": 8}, resume_token_ids=full_ids[:8]))
    assert [(d.token_ids, d.finish_reason) for d in spent] == [([], "length")]


async def test_abort_mid_stream(engine) -> None:
    req = GenRequest("abort-me", prompt=STORY, max_tokens=800, sampling=Sampling(ignore_eos=True))
    gen = engine.generate(req)
    first = await asyncio.wait_for(anext(gen), 60)
    assert first.finish_reason is None
    assert engine.stats().running == 1
    t0 = time.monotonic()
    await engine.abort("abort-me")

    async def drain() -> list[Delta]:
        return [d async for d in gen]

    rest = await asyncio.wait_for(drain(), 1.0)
    assert time.monotonic() - t0 < 1.0
    assert rest[-1].finish_reason == "abort"
    assert len(joined([first, *rest])[1]) < 800
    assert engine.stats().running == engine.stats().waiting == 0


async def test_consumer_going_away_aborts(engine) -> None:
    gen = engine.generate(GenRequest("leave", prompt=STORY, max_tokens=800, sampling=Sampling(ignore_eos=True)))
    await asyncio.wait_for(anext(gen), 60)
    await gen.aclose()
    assert engine.stats().running == engine.stats().waiting == 0
    # the engine still serves requests afterwards
    out = await collect(engine, GenRequest("after", prompt=STORY, max_tokens=2, sampling=Sampling(temperature=0)))
    assert out[-1].finish_reason is not None


async def test_priority_and_concurrency(engine) -> None:
    reqs = [
        GenRequest(
            f"prio-{p}", prompt=STORY, max_tokens=6, priority=p, sampling=Sampling(temperature=0, ignore_eos=True)
        )
        for p in (0, 5, 9)
    ]
    results = await asyncio.gather(*(collect(engine, r) for r in reqs))
    ids = [joined(r)[1] for r in results]
    assert all(len(i) == 6 for i in ids)
    assert ids[0] == ids[1] == ids[2]  # greedy, same prompt


async def test_invalid_requests(engine) -> None:
    with pytest.raises(PromptTooLongError):
        await collect(engine, GenRequest("long", prompt="word " * 2000, max_tokens=4))
    with pytest.raises(InvalidRequestError):
        await collect(engine, GenRequest("bad-top-p", prompt="hi", sampling=Sampling.model_construct(top_p=0)))
    with pytest.raises(InvalidRequestError):
        await collect(engine, GenRequest("no-prompt"))
    assert engine.stats().running == engine.stats().waiting == 0


async def test_stats_running_and_waiting(engine) -> None:
    reqs = [
        GenRequest(f"load-{i}", prompt=STORY, max_tokens=40, sampling=Sampling(ignore_eos=True))
        for i in range(engine.capacity + 2)
    ]
    tasks = [asyncio.create_task(collect(engine, r)) for r in reqs]
    seen = set()
    async with asyncio.timeout(120):  # wait for the full-batch state itself
        while not all(t.done() for t in tasks):
            s = engine.stats()
            seen.add((s.running, s.waiting))
            if s.running == engine.capacity and s.waiting == 2:
                assert 0 < s.kv_cache_usage <= 1
                break
            await asyncio.sleep(0.01)
    assert (engine.capacity, 2) in seen
    await asyncio.gather(*tasks)
    assert engine.stats().running == engine.stats().waiting == 0


# Keep last: it kills the module's engine.
async def test_zz_engine_death_is_translated(engine) -> None:
    import multiprocessing
    import signal

    gen = engine.generate(GenRequest("doomed", prompt=STORY, max_tokens=800, sampling=Sampling(ignore_eos=True)))
    await asyncio.wait_for(anext(gen), 60)
    cores = [p for p in multiprocessing.active_children() if "EngineCore" in p.name]
    assert cores, "engine core process not found"
    for proc in cores:
        os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError):
        async with asyncio.timeout(30):
            async for _ in gen:
                pass
    with pytest.raises(EngineDeadError):
        await collect(engine, GenRequest("after-death", prompt="hi", max_tokens=2))
