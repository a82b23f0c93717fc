"""The ``genq`` command. Sub-commands import their package lazily, so ``genq --help``
is fast and the API process never imports vLLM."""

from __future__ import annotations

import typer

from api.cli import api_command, keys_app
from genq.ops import logs_command, status_command, submit_command, up_command
from worker.cli import worker_command

app = typer.Typer(no_args_is_help=True, add_completion=False, help="genq: a request broker for LLM serving.")
app.command("up", help="Run the whole stack on this machine: Redis, the API and one worker.")(up_command)
app.command("logs", help="Show the logs of `genq up`'s children (api, worker, redis).")(logs_command)
app.command("api", help="Run the HTTP API.")(api_command)
app.command("worker", help="Run one worker (one engine).")(worker_command)
app.command("status", help="Show workers and queues.")(status_command)
app.command("submit", help="Submit one job and stream its output.")(submit_command)
app.add_typer(keys_app, name="keys", help="Manage API keys.")

if __name__ == "__main__":
    app()
