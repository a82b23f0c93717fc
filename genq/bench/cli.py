"""``genq bench ...`` sub-commands; each imports its benchmark lazily."""

from __future__ import annotations

import typer

bench_app = typer.Typer(no_args_is_help=True)
