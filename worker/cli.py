"""CLI for ``genq worker`` (and ``python -m worker.main``): flags over ``GENQ_WORKER_*`` env.

Only typer is imported here, so ``genq --help`` stays fast; the worker itself
(pydantic settings, Redis, the engine) loads when the command runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

_ENGINE = "Engine"
_FEED = "Feeding the engine"
_BROKER = "Broker (also GENQ_* env)"


def worker_command(
    engine: Annotated[
        str | None,
        typer.Option(help="vllm | simulated [env GENQ_WORKER_ENGINE; default vllm]", rich_help_panel=_ENGINE),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model path or id; default: the built-in default model.", rich_help_panel=_ENGINE),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Queue (model) name clients use.", rich_help_panel=_ENGINE)
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(help="Concurrent sequences in the engine.", rich_help_panel=_ENGINE)
    ] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(rich_help_panel=_ENGINE)] = None,
    max_model_len: Annotated[int | None, typer.Option(rich_help_panel=_ENGINE)] = None,
    dtype: Annotated[str | None, typer.Option(rich_help_panel=_ENGINE)] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(help="Share of GPU memory (of host RAM on CPU) for the KV cache.", rich_help_panel=_ENGINE),
    ] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(rich_help_panel=_ENGINE)] = None,
    enforce_eager: Annotated[
        bool | None, typer.Option("--enforce-eager/--no-enforce-eager", rich_help_panel=_ENGINE, show_default=False)
    ] = None,
    engine_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--engine-arg",
            metavar="KEY=VALUE",
            help=(
                "Any vLLM engine argument (AsyncEngineArgs field), read by vLLM's parser; repeatable. "
                "A genq setting's name (max_num_seqs, dtype, ...) sets that setting, and must agree with its flag. "
                "[env GENQ_WORKER_ENGINE_ARGS: a JSON object; a flag's key wins]"
            ),
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    sim_step_ms: Annotated[
        float | None, typer.Option(help="Simulated engine: ms per step.", rich_help_panel=_ENGINE)
    ] = None,
    sim_step_ms_per_seq: Annotated[float | None, typer.Option(rich_help_panel=_ENGINE)] = None,
    sim_tokens_per_step: Annotated[int | None, typer.Option(rich_help_panel=_ENGINE)] = None,
    flush_interval_ms: Annotated[
        int | None, typer.Option(help="Delta coalescing window [20].", rich_help_panel=_FEED)
    ] = None,
    flush_writes_per_s: Annotated[
        int | None,
        typer.Option(help="Widen the window to write ~this many deltas/s [2000; 0 = fixed].", rich_help_panel=_FEED),
    ] = None,
    flush_max_interval_ms: Annotated[
        int | None, typer.Option(help="The widest coalescing window [100].", rich_help_panel=_FEED)
    ] = None,
    checkpoint_interval_ms: Annotated[
        int | None,
        typer.Option(help="Unstreamed jobs: output checkpoint period [5000; 0 = none].", rich_help_panel=_FEED),
    ] = None,
    drain_grace_s: Annotated[
        float | None, typer.Option(help="On SIGTERM, time for running jobs [30].", rich_help_panel=_FEED)
    ] = None,
    claim_token_budget: Annotated[
        int | None, typer.Option(help="Max prompt+max_tokens held at once.", rich_help_panel=_FEED)
    ] = None,
    waiting_margin: Annotated[
        int | None, typer.Option(help="Jobs held beyond the engine's slots [2].", rich_help_panel=_FEED)
    ] = None,
    heartbeat_s: Annotated[float | None, typer.Option(rich_help_panel=_FEED)] = None,
    worker_id: Annotated[str | None, typer.Option(help="Default: host-pid-random.", rich_help_panel=_FEED)] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on this port [0 = off].", rich_help_panel=_FEED)
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="[127.0.0.1]", rich_help_panel=_FEED)] = None,
    redis_url: Annotated[str | None, typer.Option(help="[env GENQ_REDIS_URL]", rich_help_panel=_BROKER)] = None,
    queue: Annotated[str | None, typer.Option(help="[env GENQ_QUEUE]", rich_help_panel=_BROKER)] = None,
    lease_ms: Annotated[int | None, typer.Option(help="[env GENQ_LEASE_MS]", rich_help_panel=_BROKER)] = None,
    log_level: Annotated[str | None, typer.Option(help="[INFO]")] = None,
    json_logs: Annotated[bool | None, typer.Option("--json-logs/--console-logs", show_default=False)] = None,
) -> None:
    """Run one worker: one engine, fed from the queue of the model it serves."""
    flags = {k: v for k, v in locals().items() if v is not None}  # first: only the parameters

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from broker.settings import BrokerSettings
    from worker.engine.base import EngineArgsError
    from worker.process import run
    from worker.settings import WorkerSettings, parse_engine_arg

    broker_flags = {k: flags.pop(k) for k in ("redis_url", "queue", "lease_ms") if k in flags}
    try:
        if given := [parse_engine_arg(a) for a in flags.pop("engine_arg", [])]:
            flags["engine_args"] = WorkerSettings(**flags).engine_args | dict(given)  # over the env's
        settings = WorkerSettings(**flags)
        broker_settings = BrokerSettings(**broker_flags)
        settings.engine_settings()  # vLLM's parser reads the engine arguments now, before anything starts
    except ValidationError as e:
        typer.echo(f"genq worker: invalid settings\n{e}", err=True)
        raise typer.Exit(2) from None
    except (EngineArgsError, SettingsError) as e:
        typer.echo(f"genq worker: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run(settings, broker_settings))
