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


_CHECKOUT = Path(__file__).resolve().parents[1]


@app.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
    help="Benchmarks against peers measured in the same run (`genq bench --help`; from a checkout).",
)
def bench(ctx: typer.Context) -> None:
    """``python -m benchmarks ...`` of the checkout genq runs from (not part of the installed
    package); imported only when called, so ``genq`` itself never loads it."""
    if not (_CHECKOUT / "benchmarks" / "cli.py").is_file():
        typer.echo("genq bench runs the benchmarks of a repository checkout; none is beside this install.", err=True)
        raise typer.Exit(2)
    if str(_CHECKOUT) not in sys.path:
        sys.path.append(str(_CHECKOUT))
    # imported by name: the benchmarks are not part of the typed, strict-checked packages
    bench_app = importlib.import_module("benchmarks.cli").bench_app
    bench_app(args=ctx.args, prog_name="genq bench")


@app.command("config")
def config(
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (as in deploy/README.md)."),
) -> None:
    """Every GENQ_* variable with its default and meaning (also read from ./.env)."""
    from genq.config import config_command

    config_command(markdown)


if __name__ == "__main__":
    app()
