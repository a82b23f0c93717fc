"""CLI for ``genq worker``. (Stub: the worker lands with its issue.)"""

from __future__ import annotations

import typer


def worker_command(model: str | None = None) -> None:
    raise typer.Exit("genq worker: not built yet")
