"""``python -m benchmarks batch``: a batch through genq (batch API, one worker) against vLLM's own
``run_batch`` entry point, on the same engine arguments, in one run on the CPU model.

Phase 1 runs vLLM's batch runner in this process: its own argument parser reads
``-i in.jsonl -o out.jsonl --model ...`` (the flags ``python -m vllm.entrypoints.openai.run_batch``
takes, checked to give the same engine arguments as genq's worker), its engine client is
built, and only ``run_batch()`` (read the file, run every line, write the output) is timed,
not the engine's start-up. Phase 2 shuts it down and starts genq: a private
``redis-server``, ``genq worker`` (same engine arguments), ``genq api`` and ``genq batcher``
as processes; after a one-line warm-up batch (the batcher loads its tokenizer on its first
batch; that time is printed, not counted), the same file is uploaded with the official
``openai`` client and timed from ``batches.create`` to ``completed``. Only one engine exists
at a time.

Measured: (a) new tokens/s of both and the ratio genq / run_batch (goal >= 0.97); (b) the
Redis CPU per line (``INFO cpu`` of the private redis-server, user + sys, over the batch);
(c) an interactive request's TTFT (submit to first token, POST /v1/jobs + its SSE stream)
while the batch runs against on the idle engine (goal <= 1.5x).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
from httpx_sse import aconnect_sse

from benchmarks.e2e import TOPICS
from benchmarks.procs import Procs
from benchmarks.redis_server import free_port
from benchmarks.stack import (
    ENGINE_KEYS,
    cpu_delta,
    cpu_snapshot,
    engine_flags,
    genq_engine_args,
    genq_services,
    norm,
)

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Config:
    lines: int = 256
    max_tokens: int = 128
    max_num_seqs: int = 64
    model: str | None = None
    ttft_samples: int = 5
    interactive_tokens: int = 16
    keep: str | None = None  # a folder to keep the files and the processes' logs in (default: a temporary one)


@dataclass(slots=True)
class Result:
    seconds: float
    lines_ok: int
    tokens: int
    redis_cpu_s: float = 0.0
    ttft_idle: list[float] = field(default_factory=list)
    ttft_busy: list[float] = field(default_factory=list)
    to_in_progress_s: float | None = None  # genq: batches.create until in_progress was seen (pickup, validation)
    lines_span_s: float | None = None  # genq: the first line's start to the last line's end (broker timings)
    warm_up_s: float | None = None  # genq: the one-line warm-up batch (the batcher's first)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process over the timed part

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def batch_rows(n: int, max_tokens: int, model: str) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} ({i})."}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        rows.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def count_output(text: str) -> tuple[int, int]:
    """(lines answered 200, completion tokens) of an OpenAI batch output file."""
    ok, tokens, _ = read_output(text)
    return ok, tokens


def read_output(text: str) -> tuple[int, int, set[str]]:
    """(lines answered 200, completion tokens, request ids) of an OpenAI batch output file."""
    ok = tokens = 0
    ids: set[str] = set()
    for raw in text.splitlines():
        if not raw.strip():
            continue
        row = json.loads(raw)
        resp = row.get("response") or {}
        if resp.get("status_code") == 200:
            ok += 1
            tokens += resp["body"]["usage"]["completion_tokens"]
            ids.add(resp.get("request_id", ""))
    return ok, tokens, ids


# -- engine arguments ------------------------------------------------------------------------
# -- phase 1: vLLM's run_batch -------------------------------------------------------------
async def vllm_phase(cfg: Config, engine_kw: dict[str, Any], folder: Path, rows: list[dict[str, Any]]) -> Result:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.run_batch import make_arg_parser, run_batch, validate_run_batch_args
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ours = genq_engine_args(engine_kw)
    src, dst = folder / "in.jsonl", folder / "vllm-out.jsonl"
    write_jsonl(src, rows)
    argv = ["-i", str(src), "-o", str(dst), *engine_flags(ours)]
    log.info("vllm run_batch", argv=" ".join(argv))
    args = make_arg_parser(FlexibleArgumentParser(description="run_batch")).parse_args(argv)
    theirs = AsyncEngineArgs.from_cli_args(args)
    differ = {k: (a, b) for k in ENGINE_KEYS if norm(a := getattr(ours, k)) != norm(b := getattr(theirs, k))}
    if differ:
        raise SystemExit(f"run_batch would get other engine arguments than genq's worker: {differ}")
    validate_run_batch_args(args)
    async with build_async_engine_client(args, usage_context=UsageContext.OPENAI_BATCH_RUNNER) as engine:
        me = [("run_batch", os.getpid())]
        cpu0 = cpu_snapshot(me)
        t0 = time.perf_counter()
        await run_batch(engine, args)
        seconds = time.perf_counter() - t0
        cpu = cpu_delta(cpu0, cpu_snapshot(me))
    ok, tokens = count_output(dst.read_text())
    log.info("vllm run_batch done", seconds=round(seconds, 2), lines_ok=ok, tokens=tokens, cpu_s=cpu)
    return Result(seconds, ok, tokens, cpu_s=cpu)


# -- phase 2: genq --------------------------------------------------------------------------
async def lines_span(redis_url: str, tenant: str, job_ids: set[str]) -> float | None:
    from broker import Broker, BrokerSettings

    starts, ends = [], []
    async with Broker.from_settings(BrokerSettings(redis_url=redis_url, queue="bench")) as broker:
        after = None
        while True:
            page = await broker.job_page(tenant, None, 1000, after)
            mine = [j for j in page.jobs if j.id in job_ids]
            starts += [j.started_ms for j in mine if j.started_ms]
            ends += [j.finished_ms for j in mine if j.finished_ms]
            if not page.has_more:
                break
            after = page.next_after
    return (max(ends) - min(starts)) / 1000 if starts and ends else None


def redis_cpu_s(url: str) -> float:
    import redis

    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def ttft(http: httpx.AsyncClient, key: str, model: str, max_tokens: int, i: int) -> float:
    """Submit one interactive chat job and follow its stream: seconds to its first token."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    t0 = time.perf_counter()
    r = await http.post("/v1/jobs", json=body, headers=headers)
    r.raise_for_status()
    first: float | None = None
    async with aconnect_sse(http, "GET", f"/v1/jobs/{r.json()['id']}/events", headers=headers) as events:
        async for ev in events.aiter_sse():
            if ev.event == "token" and first is None:
                first = time.perf_counter() - t0
            if ev.event in ("done", "failed", "cancelled", "expired"):
                if ev.event != "done":
                    raise RuntimeError(f"interactive job ended {ev.event}: {ev.data}")
                break
    if first is None:
        raise RuntimeError("interactive job produced no token")
    return first


