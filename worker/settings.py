"""Worker settings: one object per worker process, from ``GENQ_WORKER_*`` variables and flags.

The broker half of a worker's configuration (Redis URL, queue, lease length,
reap interval) is the shared :class:`broker.settings.BrokerSettings` read from
``GENQ_*``; this object holds only what is the worker's own: the engine it runs
and how it feeds that engine.  Engine fields left at ``None`` keep the defaults
of :class:`worker.engine.base.EngineSettings`, so those live in one place.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.engine.base import EngineSettings

# Fields passed through to EngineSettings when set (None = the engine's default).
ENGINE_FIELDS = (
    "model",
    "served_model_name",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "dtype",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "enforce_eager",
    "sim_step_ms",
    "sim_step_ms_per_seq",
    "sim_tokens_per_step",
)


def default_worker_id() -> str:
    """Unique per process, readable in ``genq status``: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_WORKER_", extra="ignore")

    worker_id: str = Field(default_factory=default_worker_id, pattern=r"^[A-Za-z0-9._:\-]{1,128}$")

    # -- the engine ---------------------------------------------------------
    engine: Literal["vllm", "simulated"] = "vllm"
    model: str | None = None  # a model path or id; None = the default model
    served_model_name: str | None = None  # the queue name; default: the engine's model name
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    dtype: str | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    tensor_parallel_size: int | None = Field(None, ge=1)
    enforce_eager: bool | None = None
    sim_step_ms: float | None = Field(None, ge=0)
    sim_step_ms_per_seq: float | None = Field(None, ge=0)
    sim_tokens_per_step: int | None = Field(None, ge=1)

    # -- feeding the engine -------------------------------------------------
    # Deltas of each job are coalesced this long, then written for all jobs in one pipeline.
    flush_interval_ms: int = Field(20, ge=1, le=10_000)
    # On SIGTERM: how long running jobs may finish before the rest is handed back.
    drain_grace_s: float = Field(30.0, ge=0)
    # Tokens (prompt + max_tokens) of the jobs held at once; None = no bound.  Soft by one job:
    # while under budget the worker claims, and the broker always hands out a claim's first job.
    claim_token_budget: int | None = Field(None, ge=1)
    # Jobs held beyond the engine's sequence slots, so a slot that frees is refilled at once
    # while the rest of the backlog stays in Redis for other workers.
    waiting_margin: int = Field(2, ge=0)
    heartbeat_s: float = Field(2.0, gt=0)

    # -- process ------------------------------------------------------------
    log_level: str = "INFO"
    json_logs: bool | None = None  # None = JSON unless stderr is a terminal

    def engine_settings(self) -> EngineSettings:
        chosen = {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}
        return EngineSettings(kind=self.engine, **chosen)

    def tokenizer_folder(self) -> str | None:
        """A local folder the API may load this model's tokenizer from, if there is one."""
        if self.model is not None:
            path = Path(self.model).expanduser()
            return str(path.resolve()) if path.is_dir() else None
        if self.engine == "vllm":
            from worker.model import default_cache_dir, is_complete

            folder = default_cache_dir()
            return str(folder) if is_complete(folder) else None
        return None
