"""``python -m worker.main``: the ``genq worker`` command as a module (same flags, same exit codes).

Import direction: ``main`` → :mod:`worker.cli` (flags) → :mod:`worker.process` (the process).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Process entry point: parse flags (and ``GENQ_*`` env), run, return the exit code."""
    import typer

    from worker.cli import worker_command

    app = typer.Typer(add_completion=False)
    app.command()(worker_command)
    try:
        app(args=argv, prog_name="python -m worker.main")
    except SystemExit as e:  # typer ends with SystemExit carrying the worker's exit code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