async def run_batch_once(client: Any, rows: list[dict[str, Any]], procs: Procs) -> float:
    """Seconds from batches.create to completed for a small batch."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fid = (await client.files.create(file=("warm.jsonl", io.BytesIO(data)), purpose="batch")).id
    t0 = time.perf_counter()
    b = await client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        procs.check()
        await asyncio.sleep(0.1)  # the batch's progress: read over HTTP, as a script would
        b = await client.batches.retrieve(b.id)
    if b.status != "completed":
        raise SystemExit(f"the warm-up batch ended {b.status}: {b.errors}")
    return time.perf_counter() - t0


async def genq_phase(cfg: Config, engine_kw: dict[str, Any], folder: Path, rows: list[dict[str, Any]]) -> Result:
    import openai

    from api.auth import create_key

    procs = Procs(folder)
    api_port = free_port()
    model = rows[0]["body"]["model"]
    try:
        async with genq_services(procs, folder, model, engine_kw, worker_timeout_s=600) as (broker, env, redis_url):
            log.info("worker ready")
            procs.start("api", [sys.executable, "-m", "genq.cli", "api", "--port", str(api_port)], env)
            procs.start("batcher", [sys.executable, "-m", "genq.cli", "batcher"], env)
            key = await create_key(broker, "bench", "bench batch")
            live_key = await create_key(broker, "live", "bench interactive")  # live traffic: another tenant
        base = f"http://127.0.0.1:{api_port}"
        async with httpx.AsyncClient(base_url=base, timeout=600) as http:
            deadline = time.monotonic() + 60
            while True:
                procs.check()
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("genq api did not become ready")
                await asyncio.sleep(0.1)
            await ttft(http, live_key, model, cfg.interactive_tokens, -1)  # warm-up
            idle = [await ttft(http, live_key, model, cfg.interactive_tokens, k) for k in range(cfg.ttft_samples)]
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
            # A one-line batch first: the batcher loads its tokenizer on its first batch (seconds,
            # once per process), which would otherwise count against the throughput below.
            warm_s = await run_batch_once(client, rows[:1], procs)
            log.info("warm-up batch done", seconds=round(warm_s, 2))
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            fid = (await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")).id
            cpu0 = redis_cpu_s(redis_url)
            procs_cpu0 = cpu_snapshot(procs.pids())
            t0 = time.perf_counter()
            b = await client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
            busy: list[float] = []
            state = {"b": b}

            async def sample_busy() -> None:
                """Interactive requests one after another while lines run (not in the last fifth)."""
                while len(busy) < cfg.ttft_samples:
                    cur = state["b"]
                    if cur.status != "in_progress" or cur.request_counts is None:
                        if cur.status != "validating":
                            return
                    elif cur.request_counts.completed >= 0.8 * len(rows):
                        return
                    elif cur.request_counts.completed > 0 or busy:  # lines are running
                        busy.append(await ttft(http, live_key, model, cfg.interactive_tokens, 100 + len(busy)))
                        continue
                    await asyncio.sleep(0.05)  # the batch's progress, read by the loop below

            sampler = asyncio.create_task(sample_busy())
            phases: dict[str, float] = {}
            while b.status not in ("completed", "failed", "expired", "cancelled"):
                procs.check()
                phases.setdefault(b.status, time.perf_counter() - t0)
                await asyncio.sleep(0.1)  # the batch's progress: read over HTTP, as a script would
                b = state["b"] = await client.batches.retrieve(b.id)
            seconds = time.perf_counter() - t0
            cpu = redis_cpu_s(redis_url) - cpu0
            procs_cpu = cpu_delta(procs_cpu0, cpu_snapshot(procs.pids()))
            await sampler
            if b.status != "completed" or b.output_file_id is None:
                raise SystemExit(f"the genq batch ended {b.status}: {b.errors}")
            ok, tokens, job_ids = read_output((await client.files.content(b.output_file_id)).text)
            await client.close()
        span = await lines_span(redis_url, "bench", job_ids)
        log.info(
            "genq batch done",
            seconds=round(seconds, 2),
            lines_ok=ok,
            tokens=tokens,
            phases=phases,
            span_s=span,
            cpu_s=procs_cpu,
        )
        return Result(seconds, ok, tokens, cpu, idle, busy, phases.get("in_progress"), span, warm_s, procs_cpu)
    finally:
        procs.stop()


def report(cfg: Config, vllm: Result, genq: Result) -> list[str]:
    ratio = genq.tps / vllm.tps if vllm.tps else 0.0
    idle = statistics.median(genq.ttft_idle) * 1000
    busy = statistics.median(genq.ttft_busy) * 1000 if genq.ttft_busy else float("nan")
    cpu_ms = genq.redis_cpu_s * 1000 / cfg.lines
    step_ms = cfg.max_num_seqs / vllm.tps * 1000 if vllm.tps else float("nan")
    lines = [
        f"{'':>34}{'vLLM run_batch':>16}{'genq batch':>14}{'ratio':>8}",
        f"{f'{cfg.lines} lines x {cfg.max_tokens} tokens, tokens/s':>34}{vllm.tps:>16.1f}{genq.tps:>14.1f}"
        f"{ratio:>8.3f}",
        f"{'seconds':>34}{vllm.seconds:>16.2f}{genq.seconds:>14.2f}",
        f"{'lines answered 200':>34}{vllm.lines_ok:>16}{genq.lines_ok:>14}",
        f"Redis CPU per line: {cpu_ms:.3f} ms (private redis-server, INFO cpu user+sys over the batch, "
        f"{len(genq.ttft_busy)} interactive requests included)",
        f"genq batch of {genq.seconds:.2f} s: in_progress seen after {_s(genq.to_in_progress_s)}, "
        f"lines ran {_s(genq.lines_span_s)} (first start to last end); "
        f"the batcher's first batch (1 line, warm-up, not counted) took {_s(genq.warm_up_s)}",
        f"interactive TTFT median: idle {idle:.1f} ms, while the batch runs {busy:.1f} ms "
        f"({len(genq.ttft_idle)} / {len(genq.ttft_busy)} samples); one engine step of {cfg.max_num_seqs} "
        f"sequences takes ~{step_ms:.0f} ms here (max_num_seqs / run_batch tokens/s), so the busy TTFT is "
        f"{busy / step_ms:.1f} steps (a request that preempts waits for the step under way, then runs in the next)",
        f"CPU seconds over the timed part (user+sys; +children = the engine core): run_batch {_cpu(vllm.cpu_s)}; "
        f"genq {_cpu(genq.cpu_s)}",
        f"genq bench batch: {genq.tps:.1f} vs {vllm.tps:.1f} tokens/s run_batch (ratio {ratio:.3f}); "
        f"Redis CPU {cpu_ms:.3f} ms/line; TTFT idle {idle:.1f} ms, busy {busy:.1f} ms (x{busy / idle:.2f})",
    ]
    return lines


def _cpu(cpu_s: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in cpu_s.items() if v >= 0.05) or "?"


def _s(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f} s"


def run(cfg: Config) -> list[str]:
    engine_kw = {"max_num_seqs": cfg.max_num_seqs, "model": cfg.model}
    from worker.engine.base import EngineSettings
    from worker.engine.vllm_engine import VllmEngine

    model = VllmEngine(EngineSettings(kind="vllm", **{k: v for k, v in engine_kw.items() if v})).model_name
    rows = batch_rows(cfg.lines, cfg.max_tokens, model)
    with contextlib.ExitStack() as stack:
        if cfg.keep:
            folder = Path(cfg.keep)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genq-bench-batch-")))
        vllm = asyncio.run(vllm_phase(cfg, engine_kw, folder, rows))
        genq = asyncio.run(genq_phase(cfg, engine_kw, folder, rows))
    return report(cfg, vllm, genq)
