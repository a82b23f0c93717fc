"""``genq batcher``: the arq worker that drives batches. Imported lazily by ``genq/cli.py``."""

from __future__ import annotations

from typing import Annotated

import typer


def batcher_command(
    redis_url: Annotated[str | None, typer.Option(help="[env GENQ_REDIS_URL]")] = None,
    queue: Annotated[str | None, typer.Option(help="[env GENQ_QUEUE]")] = None,
    files_url: Annotated[str | None, typer.Option(help="Folder or s3:// URL of files [env GENQ_FILES_URL]")] = None,
) -> None:
    """Run batch orchestration (arq): validate batch files, feed their lines, collect results."""
    import asyncio

    from batcher.settings import BatcherSettings
    from batcher.worker import make_worker
    from broker.logs import configure_logging

    settings = BatcherSettings()
    given = {"redis_url": redis_url, "queue": queue, "files_url": files_url}
    settings = settings.model_copy(update={k: v for k, v in given.items() if v is not None})
    configure_logging(settings.json_logs, settings.log_level)
    asyncio.set_event_loop(asyncio.new_event_loop())
    make_worker(settings).run()
