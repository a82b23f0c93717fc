"""structlog set-up shared by every genq process: JSON in production, readable on a terminal.

Logging can never raise: a closed or broken stdout/stderr (a pipe nobody reads, ``| tee``
after tee died) must not stop a process from stopping or serving, so every write goes
through :class:`SafeStream`, which drops what it cannot write.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO, cast

import structlog
from structlog.typing import Processor


class SafeStream:
    """A text stream whose ``write`` and ``flush`` swallow ``OSError`` (``BrokenPipeError``
    included) and ``ValueError`` (closed file).

    After the first failure it drops everything, and points the file descriptor at
    ``/dev/null`` (as the Python docs advise for a broken stdout), so other writers of
    the same descriptor (rich, vLLM, the interpreter's flush at exit) cannot fail either.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._break()

    def _break(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # closed, or no descriptor (io.StringIO)
            pass

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors... for rich and friends
        return getattr(self._stream, name)


def safe(stream: TextIO | SafeStream) -> SafeStream:
    return stream if isinstance(stream, SafeStream) else SafeStream(stream)


class SafeHandler(logging.StreamHandler):  # type: ignore[type-arg]  # its stream is a SafeStream
    """A stdlib handler that never prints a traceback about its own failure (to a broken stderr)."""

    def handleError(self, record: logging.LogRecord) -> None:  # stdlib spells it so
        pass


def configure_logging(json_logs: bool | None = None, level: str = "INFO") -> None:
    stream = safe(sys.stderr)
    if json_logs is None:
        json_logs = not stream.isatty()
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, stream)),  # a TextIO that never raises
        cache_logger_on_first_use=True,
    )
    # Route stdlib logging (uvicorn, vllm) through the same renderer.
    handler = SafeHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
