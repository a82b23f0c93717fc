"""Background duties of a worker toward the broker: lease renewal, cancel notices, reaping.

- Renewal: every ``lease_ms / 3`` one ``renew`` call covers every held job.  A
  job reported ``CANCEL_REQUESTED`` is aborted; one reported ``STALE_LEASE``
  (reaped and handed to someone else) is dropped without another write.
- Cancel notices: a subscription to the model's control channel turns a
  client's cancel into ``engine.abort`` within milliseconds; renewal is the
  safety net for a notice missed while the subscription was reconnecting.
- Reaping: every worker requeues expired leases of its model every
  ``reap_interval_ms``, so a dead worker's jobs come back while any worker lives.

The keeper knows the worker only through :class:`LeaseHolder`; what a stale lease
or a cancel does to a run is the holder's decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import structlog

from broker.client import Broker
from broker.contract import RenewResult
from broker.models import JobStatus
from worker.errlog import ErrorLog
from worker.run import JobRun

log = structlog.get_logger(__name__)

RECONNECT_S = 0.5  # pause before re-subscribing after the control connection broke


class LeaseHolder(Protocol):
    """What the keeper needs of a worker."""

    @property
    def model(self) -> str: ...

    def held_runs(self) -> Sequence[JobRun]:
        """The runs whose leases are to be renewed."""
        ...

    async def on_stale(self, run: JobRun) -> None:
        """Renewal found ``run``'s lease held by someone else."""
        ...

    async def on_cancel(self, job_id: str, *, via: str) -> None:
        """A client cancelled ``job_id`` (it may not be held here)."""
        ...

    def on_reaped(self, outcomes: Sequence[tuple[str, JobStatus]]) -> None:
        """This keeper's reap moved these jobs (requeued, failed, expired): for metrics."""
        ...


class LeaseKeeper:
    def __init__(self, broker: Broker, holder: LeaseHolder) -> None:
        self.holder = holder
        self.broker = broker
        self.renew_s = broker.settings.lease_ms / 3000
        self.reap_s = broker.settings.reap_interval_ms / 1000
        self.subscribed = asyncio.Event()  # the control channel is being listened to
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._renew_errors = ErrorLog("worker.renew_failed", logger=log)
        self._reap_errors = ErrorLog("worker.reap_failed", logger=log)
        self._control_errors = ErrorLog("worker.control_channel_lost", logger=log)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name="genq-worker-renew"),
            asyncio.create_task(self._control_loop(), name="genq-worker-control"),
            asyncio.create_task(self._reap_loop(), name="genq-worker-reap"),
        ]

    async def close(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _tick(self, seconds: float) -> bool:
        """Wait one period; False once the keeper is stopping."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    # -- renewal -------------------------------------------------------------
    async def renew_once(self) -> None:
        held = list(self.holder.held_runs())
        if not held:
            return
        results = await self.broker.renew(self.holder.model, [(r.job_id, r.lease.fence) for r in held])
        for run in held:
            result = results.get(run.job_id)
            if result is RenewResult.STALE:
                await self.holder.on_stale(run)
            elif result is RenewResult.CANCEL_REQUESTED:
                await self.holder.on_cancel(run.job_id, via="renew")

    async def _renew_loop(self) -> None:
        while await self._tick(self.renew_s):
            try:
                await self.renew_once()
                self._renew_errors.ok()
            except Exception as e:  # noqa: BLE001 - Redis away: retried; logged rate-limited
                self._renew_errors.error(e)

    # -- cancel notices --------------------------------------------------------
    async def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                async with self.broker.cancel_notices(self.holder.model) as notices:
                    self.subscribed.set()
                    self._control_errors.ok()
                    # Notices sent while we were not subscribed are caught by the next renewal.
                    async for job_id in notices:
                        await self.holder.on_cancel(job_id, via="notice")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - connection lost: subscribe again
                self.subscribed.clear()
                self._control_errors.error(e, resubscribing=True)
                await self._tick(RECONNECT_S)

    # -- reaping ---------------------------------------------------------------
    async def _reap_loop(self) -> None:
        while await self._tick(self.reap_s):
            try:
                self.holder.on_reaped(await self.broker.reap(self.holder.model))
                self._reap_errors.ok()
            except Exception as e:  # noqa: BLE001 - Redis away: retried; logged rate-limited
                self._reap_errors.error(e)
