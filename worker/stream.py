"""Per-job run state and the streamer: coalesced, fenced writes of every job's output.

Deltas from the engine are buffered per job; every ``flush_interval`` one cycle
writes all buffers in ONE pipeline (:meth:`broker.client.Broker.append_many`),
each fenced by its job's lease.  Completions and failures go through the same
cycles, after that cycle's appends, so a job's writes reach Redis in order from
a single writer and a job's last text rides on its ``complete`` call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog

from broker.client import Broker, OutputWrite, now_ms
from broker.contract import JobErrorCode
from broker.errors import StaleLease
from broker.models import JobStatus, Lease
from worker.engine.base import Delta

log = structlog.get_logger(__name__)


class RunState(StrEnum):
    RUNNING = "running"  # in the engine (or about to be)
    FINISHING = "finishing"  # its final write is queued in the streamer
    DROPPED = "dropped"  # lease lost to someone else: write nothing more
    HANDBACK = "handback"  # being returned to the queue by the worker
    DONE = "done"


@dataclass(slots=True, eq=False)
class JobRun:
    """One attempt at one job on this worker."""

    lease: Lease
    request_id: str
    claimed_ms: int
    claimed_at: float  # monotonic
    log: Any  # structlog logger with the job's context bound once
    state: RunState = RunState.RUNNING
    text: list[str] = field(default_factory=list)  # not yet written
    ids: list[int] = field(default_factory=list)
    tokens: int = 0  # generated in this attempt
    written: int = 0  # completion tokens of this job acknowledged by Redis in this attempt
    resend: list[OutputWrite] = field(default_factory=list)  # writes whose outcome is unknown
    prompt_tokens: int | None = None  # as the engine counted them
    first_token_at: float | None = None
    cancel_requested: bool = False
    cancel_at: float | None = None
    outcome: str = "unknown"
    task: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, lease: Lease, worker_id: str) -> JobRun:
        job = lease.job
        bound = log.bind(job_id=job.id, tenant=job.tenant, attempt=job.attempts, worker=worker_id)
        return cls(lease, f"{job.id}-{lease.fence}", now_ms(), time.monotonic(), bound)

    @property
    def job_id(self) -> str:
        return self.lease.job.id

    @property
    def cost(self) -> int:
        return self.lease.job.prompt_tokens + self.lease.job.max_tokens

    @property
    def pending(self) -> bool:
        return bool(self.text or self.ids or self.resend)

    def add(self, d: Delta) -> None:
        if d.token_ids or d.text:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.text.append(d.text)
            self.ids.extend(d.token_ids)
            self.tokens += len(d.token_ids)
        self.prompt_tokens = d.prompt_tokens

    @property
    def offset(self) -> int:
        """Completion tokens of the job in Redis before the next write (earlier attempts included)."""
        return len(self.lease.job.output_token_ids) + self.written + sum(len(d.token_ids) for d in self.resend)

    def take(self) -> tuple[str, list[int]]:
        text, ids = "".join(self.text), self.ids
        self.text, self.ids = [], []
        return text, ids

    def next_deltas(self) -> list[OutputWrite]:
        """Writes for this cycle: unacknowledged ones again (unchanged, so Redis can spot a
        replay by its offset), then the newly buffered output."""
        deltas, self.resend = self.resend, []
        if self.text or self.ids:
            offset = len(self.lease.job.output_token_ids) + self.written + sum(len(d.token_ids) for d in deltas)
            text, ids = self.take()
            deltas.append(OutputWrite(self.job_id, self.lease.fence, text, ids, offset))
        return deltas

    def summary(self) -> dict[str, Any]:
        """The fields of the job's one summary log line."""
        end = time.monotonic()
        ttft = None if self.first_token_at is None else round((self.first_token_at - self.claimed_at) * 1000, 1)
        gen_s = end - (self.first_token_at or end)
        return {
            "queue_wait_ms": max(0, self.claimed_ms - self.lease.job.created_ms),
            "ttft_ms": ttft,
            "tokens": self.tokens,
            "resumed_tokens": len(self.lease.job.output_token_ids),
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_s": round(self.tokens / gen_s, 1) if gen_s > 0 else None,
            "run_ms": round((end - self.claimed_at) * 1000, 1),
            "outcome": self.outcome,
        }


@dataclass(slots=True, eq=False)
class _Final:
    run: JobRun
    kind: str  # "complete" | "fail"
    args: tuple[Any, ...]
    done: asyncio.Future[str]


