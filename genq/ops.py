"""``genq up``, ``genq status``, ``genq submit``. (Stubs until the worker and API land.)"""

from __future__ import annotations

import typer


def up_command() -> None:
    raise typer.Exit("genq up: arrives with the worker and API")


def status_command() -> None:
    raise typer.Exit("genq status: arrives with the worker")


def submit_command() -> None:
    raise typer.Exit("genq submit: arrives with the API")
