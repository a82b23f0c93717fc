"""Worker settings: one object per worker process, from ``GENQ_WORKER_*`` variables and flags.

The broker half of a worker's configuration (Redis URL, queue, lease length,
reap interval) is the shared :class:`broker.settings.BrokerSettings` read from
``GENQ_*``; this object holds only what is the worker's own: the engine it runs
and how it feeds that engine.  Engine fields left at ``None`` keep the defaults
of :class:`worker.engine.base.EngineSettings`, so those live in one place.

vLLM engine arguments beyond genq's own settings: ``--engine-arg key=value``
(repeatable) and ``GENQ_WORKER_ENGINE_ARGS``, a JSON object
(``{"enable_prefix_caching": true, "kv_cache_dtype": "fp8"}``); a flag's key wins
over the same key in the variable.  They are checked by vLLM's own parser (see
:mod:`worker.engine.vllm_args`).  Precedence, so the two never fight silently:

- an engine argument that is also a genq setting (``max_num_seqs``, ``max_model_len``,
  ``dtype``, ``gpu_memory_utilization``, ``enforce_eager``, ``model``, ...) *is* that
  setting: it applies when the flag / ``GENQ_WORKER_*`` variable is not given, and the
  same value in both is fine; different values stop the worker at start-up;
- every other engine argument overrides genq's defaults for vLLM (``disable_log_stats``,
  ``enable_log_requests``); ``scheduling_policy`` and ``skip_tokenizer_init`` are refused
  (genq needs the priority scheduler and the tokenizer).
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.engine.base import (
    VLLM_SETTING_FIELDS,
    EngineArgsError,
    EngineSettings,
    engine_arg_key,
    engine_args_text,
)

# Fields passed through to EngineSettings when set (None = the engine's default).
ENGINE_FIELDS = (*VLLM_SETTING_FIELDS, "sim_step_ms", "sim_step_ms_per_seq", "sim_tokens_per_step")


def parse_engine_arg(text: str) -> tuple[str, str]:
    """``"key=value"`` (one ``--engine-arg``) -> ``(key, value)``; a bare ``key`` is ``(key, "")``."""
    key, _, value = text.partition("=")
    if not key.strip().lstrip("-"):
        raise EngineArgsError(f"--engine-arg {text!r}: expected key=value, e.g. enable_prefix_caching=true")
    return engine_arg_key(key), value


def default_worker_id() -> str:
    """Unique per process, readable in ``genq status``: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_WORKER_", extra="ignore", env_file=".env", populate_by_name=True)

    # This worker's name in heartbeats and leases (default: host-pid-random).
    worker_id: str = Field(
        default_factory=default_worker_id,
        pattern=r"^[A-Za-z0-9._:\-]{1,128}$",
        validation_alias=AliasChoices("GENQ_WORKER_ID", "GENQ_WORKER_WORKER_ID"),
    )

    # -- the engine ---------------------------------------------------------
    engine: Literal["vllm", "simulated"] = "vllm"  # simulated: a deterministic fake engine for tests
    model: str | None = None  # a model path or id; None = the default model
    served_model_name: str | None = None  # the queue name; default: the engine's model name
    max_num_seqs: int | None = Field(None, ge=1)  # sequences the engine runs at once (default 16)
    max_num_batched_tokens: int | None = Field(None, ge=1)  # vLLM's per-step token budget
    max_model_len: int | None = Field(None, ge=16)  # context length (default 2048)
    dtype: str | None = None  # auto; float32 on the CPU with the default model
    # Share of GPU memory (of host RAM on the CPU: 0.3) for the KV cache.
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    tensor_parallel_size: int | None = Field(None, ge=1)  # GPUs one engine spans
    enforce_eager: bool | None = None  # no CUDA graphs / compilation (default: on the CPU)
    sim_step_ms: float | None = Field(None, ge=0)  # simulated engine: ms per step
    sim_step_ms_per_seq: float | None = Field(None, ge=0)  # simulated engine: extra ms per running sequence
    sim_tokens_per_step: int | None = Field(None, ge=1)  # simulated engine: tokens per sequence per step
    # Any other vLLM engine argument: field name -> text (env: a JSON object). See the module docstring.
    engine_args: dict[str, str] = Field(default_factory=dict)

    # -- feeding the engine -------------------------------------------------
    # Deltas of each job are coalesced this long, then written for all jobs in one pipeline.
    flush_interval_ms: int = Field(20, ge=1, le=10_000)
    # ... widened with load so one worker writes about this many deltas a second (0 = never
    # widened), up to flush_max_interval_ms: Redis's cost per worker stays flat past ~40 streams.
    flush_writes_per_s: int = Field(2_000, ge=0, le=1_000_000)
    # The widest coalescing window a loaded worker uses (flush_writes_per_s).
    flush_max_interval_ms: int = Field(100, ge=1, le=10_000)
    # A job nobody streams (batch lines, non-streaming OpenAI calls) writes its output once, with
    # its completion, plus a checkpoint this often, from which a retried attempt resumes; 0 = no
    # checkpoints (a retry starts over).
    checkpoint_interval_ms: int = Field(5_000, ge=0, le=3_600_000)
    # On SIGTERM: how long running jobs may finish before the rest is handed back.
    drain_grace_s: float = Field(30.0, ge=0)
    # Tokens (prompt + max_tokens) of the jobs held at once; None = no bound.  Soft by one job:
    # while under budget the worker claims, and the broker always hands out a claim's first job.
    claim_token_budget: int | None = Field(None, ge=1)
    # Jobs held beyond the engine's sequence slots, so a slot that frees is refilled at once
    # while the rest of the backlog stays in Redis for other workers.
    waiting_margin: int = Field(2, ge=0)
    heartbeat_s: float = Field(2.0, gt=0)  # how often the worker announces itself (genq status, /v1/models)

    # -- process ------------------------------------------------------------
    # Serve Prometheus /metrics on this port from the worker process (0 = off).
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # the address /metrics listens on (0.0.0.0 in containers)
    # Shared with the API: GENQ_LOG_LEVEL / GENQ_JSON_LOGS (GENQ_WORKER_* wins when both are set).
    log_level: str = Field("INFO", validation_alias=AliasChoices("GENQ_WORKER_LOG_LEVEL", "GENQ_LOG_LEVEL"))
    # None = JSON unless stderr is a terminal.
    json_logs: bool | None = Field(None, validation_alias=AliasChoices("GENQ_WORKER_JSON_LOGS", "GENQ_JSON_LOGS"))

    @field_validator("engine_args", mode="before")
    @classmethod
    def normalise_engine_args(cls, value: Any) -> Any:
        return engine_args_text(value)

    def engine_settings(self) -> EngineSettings:
        """The engine's settings, engine arguments checked (raises EngineArgsError or ValidationError).

        With engine arguments this imports vLLM (its parser reads them), and is still fast next to
        loading an engine, so a bad argument stops the worker before anything slow starts.
        """
        chosen: dict[str, Any] = {n: getattr(self, n) for n in ENGINE_FIELDS if getattr(self, n) is not None}
        rest: dict[str, str] = {}
        if self.engine_args:
            if self.engine != "vllm":
                raise EngineArgsError(f"engine arguments ({', '.join(self.engine_args)}) need --engine vllm")
            from worker.engine.vllm_args import split_engine_args

            from_args, rest = split_engine_args(self.engine_args)
            for name, value in from_args.items():
                if name in chosen and chosen[name] != value:
                    raise EngineArgsError(
                        f"{name} is given twice: --{name.replace('_', '-')} / GENQ_WORKER_{name.upper()} "
                        f"= {chosen[name]!r} and engine argument {name} = {value!r}; give it once"
                    )
                chosen[name] = value
        return EngineSettings(kind=self.engine, **chosen, engine_args=rest)

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
