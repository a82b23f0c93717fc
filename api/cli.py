"""CLI for the API: ``genq api`` and ``genq keys``. (Stub: the API lands with its issue.)"""

from __future__ import annotations

import typer

keys_app = typer.Typer(no_args_is_help=True)


def api_command(host: str = "127.0.0.1", port: int = 8000) -> None:
    raise typer.Exit("genq api: not built yet")
