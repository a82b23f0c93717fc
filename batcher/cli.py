"""``genq batcher``: the arq worker that drives batches. Imported lazily by ``genq/cli.py``."""

from __future__ import annotations

from typing import Annotated, Any

import typer


def batcher_command(
    redis_url: Annotated[str | None, typer.Option(help="[env GENQ_REDIS_URL]")] = None,
    queue: Annotated[str | None, typer.Option(help="[env GENQ_QUEUE]")] = None,
    files_url: Annotated[str | None, typer.Option(help="Folder or s3:// URL of files [env GENQ_FILES_URL]")] = None,
    arq_url: Annotated[
        str | None,
        typer.Option(help="Standalone or Sentinel Redis of the arq control queue [env GENQ_BATCHER_ARQ_URL]"),
    ] = None,
) -> None:
    """Run batch orchestration (arq): validate batch files, feed their lines, collect results."""
    import asyncio

    from pydantic import ValidationError

    from batcher.arq_redis import ArqUrlError
    from batcher.settings import BatcherSettings
    from batcher.worker import make_worker
    from broker.logs import configure_logging

    given: dict[str, Any] = {"redis_url": redis_url, "queue": queue, "files_url": files_url, "batcher_arq_url": arq_url}
    try:  # flags as init values: validated, and they win over the environment
        settings = BatcherSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:  # say what is wrong, never echo a secret back
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors(include_input=False))
        typer.echo(f"genq batcher: bad settings: {problems}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.json_logs, settings.log_level)
    asyncio.set_event_loop(asyncio.new_event_loop())
    try:
        worker = make_worker(settings)
    except ArqUrlError as e:
        typer.echo(f"genq batcher: {e}", err=True)
        raise typer.Exit(2) from None
    worker.run()
