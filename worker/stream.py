"""The streamer: coalesced, fenced writes of every job's output.  It only writes.

The worker buffers engine deltas in each run's :class:`~worker.run.OutputBuffer`
and pokes the streamer with the run; every ``flush_interval`` one cycle writes
all poked buffers in ONE pipeline (:meth:`broker.client.Broker.append_many`),
each fenced by its job's lease.  Completions and failures the worker queues go
through the same cycles, after that cycle's appends, so a job's writes reach
Redis in order from a single writer and a job's last text rides on its
completion.

A job nobody streams (``JobSpec.stream`` false: batch lines, non-streaming OpenAI
calls, background jobs) is not poked per delta: its whole output rides on its
completion, one fenced call that writes the text, the usage, the finish reason,
one token event with all of it and the terminal event.  So that a long generation
lost to a crash need not start over, such a job's output is also written as one
ordinary delta (a checkpoint) every ``checkpoint_interval``; a retried attempt
resumes after the last checkpoint as it would after any delta (0: no checkpoints,
a retry starts over; nothing of the lost attempt was visible).  A failure or a
hand-back writes the buffered output first, as for any job, so the retry resumes
after it.

The coalescing window widens with load: after a cycle of W writes the next window is
W / ``writes_per_s`` seconds (so one worker sends Redis about ``writes_per_s`` deltas a
second however many sequences it streams), never under ``flush_interval`` nor over
``max_interval``. A worker streaming few sequences keeps the base window; one streaming
128 at the defaults (20 ms, 2,000/s, 100 ms) writes every 64 ms, each delta carrying the
tokens of ~3 engine steps of a fast GPU. A job's first token is never held back.

Lifecycle is the worker's: the streamer reads whether a run is still leased,
and reports a write Redis refused (a stale lease) through ``on_stale``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from broker.client import Broker, Completion, OutputWrite
from broker.contract import FailOutcome, JobErrorCode
from broker.errors import StaleLease
from broker.models import JobStatus
from worker.errlog import ErrorLog
from worker.run import JobRun

log = structlog.get_logger(__name__)


class WriteAbandoned(Exception):
    """The streamer gave up on Redis (a stopping worker's deadline): this write was never made."""


@dataclass(slots=True, eq=False)
class _Completion:
    run: JobRun
    finish_reason: str
    status: JobStatus
    done: asyncio.Future[bool]  # True: written; False: the lease was lost


@dataclass(slots=True, eq=False)
class _Failure:
    run: JobRun
    code: JobErrorCode
    message: str
    retry: bool
    handback: bool  # a stopping worker's: the attempt is not spent
    done: asyncio.Future[FailOutcome | None]  # None: the lease was lost


def flush_window(writes: int, base_s: float, max_s: float, writes_per_s: float) -> float:
    """The coalescing window after a cycle of ``writes`` (see the module docstring; 0 = fixed)."""
    if writes_per_s <= 0:
        return base_s
    return min(max(base_s, max_s), max(base_s, writes / writes_per_s))


class Streamer:
    """The single writer of job output; see the module docstring."""

    def __init__(
        self,
        broker: Broker,
        flush_interval_s: float,
        on_stale: Callable[[JobRun], Awaitable[None]],
        checkpoint_interval_s: float = 0.0,
        *,
        max_interval_s: float = 0.0,
        writes_per_s: float = 0.0,
    ) -> None:
        self.broker = broker
        self.interval = flush_interval_s
        self.max_interval = max_interval_s
        self.writes_per_s = writes_per_s
        self.window = flush_interval_s  # the coalescing window now (flush_window)
        self.checkpoint_s = checkpoint_interval_s
        self.on_stale = on_stale
        self._dirty_runs: set[JobRun] = set()  # with output to write (or to write again)
        self._finals: list[_Completion | _Failure] = []
        self._dirty = asyncio.Event()
        self._urgent = False
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0
        self._writing: list[_Completion | _Failure] = []  # finals being written in this cycle
        self._abandoned = False
        self.errors = ErrorLog("worker.flush_failed", logger=log)

    # -- producer side -----------------------------------------------------
    def poke(self, run: JobRun, urgent: bool = False) -> None:
        """``run`` has new output buffered: a cycle will run within one flush interval, or at
        once when ``urgent`` (a job's first token: time to first token is not coalesced).
        An unstreamed run's output waits for its completion, or for its next checkpoint."""
        if not run.output.streamed:
            if not run.output.checkpoint_due(self.checkpoint_s):
                return
            urgent = False
        self._dirty_runs.add(run)
        if urgent:
            self._urgent = True
        self._dirty.set()

    def queue_completion(self, run: JobRun, finish_reason: str, status: JobStatus) -> asyncio.Future[bool]:
        """Queue the job's completion (its buffered text rides on it); resolves to False if the lease was lost."""
        self._check_running()
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue(_Completion(run, finish_reason, status, fut))
        return fut

    def queue_failure(
        self, run: JobRun, code: JobErrorCode, message: str, *, retry: bool, handback: bool = False
    ) -> asyncio.Future[FailOutcome | None]:
        """Queue the job's failure (after its buffered output); resolves to where the job went,
        or None if the lease was lost."""
        self._check_running()
        fut: asyncio.Future[FailOutcome | None] = asyncio.get_running_loop().create_future()
        self._queue(_Failure(run, code, message, retry, handback, fut))
        return fut

    def _check_running(self) -> None:
        if not self._abandoned and (self._task is None or self._task.done()):
            raise RuntimeError("streamer is not running")

    def _queue(self, final: _Completion | _Failure) -> None:
        if self._abandoned:
            self._fail([final])
            return
        self._finals.append(final)
        self._dirty.set()

    # -- the flush loop ----------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="genq-worker-streamer")

    async def close(self) -> None:
        """Write what is buffered, then stop (retrying while Redis fails: bound it, then :meth:`abandon`)."""
        self._closing.set()
        self._dirty.set()
        if self._task is not None:
            await self._task

    def abandon(self) -> int:
        """Stop now, writing nothing more: every queued final fails with :class:`WriteAbandoned`.
        Returns how many finals were dropped (their leases lapse; the jobs are retried elsewhere).
        Does not wait for the cycle under way: a Redis client retrying may take its time to cancel."""
        self._closing.set()
        self._abandoned = True
        if self._task is not None:
            self._task.cancel()
        finals, self._finals = self._finals + self._writing, []
        self._writing = []
        self._dirty_runs = set()
        return self._fail(finals)

    @staticmethod
    def _fail(finals: list[_Completion | _Failure]) -> int:
        for f in finals:
            if not f.done.done():
                f.done.set_exception(WriteAbandoned("the worker gave up on Redis"))
        return len(finals)

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            if not self._closing.is_set() and not self._urgent:
                try:  # the coalescing window; cut short when closing
                    await asyncio.wait_for(self._closing.wait(), timeout=self.window)
                except TimeoutError:
                    pass
            self._dirty.clear()
            self._urgent = False
            try:
                await self.flush()
                self.errors.ok()
            except Exception as e:  # noqa: BLE001 - Redis away: retried; logged rate-limited
                self.errors.error(e, retrying=True)
                self._dirty.set()
                if not self._closing.is_set():
                    await asyncio.sleep(self.interval)  # back-off between failing cycles
            if self._closing.is_set() and not self._finals and not self._dirty_runs:
                return

    async def flush(self) -> None:
        """One cycle: all buffered output in one pipeline, then the queued finals concurrently."""
        finals, self._finals = self._finals, []
        completing = {f.run for f in finals if isinstance(f, _Completion)}
        # A run no longer leased writes only with its final; a lost one writes nothing.
        writers = {r for r in self._dirty_runs if r.leased} | {f.run for f in finals if not f.run.lost}
        self._dirty_runs = set()
        batch: list[tuple[JobRun, OutputWrite]] = []
        for run in writers:
            # a completing run's new text rides on its completion; only replays go first
            writes = run.output.take_unacked() if run in completing else run.output.next_writes()
            batch += [(run, w) for w in writes]
        if batch:
            try:
                accepted = await self.broker.append_many([w for _, w in batch])
            except BaseException:
                for run, w in batch:
                    run.output.unknown(w)
                    self._dirty_runs.add(run)
                if self._abandoned:
                    self._fail(finals)
                else:
                    self._finals[:0] = finals
                raise
            self.flushes += 1
            self.window = flush_window(len(batch), self.interval, self.max_interval, self.writes_per_s)
            for run, w in batch:
                if accepted.get(w.job_id, False):
                    run.output.acknowledged(w)
            for run in {r for r, _ in batch}:
                if not accepted.get(run.job_id, False):
                    await self.on_stale(run)
        if finals:
            self._writing = finals
            completions = [f for f in finals if isinstance(f, _Completion)]
            failures = [f for f in finals if isinstance(f, _Failure)]
            await asyncio.gather(self._write_completions(completions), *(self._write_final(f) for f in failures))
            self._writing = []

    async def _write_final(self, f: _Failure) -> None:
        try:
            outcome = await self._write_failure(f)
            if not f.done.done():
                f.done.set_result(outcome)
        except Exception as e:  # noqa: BLE001 - the lease will expire and the job be retried elsewhere
            if not f.done.done():
                f.done.set_exception(e)

    async def _write_completions(self, finals: list[_Completion]) -> None:
        """Every completion of this cycle in one broker call (one script call per model)."""
        for f in finals:
            if f.run.lost and not f.done.done():
                f.done.set_result(False)
        todo = [f for f in finals if not f.run.lost]
        if not todo:
            return
        items = []
        for f in todo:
            run = f.run
            offset = run.output.offset
            text, ids, logprobs = run.output.take()
            items.append(
                Completion(
                    run.lease,
                    f.finish_reason,
                    text,
                    ids,
                    f.status,
                    offset=offset,
                    prompt_tokens=run.prompt_tokens or 0,
                    logprobs=logprobs,
                )
            )
        try:
            written = await self.broker.complete_batch(items)
        except Exception as e:  # noqa: BLE001 - the leases will expire and the jobs be retried elsewhere
            for f in todo:
                if not f.done.done():
                    f.done.set_exception(e)
            return
        for f in todo:
            if not f.done.done():
                f.done.set_result(written.get(f.run.job_id, False))

    async def _write_failure(self, f: _Failure) -> FailOutcome | None:
        if f.run.lost:
            return None
        try:
            return await self.broker.fail(f.run.lease, f.code, f.message, retry=f.retry, handback=f.handback)
        except StaleLease:
            return None
