"""Rate-limited error logging for the worker's loops.

A loop that keeps failing (Redis unreachable) logs its first error once, with the
reason and its traceback; then at most one line per ``every_s`` carrying the latest
reason and how many errors it stood for, without a traceback; and one line when the
loop succeeds again.  One :class:`ErrorLog` per loop.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

log = structlog.get_logger(__name__)

EVERY_S = 10.0


class ErrorLog:
    """The error log of one loop; see the module docstring."""

    def __init__(self, event: str, every_s: float = EVERY_S, logger: Any = None) -> None:
        self.event = event
        self.every_s = every_s
        self.log = logger if logger is not None else log
        self.failures = 0  # since the last success
        self.suppressed = 0  # since the last line written
        self._last_line = 0.0  # monotonic
        self._last_trace = -EVERY_S * 1e6  # monotonic: a traceback at most once per every_s

    def error(self, e: BaseException, **fields: object) -> None:
        """Record one failure of the loop; write a line if it is the first, or if ``every_s`` passed."""
        self.failures += 1
        now = time.monotonic()
        reason = f"{type(e).__name__}: {e}"
        if self.failures == 1:
            self._last_line = now
            # A loop that flaps (fails, recovers, fails) repeats no traceback within every_s.
            if now - self._last_trace >= self.every_s:
                self._last_trace = now
                self.log.error(self.event, reason=reason, exc_info=e, **fields)
            else:
                self.log.error(self.event, reason=reason, **fields)
        elif now - self._last_line >= self.every_s:
            self._last_line = now
            self.log.error(self.event, reason=reason, failures=self.failures, suppressed=self.suppressed, **fields)
            self.suppressed = 0
        else:
            self.suppressed += 1

    def ok(self) -> None:
        """The loop succeeded: say so once if it had been failing."""
        if self.failures:
            self.log.info(self.event + ".recovered", failures=self.failures)
            self.failures = 0
            self.suppressed = 0
