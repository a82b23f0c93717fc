"""The ``genq`` command. Sub-commands import their package lazily, so ``genq --help``
is fast and the API process never imports vLLM."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer

from api.cli import api_command, keys_app
from batcher.cli import batcher_command
from genq.batch_cli import app as batch_app
from genq.ops import logs_command, status_command, submit_command, up_command
from worker.cli import worker_command

app = typer.Typer(no_args_is_help=True, add_completion=False, help="genq: a request broker for LLM serving.")
app.command("up", help="Run the whole stack on this machine: Redis, the API and one worker.")(up_command)
app.command("logs", help="Show the logs of `genq up`'s children (api, worker, redis).")(logs_command)
app.command("api", help="Run the HTTP API.")(api_command)
app.command("worker", help="Run one worker (one engine).")(worker_command)
app.command("batcher", help="Run batch orchestration (arq): files -> jobs -> output files.")(batcher_command)
app.command("status", help="Show workers and queues.")(status_command)
app.command("submit", help="Submit one job and stream its output.")(submit_command)
app.add_typer(keys_app, name="keys", help="Manage API keys.")
app.add_typer(
    batch_app,
    name="batch",
    help="OpenAI batches from scripts: run (resumable), submit, status, list, cancel, download.",
)


def _bench_app() -> typer.Typer | None:
    """``benchmarks/`` of the checkout genq runs from (it is not part of the installed package)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "cli.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.append(str(root))
    # imported by name: the benchmarks are not part of the typed, strict-checked packages
    bench_app: typer.Typer = importlib.import_module("benchmarks.cli").bench_app
    return bench_app


if (bench_app := _bench_app()) is not None:
    app.add_typer(
        bench_app,
        name="bench",
        help="Benchmarks against peers measured in the same run (queue, redis, batch, e2e, ...; from a checkout).",
    )


@app.command("config")
def config(
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (as in deploy/README.md)."),
) -> None:
    """Every GENQ_* variable with its default and meaning (also read from ./.env)."""
    from genq.config import config_command

    config_command(markdown)


if __name__ == "__main__":
    app()
