"""What the end-to-end benchmarks share (``bench batch``, ``bench serve``): the engine arguments
genq's worker builds and their flags, CPU snapshots of processes, the benchmark's child
processes, and a private redis-server with a genq worker on it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.e2e import worker_command
from benchmarks.procs import Procs
from benchmarks.redis_server import free_port, redis_server_binary

if TYPE_CHECKING:
    from broker import Broker

# The engine arguments genq's worker sets (worker.engine.vllm_engine.VllmEngine.engine_args),
# passed to run_batch as flags and checked equal after vLLM's parser has read them.
ENGINE_KEYS = (
    "model",
    "served_model_name",
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "enforce_eager",
    "scheduling_policy",
    "disable_log_stats",
    "enable_log_requests",
)


def genq_engine_args(engine_kw: dict[str, Any]) -> Any:
    """The AsyncEngineArgs genq's worker builds for these settings."""
    from worker.engine.base import EngineSettings
    from worker.engine.vllm_engine import VllmEngine
    from worker.model import prepare_default_model

    settings = EngineSettings(kind="vllm", **{k: v for k, v in engine_kw.items() if v is not None})
    path = str(prepare_default_model()) if settings.model is None else settings.model
    return VllmEngine(settings).engine_args(path)


def engine_flags(args: Any) -> list[str]:
    flags: list[str] = []
    for key in ENGINE_KEYS:
        value = getattr(args, key)
        if value is None:
            continue
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags += [name, *map(str, value)]
        else:
            flags += [name, str(value)]
    return flags


def norm(value: Any) -> Any:
    """The parser gives served_model_name as a list of one name."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def cpu_snapshot(named: list[tuple[str, int]]) -> dict[str, float]:
    """User + system CPU seconds of each named process, and of its descendants together as
    ``<name>+children`` (vLLM's engine core is a child of the worker, or of this process)."""
    import psutil

    def cpu(p: psutil.Process) -> float:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            return float(t.user + t.system)
        return 0.0

    out: dict[str, float] = {}
    for name, pid in named:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            out[name] = cpu(proc)
            out[f"{name}+children"] = sum(cpu(c) for c in proc.children(recursive=True))
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after}


@contextlib.asynccontextmanager
async def genq_services(
    procs: Procs, folder: Path, model: str, engine_kw: dict[str, Any], worker_timeout_s: float
) -> AsyncIterator[tuple[Broker, dict[str, str], str]]:
    """A private redis-server and a genq worker on it, started in ``procs`` (the caller stops them).

    Yields (a broker on that Redis, the environment for more genq processes, the Redis URL) once
    the worker heartbeats.
    """
    from broker import Broker, BrokerSettings

    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    env = {
        **os.environ,
        "GENQ_REDIS_URL": redis_url,
        "GENQ_QUEUE": "bench",
        "GENQ_FILES_URL": str(folder / "files"),
        "GENQ_MODELS": json.dumps([model]),
        "GENQ_JSON_LOGS": "true",
        "HF_HUB_OFFLINE": "1",
    }
    redis_cmd = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    procs.start("redis", [*redis_cmd, "--appendonly", "no", "--dir", str(folder)], env)
    async with Broker.from_settings(BrokerSettings(redis_url=redis_url, queue="bench")) as broker:
        deadline = time.monotonic() + 20
        while True:  # a child process coming up: no event to wait on
            procs.check()
            with contextlib.suppress(Exception):
                await broker.workers()
                break
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            await asyncio.sleep(0.05)
        procs.start("worker", worker_command(engine_kw), env)
        deadline = time.monotonic() + worker_timeout_s
        while not await broker.workers():
            procs.check()
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not start")
            await asyncio.sleep(0.5)  # the worker loading its engine
        yield broker, env, redis_url
