"""``genq bench e2e``: genq (broker client → Redis → one worker process) against vLLM's
``AsyncLLM`` called directly, on the same engine arguments, in one run.

Phase 1 loads ``AsyncLLM`` in this process and measures it; phase 2 shuts it down,
starts ``genq worker`` as a subprocess with the same engine arguments, and sends the
same requests through the broker (admit + follow the job's events). Only one engine
exists at a time: the machine's cores belong to it.

Measured: (a) the same N prompts (128 new tokens each, ignore_eos, greedy) with N in
flight: tokens/s and the ratio genq/direct (goal >= 0.95); (b) TTFT added by the broker:
sequential single requests, genq TTFT minus direct TTFT at p50 and p99 (goal <= 25 ms
p50); (c) tokens/s per request with 1, 2, 8, 32 concurrent users, both paths.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import structlog

from broker import Broker, BrokerSettings, JobSpec
from genq.bench.common import percentile

log = structlog.get_logger(__name__)

TOPICS = [
    "a lighthouse",
    "a robot chef",
    "the ocean",
    "a lost key",
    "mountains",
    "a city at night",
    "a dragon",
    "a library",
    "winter",
    "a train journey",
    "a garden",
    "the moon",
    "a violin",
    "a desert",
    "rain",
    "a fox",
]


def prompts(n: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} (story {i})."}]
        for i in range(n)
    ]


@dataclass(slots=True)
class Sample:
    ttft_s: float
    tokens: int
    total_s: float

    @property
    def rate(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass(slots=True)
class Phase:
    throughput_tps: float = 0.0
    ttft: list[float] | None = None  # sequential single requests
    per_user: dict[int, float] | None = None  # users -> mean tokens/s per request


async def measure(one, n_prompts: int, levels: list[int], ttft_samples: int) -> Phase:
    """``one(i, messages) -> Sample``; the same schedule for both paths."""
    msgs = prompts(max(n_prompts, max(levels)))
    await one(-1, msgs[0])  # warm-up
    phase = Phase(ttft=[], per_user={})
    for k in range(ttft_samples):
        phase.ttft.append((await one(10_000 + k, msgs[k % len(msgs)])).ttft_s)
    for users in levels:
        samples = await asyncio.gather(*(one(1000 * users + i, msgs[i]) for i in range(users)))
        phase.per_user[users] = statistics.mean(s.rate for s in samples)
        log.info("level done", users=users, tokens_per_s_per_request=round(phase.per_user[users], 1))
    t0 = time.perf_counter()
    samples = await asyncio.gather(*(one(i, msgs[i]) for i in range(n_prompts)))
    phase.throughput_tps = sum(s.tokens for s in samples) / (time.perf_counter() - t0)
    log.info("throughput done", tokens_per_s=round(phase.throughput_tps, 1))
    return phase


async def direct_phase(engine_kw: dict, n_prompts: int, levels: list[int], ttft_samples: int, max_tokens: int) -> Phase:
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from worker.engine.base import EngineSettings
    from worker.engine.vllm_engine import VllmEngine
    from worker.model import prepare_default_model

    settings = EngineSettings(kind="vllm", **engine_kw)
    path = str(prepare_default_model()) if settings.model is None else settings.model
    llm = AsyncLLM.from_engine_args(VllmEngine(settings).engine_args(path))
    tok = llm.get_tokenizer()
    params = SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, temperature=0.0, output_kind=RequestOutputKind.DELTA
    )

    async def one(i: int, messages: list[dict]) -> Sample:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        t0, first, n = time.perf_counter(), None, 0
        async for out in llm.generate(
            TokensPrompt(prompt_token_ids=ids), params, request_id=f"d{i}-{uuid.uuid4().hex}"
        ):
            n += len(out.outputs[0].token_ids)
            if first is None and n:
                first = time.perf_counter()
        end = time.perf_counter()
        return Sample((first or end) - t0, n, end - t0)

    try:
        return await measure(one, n_prompts, levels, ttft_samples)
    finally:
        llm.shutdown()


def worker_command(engine_kw: dict) -> list[str]:
    cmd = [sys.executable, "-m", "genq.cli", "worker", "--engine", "vllm"]
    for k, v in engine_kw.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


async def genq_phase(
    redis_url: str, engine_kw: dict, n_prompts: int, levels: list[int], ttft_samples: int, max_tokens: int
) -> Phase:
    queue = "bench" + secrets.token_hex(4)
    settings = BrokerSettings(redis_url=redis_url, queue=queue)
    env = {**os.environ, "GENQ_REDIS_URL": redis_url, "GENQ_QUEUE": queue, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(worker_command(engine_kw), env=env)  # noqa: ASYNC220
    broker = Broker.from_settings(settings)
    hub = broker.event_hub()
    try:
        deadline = time.monotonic() + 600
        while not (workers := await broker.workers()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start (exit code {proc.poll()})")
            await asyncio.sleep(0.5)  # waiting for a child process to load its engine
        model = workers[0]["model"]
        log.info("worker ready", model=model)

        async def one(i: int, messages: list[dict]) -> Sample:
            spec = JobSpec(
                tenant="bench", model=model, messages=messages, max_tokens=max_tokens, ignore_eos=True, temperature=0.0
            )
            t0, first, n = time.perf_counter(), None, 0
            adm = await broker.admit(spec)
            async for ev in hub.follow(adm.job_id):
                if ev.type == "token":
                    n += ev.data["n"]
                    if first is None:
                        first = time.perf_counter()
                elif ev.terminal:
                    if ev.type != "done":
                        raise RuntimeError(f"job {adm.job_id} ended {ev.type}: {ev.data}")
                    break
            end = time.perf_counter()
            return Sample((first or end) - t0, n, end - t0)

        return await measure(one, n_prompts, levels, ttft_samples)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        await hub.close()
        await broker.drop_namespace()
        await broker.close()


def report(direct: Phase, via: Phase, n_prompts: int) -> list[str]:
    ratio = via.throughput_tps / direct.throughput_tps
    added50 = (percentile(via.ttft, 50) - percentile(direct.ttft, 50)) * 1000
    added99 = (percentile(via.ttft, 99) - percentile(direct.ttft, 99)) * 1000
    lines = [
        f"{'':>28}{'direct AsyncLLM':>18}{'through genq':>16}{'ratio':>8}",
        f"{f'{n_prompts} in flight, tokens/s':>28}{direct.throughput_tps:>18.1f}{via.throughput_tps:>16.1f}"
        f"{ratio:>8.3f}",
        f"{'TTFT p50 / p99, ms':>28}{percentile(direct.ttft, 50) * 1000:>9.1f} /{percentile(direct.ttft, 99) * 1000:>6.1f}"  # noqa: E501
        f"{percentile(via.ttft, 50) * 1000:>9.1f} /{percentile(via.ttft, 99) * 1000:>6.1f}",
    ]
    for users in direct.per_user:
        d, g = direct.per_user[users], via.per_user[users]
        lines.append(f"{f'{users} users, tok/s per request':>28}{d:>18.1f}{g:>16.1f}{g / d:>8.3f}")
    per_user = ", ".join(f"{u}: {via.per_user[u] / direct.per_user[u]:.2f}" for u in direct.per_user)
    lines.append(
        f"genq bench e2e: {via.throughput_tps:.1f} vs {direct.throughput_tps:.1f} tokens/s direct "
        f"(ratio {ratio:.3f}); TTFT added p50 {added50:.1f} ms, p99 {added99:.1f} ms; "
        f"per-request rate ratio by users {{{per_user}}}"
    )
    return lines


def run(
    redis_url: str, n_prompts: int, levels: list[int], ttft_samples: int, max_tokens: int, engine_kw: dict
) -> list[str]:
    direct = asyncio.run(direct_phase(engine_kw, n_prompts, levels, ttft_samples, max_tokens))
    via = asyncio.run(genq_phase(redis_url, engine_kw, n_prompts, levels, ttft_samples, max_tokens))
    return report(direct, via, n_prompts)
