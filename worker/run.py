"""One attempt at one job on this worker: its lifecycle and its not-yet-written output.

A :class:`JobRun` is the only owner of its state; every change is a named
transition, called by the worker (:mod:`worker.loop`)::

    RUNNING ──finishing()──► FINISHING ──done()──► DONE
       │  └──failing() / hand_back()──► FAILING ──done()──► DONE
       └──drop(reason) (from any live state)──► DROPPED ──done()──► DONE

- RUNNING: in the engine (or about to be); its lease is renewed, its output streamed (an
  unstreamed job's only checkpointed: see :class:`worker.stream.Streamer`).
- FINISHING: its completion is queued in the streamer; the lease is still renewed.
- FAILING: its failure (or hand-back to the queue) is queued or about to be; not renewed.
- DROPPED: the lease went to someone else: nothing more is written for it.

A cancel is not a state but a flag on a RUNNING run (:meth:`JobRun.cancel_requested_now`):
the engine is asked to abort and the run then finishes as cancelled.

Neither is a preemption (:meth:`JobRun.preempt`): a RUNNING run of lower priority gives
its engine slot to a more urgent job; the engine aborts it and the run goes on as a new
engine request (a new *segment*) that continues after the tokens it already generated,
queued in the engine behind more urgent work.  Its lease, its output and its attempt
are unaffected.

The output buffer (:class:`OutputBuffer`) is what the streamer drains; it knows
nothing of the lifecycle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog

from broker.client import OutputWrite, now_ms
from broker.contract import TokenLogprob, logprobs_fragment
from broker.models import Lease
from worker.engine.base import Delta

log = structlog.get_logger(__name__)


class RunState(StrEnum):
    RUNNING = "running"
    FINISHING = "finishing"
    FAILING = "failing"
    DROPPED = "dropped"
    DONE = "done"


LIVE = frozenset({RunState.RUNNING, RunState.FINISHING, RunState.FAILING})
LEASED = frozenset({RunState.RUNNING, RunState.FINISHING})  # renewed, and their output streamed


@dataclass(slots=True, eq=False)
class OutputBuffer:
    """A run's output not yet acknowledged by Redis, and what was acknowledged."""

    base: int  # completion tokens of the job in Redis when this attempt began (earlier attempts)
    job_id: str
    fence: int
    text: list[str] = field(default_factory=list)  # buffered, not yet sent
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of ids, when the job asked for them
    written: int = 0  # completion tokens acknowledged by Redis in this attempt
    unacked: list[OutputWrite] = field(default_factory=list)  # sent, outcome unknown: resend as is
    # False: nobody follows the job token by token (contract.JobSpec.stream); its output is
    # written with its completion, or as a checkpoint once ``checkpoint_due``.
    streamed: bool = True
    last_write_at: float = field(default_factory=time.monotonic)  # when new output was last sent

    def checkpoint_due(self, interval_s: float) -> bool:
        """An unstreamed buffer's output is worth a write of its own (0: never, it waits for the completion)."""
        return interval_s > 0 and time.monotonic() - self.last_write_at >= interval_s

    @property
    def pending(self) -> bool:
        return bool(self.text or self.ids or self.unacked)

    @property
    def offset(self) -> int:
        """Completion tokens of the job in Redis before the next new write (earlier attempts included)."""
        return self.base + self.written + sum(len(w.token_ids) for w in self.unacked)

    def add(self, text: str, token_ids: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        self.text.append(text)
        self.ids.extend(token_ids)
        if logprobs:
            self.logprobs.extend(logprobs)

    def take(self) -> tuple[str, list[int], str]:
        """The buffered output, removed from the buffer (it rides on another write): text, token
        ids and their logprobs as the broker writes them."""
        text, ids, logprobs = "".join(self.text), self.ids, logprobs_fragment(self.logprobs)
        self.text, self.ids, self.logprobs = [], [], []
        return text, ids, logprobs

    def take_unacked(self) -> list[OutputWrite]:
        writes, self.unacked = self.unacked, []
        return writes

    def next_writes(self) -> list[OutputWrite]:
        """Writes for this cycle: unacknowledged ones again (unchanged, so Redis can spot a
        replay by its offset), then the newly buffered output."""
        offset = self.offset
        writes = self.take_unacked()
        if self.text or self.ids:
            text, ids, logprobs = self.take()
            writes.append(OutputWrite(self.job_id, self.fence, text, ids, offset, logprobs))
            self.last_write_at = time.monotonic()
        return writes

    def acknowledged(self, write: OutputWrite) -> None:
        self.written += len(write.token_ids)

    def unknown(self, write: OutputWrite) -> None:
        """A write whose reply was lost: replay it next cycle; Redis dedupes by offset."""
        self.unacked.append(write)


@dataclass(slots=True, eq=False)
class JobRun:
    """One attempt at one job on this worker; see the module docstring."""

    lease: Lease
    request_id: str
    claimed_ms: int
    claimed_at: float  # monotonic
    log: Any  # structlog logger with the job's context bound once
    output: OutputBuffer
    _state: RunState = RunState.RUNNING
    _outcome: str = "unknown"
    _cancel_at: float | None = None  # monotonic, when a client's cancel reached this worker
    _task: asyncio.Task[None] | None = None
    tokens: int = 0  # generated in this attempt
    prompt_tokens: int | None = None  # as the engine counted them
    first_token_at: float | None = None
    # preemption (see the module docstring): the tokens this attempt generated (a new segment
    # resumes after them), the segment number, whether the segment has generated yet (so holds
    # an engine slot) and since when, and whether its preemption is under way
    generated_ids: list[int] = field(default_factory=list)
    segment: int = 0
    segment_live: bool = False
    segment_started_at: float = field(default_factory=time.monotonic)
    _preempting: bool = False
    preemptions: int = 0

    @classmethod
    def start(cls, lease: Lease, worker_id: str) -> JobRun:
        job = lease.job
        bound = log.bind(job_id=job.id, tenant=job.tenant, attempt=job.attempts, worker=worker_id)
        output = OutputBuffer(len(job.output_token_ids), job.id, lease.fence, streamed=job.request.stream)
        return cls(lease, f"{job.id}-{lease.fence}", now_ms(), time.monotonic(), bound, output)

    # -- reading -------------------------------------------------------------
    @property
    def job_id(self) -> str:
        return self.lease.job.id

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def outcome(self) -> str:
        return self._outcome

    @property
    def priority(self) -> int:
        return self.lease.job.priority

    @property
    def preemptible(self) -> bool:
        """It holds an engine slot that a more urgent job may take: running and generating,
        not already being preempted, and not seeded (a resumed segment would not reproduce
        the seeded sequence)."""
        return (
            self._state is RunState.RUNNING
            and self.segment_live
            and not self._preempting
            and self._cancel_at is None
            and self.lease.job.request.sampling.seed is None
        )

    @property
    def cost(self) -> int:
        return self.lease.job.prompt_tokens + self.lease.job.max_tokens

    @property
    def leased(self) -> bool:
        """Its lease is to be renewed and its output streamed."""
        return self._state in LEASED

    @property
    def running(self) -> bool:
        return self._state is RunState.RUNNING

    @property
    def lost(self) -> bool:
        """The lease went to someone else: write nothing more."""
        return self._state is RunState.DROPPED

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_at is not None

    @property
    def interrupted(self) -> bool:
        """Generation should stop: cancelled, or no longer running (dropped, handed back)."""
        return self.cancel_requested or self._state is not RunState.RUNNING

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def ms_since_cancel(self) -> float | None:
        return None if self._cancel_at is None else round((time.monotonic() - self._cancel_at) * 1000, 1)

    # -- generation ------------------------------------------------------------
    def launch(self, work: Callable[[JobRun], Coroutine[Any, Any, None]], on_done: Callable[[JobRun], None]) -> None:
        """Run ``work(self)`` as this run's task; ``on_done(self)`` once it has ended."""
        self._task = asyncio.create_task(work(self), name=f"genq-job-{self.job_id}")
        self._task.add_done_callback(lambda _t: on_done(self))

    def add(self, d: Delta) -> bool:
        """Buffer one engine delta; True when it carried the run's first token."""
        first = False
        if d.token_ids or d.text:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
                first = True
            self.output.add(d.text, d.token_ids, d.logprobs)
            self.tokens += len(d.token_ids)
            self.generated_ids.extend(d.token_ids)
            self.segment_live = True
        self.prompt_tokens = d.prompt_tokens
        return first

    # -- transitions -------------------------------------------------------------
    def finishing(self) -> None:
        """Its completion is being queued. A dropped run stays dropped (the write is skipped)."""
        if self._state is RunState.RUNNING:
            self._state = RunState.FINISHING

    def failing(self) -> None:
        """Its failure is being queued (to the queue again, or failed for good)."""
        if self._state in LIVE:
            self._state = RunState.FAILING

    def hand_back(self) -> bool:
        """A stopping worker returns it: stop generating (cancelling the task closes its engine
        stream, which aborts it). False, and nothing changes, unless it was running."""
        if self._state is not RunState.RUNNING:
            return False
        self._state = RunState.FAILING
        if self._task is not None:
            self._task.cancel()
        return True

    def drop(self, reason: str) -> bool:
        """The lease went to someone else. True if this changed anything (then abort it in the engine)."""
        if self._state not in LIVE:
            return False
        self._state = RunState.DROPPED
        self.log.warning("job.dropped", reason=reason)
        return True

    def preempt(self) -> bool:
        """A more urgent job takes its engine slot. True if this is news (then abort its engine
        request: the run resumes as a new segment, see :meth:`resume_after_preemption`)."""
        if not self.preemptible:
            return False
        self._preempting = True
        return True

    def resume_after_preemption(self) -> bool:
        """Its engine request ended (aborted): True, and a new segment begins (a new request id),
        if that was its preemption and it is still to run; False otherwise (cancelled, handed
        back, dropped: the abort stands)."""
        if not self._preempting or self.interrupted:
            return False
        self._preempting = False
        self.preemptions += 1
        self.segment += 1
        self.segment_live = False
        self.segment_started_at = time.monotonic()
        self.request_id = f"{self.job_id}-{self.lease.fence}.{self.segment}"
        return True

    def cancel_requested_now(self, via: str) -> bool:
        """A client cancelled it. True if this is news for a running run (then abort it in the engine)."""
        if self._cancel_at is not None or self._state is not RunState.RUNNING:
            return False
        self._cancel_at = time.monotonic()
        self.log.info("job.cancel_requested", via=via)
        return True

    def concluded(self, outcome: str) -> None:
        """Record how the attempt ended, for its summary line."""
        self._outcome = outcome

    def done(self) -> None:
        self._state = RunState.DONE

    # -- the summary line --------------------------------------------------------
    def log_summary(self) -> None:
        """The job's one summary log line (a warning unless it succeeded or was cancelled)."""
        end = time.monotonic()
        ttft = None if self.first_token_at is None else round((self.first_token_at - self.claimed_at) * 1000, 1)
        gen_s = end - (self.first_token_at or end)
        fields = {
            "queue_wait_ms": max(0, self.claimed_ms - self.lease.job.created_ms),
            "ttft_ms": ttft,
            "tokens": self.tokens,
            "resumed_tokens": self.output.base,
            "preemptions": self.preemptions,
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_s": round(self.tokens / gen_s, 1) if gen_s > 0 else None,
            "run_ms": round((end - self.claimed_at) * 1000, 1),
            "outcome": self._outcome,
        }
        if self._outcome in ("succeeded", "cancelled"):
            self.log.info("job.summary", **fields)
        else:
            self.log.warning("job.summary", **fields)
