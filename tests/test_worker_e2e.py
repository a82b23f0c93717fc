"""The worker end to end on the real vLLM CPU engine with the default model.

One engine and one worker serve the whole module (loading takes ~30 s).  Run
under the machine's vLLM lock:
``flock /work/vllm.lock python -m pytest tests/test_worker_e2e.py -m e2e``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis as redis_sync

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

pytest.importorskip("vllm")

from broker import Broker, BrokerSettings, JobSpec, JobStatus
from broker.events import EventHub
from worker.engine import EngineSettings, open_engine
from worker.loop import Worker
from worker.model import DEFAULT_MODEL_NAME, default_cache_dir
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

REDIS = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class Stack:
    def __init__(self, broker: Broker, worker: Worker, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.broker, self.worker, self.tokenizer = broker, worker, tokenizer

    def prompt_tokens(self, messages: list[dict]) -> int:
        """Counted independently of the engine: the model folder's own tokenizer and chat template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(self.tokenizer.encode(text, add_special_tokens=False))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    from transformers import AutoTokenizer

    queue = "e2e" + secrets.token_hex(6)
    settings = BrokerSettings(redis_url=REDIS, queue=queue)
    wsettings = WorkerSettings(engine="vllm", max_num_seqs=8, max_model_len=1024, flush_interval_ms=20)
    assert wsettings.engine_settings() == EngineSettings(kind="vllm", max_num_seqs=8, max_model_len=1024)
    engine = await open_engine(wsettings.engine_settings())
    broker = Broker.from_settings(settings)
    stop = asyncio.Event()
    worker = Worker(broker, engine, wsettings, stop)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started.wait(), 30)
        yield Stack(broker, worker, AutoTokenizer.from_pretrained(default_cache_dir()))
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 120) == 0
        await engine.close()
        await broker.close()
        client = redis_sync.Redis.from_url(REDIS)
        for key in client.scan_iter(match=f"genq:{{{queue}}}*", count=1000):
            client.unlink(key)


async def run_jobs(stack: Stack, specs: list[JobSpec], timeout_s: float = 300) -> list[tuple[dict, str]]:
    """Admit, follow each job's events to the end; returns (done event data, streamed text)."""
    admitted = await stack.broker.admit_many(specs)
    ids = [a.job_id for a in admitted]  # type: ignore[union-attr]

    async with EventHub(stack.broker._redis, stack.broker._keys) as hub:

        async def follow(jid: str) -> tuple[dict, str]:
            text, last = [], None
            async for ev in hub.follow(jid):
                if ev.type == "token":
                    text.append(ev.data["text"])
                last = ev
            assert last is not None and last.type == "done", last
            return last.data, "".join(text)

        results = await asyncio.wait_for(asyncio.gather(*(follow(j) for j in ids)), timeout_s)
    return [(done, text, await stack.broker.get_job(j)) for j, (done, text) in zip(ids, results, strict=True)]  # type: ignore[misc]


async def test_worker_registers_the_default_model(stack: Stack) -> None:
    models = await stack.broker.models()
    assert models[DEFAULT_MODEL_NAME]["max_model_len"] == 1024
    assert models[DEFAULT_MODEL_NAME]["tokenizer"] == str(default_cache_dir())
    (rec,) = [w for w in await stack.broker.workers() if w["id"] == stack.worker.id]
    assert rec["model"] == DEFAULT_MODEL_NAME and rec["capacity"] == 8


async def test_capital_of_france(stack: Stack) -> None:
    spec = JobSpec(
        tenant="e2e",
        model=DEFAULT_MODEL_NAME,
        messages=FRANCE,
        temperature=0,
        max_tokens=32,
        prompt_tokens=stack.prompt_tokens(FRANCE),
    )
    ((done, streamed, job),) = await run_jobs(stack, [spec])
    assert "Paris" in job.output
    assert streamed == job.output
    assert done["finish_reason"] in ("stop", "length")


async def test_sixteen_mixed_priority_chats(stack: Stack) -> None:
    topics = ["the sea", "a cat", "Paris", "rain", "bread", "a robot", "winter", "music"]
    specs = []
    for i in range(16):
        messages = [{"role": "user", "content": f"Write one sentence about {topics[i % 8]}."}]
        specs.append(
            JobSpec(
                tenant=f"tenant{i % 3}",
                model=DEFAULT_MODEL_NAME,
                messages=messages,
                priority=[0, 5, 9, 3][i % 4],
                max_tokens=24,
                temperature=0.7,
                seed=i,
                prompt_tokens=stack.prompt_tokens(messages),
            )
        )
    results = await run_jobs(stack, specs)
    engine = stack.worker.engine
    for spec, (done, streamed, job) in zip(specs, results, strict=True):
        assert job.status is JobStatus.SUCCEEDED
        assert job.output and streamed == job.output  # the stream is the output
        usage = done["usage"]
        assert usage["prompt_tokens"] == engine.count_prompt_tokens(None, spec.messages) == spec.prompt_tokens
        assert usage["completion_tokens"] == len(job.output_token_ids) == job.completion_tokens
        assert 0 < len(job.output_token_ids) <= 24
        # the ids are the text: the tokenizer decodes them to exactly the streamed output
        assert stack.tokenizer.decode(job.output_token_ids, skip_special_tokens=True) == job.output
        assert job.first_token_ms is not None and job.finished_ms is not None