class Streamer:
    """The single writer of job output; see the module docstring."""

    def __init__(
        self,
        broker: Broker,
        runs: dict[str, JobRun],
        flush_interval_s: float,
        on_stale: Callable[[JobRun, str], Awaitable[None]],
    ) -> None:
        self.broker = broker
        self.runs = runs  # the worker's table of held jobs (shared, read only here)
        self.interval = flush_interval_s
        self.on_stale = on_stale
        self._finals: list[_Final] = []
        self._dirty = asyncio.Event()
        self._urgent = False
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0

    # -- producer side -----------------------------------------------------
    def poke(self, urgent: bool = False) -> None:
        """New output is buffered: a cycle will run within one flush interval, or at once
        when ``urgent`` (a job's first token: time to first token is not coalesced)."""
        if urgent:
            self._urgent = True
        self._dirty.set()

    def complete(self, run: JobRun, finish_reason: str, status: JobStatus) -> asyncio.Future[str]:
        """Queue the job's completion; resolves to ``ok`` or ``stale``."""
        return self._final(run, "complete", (finish_reason, status))

    def fail(self, run: JobRun, code: JobErrorCode, message: str, *, retry: bool) -> asyncio.Future[str]:
        """Queue the job's failure (after its buffered output); resolves to the outcome or ``stale``."""
        return self._final(run, "fail", (code, message, retry))

    def _final(self, run: JobRun, kind: str, args: tuple[Any, ...]) -> asyncio.Future[str]:
        if self._task is None or self._task.done():
            raise RuntimeError("streamer is not running")
        run.state = RunState.FINISHING if kind == "complete" else RunState.HANDBACK
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._finals.append(_Final(run, kind, args, fut))
        self._dirty.set()
        return fut

    # -- the flush loop ----------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="genq-worker-streamer")

    async def close(self) -> None:
        """Write what is buffered, then stop."""
        self._closing.set()
        self._dirty.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            if not self._closing.is_set() and not self._urgent:
                try:  # the coalescing window; cut short when closing
                    await asyncio.wait_for(self._closing.wait(), timeout=self.interval)
                except TimeoutError:
                    pass
            self._dirty.clear()
            self._urgent = False
            try:
                await self.flush()
            except Exception:
                log.exception("flush failed; retrying")
                self._dirty.set()
                if not self._closing.is_set():
                    await asyncio.sleep(self.interval)  # back-off between failing cycles
            if self._closing.is_set() and not self._finals and not any(r.pending for r in self.runs.values()):
                return

    async def flush(self) -> None:
        """One cycle: all buffered deltas in one pipeline, then the queued finals concurrently."""
        finals, self._finals = self._finals, []
        completing = {f.run for f in finals if f.kind == "complete"}
        batch: list[tuple[JobRun, OutputWrite]] = []
        for run in self._writers(finals):
            if run not in completing or run.resend:
                for d in run.next_deltas() if run not in completing else self._resend_only(run):
                    batch.append((run, d))
        if batch:
            try:
                accepted = await self.broker.append_many([d for _, d in batch])
            except BaseException:
                for run, d in batch:
                    run.resend.append(d)  # outcome unknown: replay as is; Redis dedupes by offset
                self._finals[:0] = finals
                raise
            self.flushes += 1
            for run, d in batch:
                if accepted.get(d.job_id, False):
                    run.written += len(d.token_ids)
            for run in {r for r, _ in batch}:
                if not accepted.get(run.job_id, False) and run.state is not RunState.DROPPED:
                    await self.on_stale(run, "append rejected: lease no longer held")
        if finals:
            await asyncio.gather(*(self._write_final(f) for f in finals))

    @staticmethod
    def _resend_only(run: JobRun) -> list[OutputWrite]:
        deltas, run.resend = run.resend, []
        return deltas

    def _writers(self, finals: list[_Final]) -> list[JobRun]:
        seen = {f.run for f in finals}
        runs = [r for r in self.runs.values() if r.state in (RunState.RUNNING, RunState.FINISHING)]
        return runs + [r for r in seen if r not in runs]

    async def _write_final(self, f: _Final) -> None:
        run = f.run
        try:
            if run.state is RunState.DROPPED:
                result = "stale"
            elif f.kind == "complete":
                finish_reason, status = f.args
                offset = run.offset
                text, ids = run.take()
                await self.broker.complete(
                    run.lease,
                    finish_reason,
                    text,
                    ids,
                    status=status,
                    offset=offset,
                    prompt_tokens=run.prompt_tokens or 0,
                )
                result = "ok"
            else:
                code, message, retry = f.args
                result = await self.broker.fail(
                    run.lease, code, message, retry=retry, handback=code is JobErrorCode.WORKER_SHUTDOWN
                )
        except StaleLease:
            result = "stale"
        except Exception as e:  # noqa: BLE001 - the lease will expire and the job be retried elsewhere
            if not f.done.done():
                f.done.set_exception(e)
            return
        if not f.done.done():
            f.done.set_result(result)
