"""``genq up``, ``genq status`` and ``genq submit``: thin front ends, imports kept lazy."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated

import typer


def up_command(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: Annotated[Path | None, typer.Option(help="Where Redis keeps its AOF and the key file.")] = None,
    model: Annotated[str | None, typer.Option(help="Model path or id (default: the bundled SmolLM2-135M).")] = None,
    engine: Annotated[str, typer.Option(help="vllm or simulated")] = "vllm",
    follow_logs: Annotated[
        bool, typer.Option("--follow-logs", help="Also show the children's logs here (they go to <data-dir>/logs).")
    ] = False,
) -> None:
    from broker.logs import configure_logging
    from genq import up

    configure_logging()
    worker_args = ["--engine", engine] + (["--model", model] if model else [])
    served = up.model_name(model) if engine == "vllm" else "simulated"
    raise typer.Exit(up.run(host, port, data_dir or up.default_data_dir(), worker_args, served, follow_logs))


def logs_command(
    child: Annotated[list[str] | None, typer.Argument(help="api, worker, redis (default: all)")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines of each log to show first.")] = 50,
    data_dir: Annotated[Path | None, typer.Option(help="The `genq up` data folder.")] = None,
) -> None:
    """Print the logs `genq up` keeps for its children in its data folder."""
    import time

    from genq import procs, up

    folder = data_dir or up.default_data_dir()
    names = child or list(procs.CHILDREN)
    unknown = set(names) - set(procs.CHILDREN)
    if unknown:
        raise typer.BadParameter(f"unknown child {sorted(unknown)}: choose from {', '.join(procs.CHILDREN)}")
    prefix = len(names) > 1
    for name in names:
        for line in procs.last_lines(procs.log_path(folder, name), lines):
            typer.echo(f"{name} | {line}" if prefix else line)
    if not follow:
        return
    tails = {name: procs.Tail(procs.log_path(folder, name)) for name in names}
    try:
        while True:
            for name, tail in tails.items():
                for line in tail.read():
                    typer.echo(f"{name} | {line}" if prefix else line)
            time.sleep(0.5)  # like `tail -f`: a file has no event to wait on here
    except KeyboardInterrupt:
        pass


def status_command(model: Annotated[list[str] | None, typer.Option(help="Models to show")] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from broker import Broker, BrokerSettings

    async def show() -> None:
        settings = BrokerSettings()
        async with Broker.from_settings(settings) as broker:
            workers = await broker.workers()
            models = model or sorted(set((await broker.models()).keys()) | {w.get("model", "") for w in workers})
            wt = Table("worker", "host", "model", "capacity", "running", "tokens/s", title="workers")
            for w in workers:
                wt.add_row(
                    str(w.get("id")),
                    str(w.get("host", "")),
                    str(w.get("model", "")),
                    str(w.get("capacity", "")),
                    str(w.get("running", "")),
                    f"{float(w.get('tokens_per_s', 0)):.1f}",
                )
            qt = Table("model", "queued", "queued tokens", "running", "oldest wait", "drain jobs/s", title="queues")
            for m in filter(None, models):
                s = await broker.queue_stats(m)
                qt.add_row(
                    m,
                    str(s.total_depth),
                    str(sum(s.queued_tokens.values())),
                    str(s.running),
                    f"{s.oldest_wait_ms / 1000:.1f} s",
                    f"{s.drain_jobs_per_s:.1f}",
                )
            Console().print(wt, qt)

    asyncio.run(show())


def submit_command(
    prompt: str,
    model: Annotated[str | None, typer.Option()] = None,
    url: Annotated[str, typer.Option(envvar="GENQ_URL")] = "http://127.0.0.1:8000",
    key: Annotated[str | None, typer.Option(envvar="GENQ_API_KEY")] = None,
    max_tokens: int = 256,
    priority: int = 5,
    temperature: float = 0.0,
) -> None:
    """Submit one chat job through the native API and stream its text as it arrives."""
    from broker.settings import DEFAULT_MODEL
    from genq.client import APIError, Client, GenqError

    if key is None:
        key_file = Path(os.environ.get("GENQ_DATA_DIR", Path.home() / ".local/share/genq")) / "api_key"
        key = key_file.read_text().strip() if key_file.exists() else ""
    with Client(url, key) as client:
        try:
            job = client.submit(
                model=model or DEFAULT_MODEL,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                priority=priority,
                temperature=temperature,
            )
            where = f" at position {job.queue_position}" if job.queue_position is not None else ""
            typer.echo(f"job {job.id} {job.status}{where}", err=True)
            for event in client.stream(job.id):
                if event.text:
                    typer.echo(event.text, nl=False)
                elif event.terminal:
                    typer.echo("")
                    typer.echo(f"[{event.type}] {json.dumps(event.data)}", err=True)
                    raise typer.Exit(0 if event.type == "done" else 1)
        except APIError as e:
            typer.echo(f"error {e.status}: {json.dumps(e.body) if e.body is not None else e.message}", err=True)
            raise typer.Exit(1) from None
        except GenqError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
