"""Jobs whose OpenAI client went away: cancelled at once, or after a grace if a retry may re-attach.

A request without an ``Idempotency-Key`` cannot be retried onto the same job, so
its job is cancelled as soon as its client is gone (nobody will read the output).
With a key, a retry (a dropped connection, a client's own retry after a 503) finds
the same job by admission and follows its stream from the start; so the job is
only cancelled ``grace_s`` later, and not at all if by then someone follows its
events again: a retry in this process drops the pending cancel (:meth:`adopt`); one
in another API process is seen as a follower of the job's channel.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from broker import errors as be
from broker.client import Broker

log = structlog.get_logger(__name__)


async def cancel_quietly(broker: Broker, job_id: str, tenant: str) -> None:
    with contextlib.suppress(be.NotFound, be.AlreadyTerminal):
        await broker.cancel(job_id, tenant)
        log.info("job cancelled: nobody is waiting for it any more", job_id=job_id)


class Orphans:
    def __init__(self, broker: Broker, grace_s: float) -> None:
        self._broker, self.grace_s = broker, grace_s
        self._pending: dict[str, tuple[str, asyncio.Task[None]]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def schedule(self, job_id: str, tenant: str) -> None:
        """Cancel the job after the grace unless it is followed again. Synchronous: safe when cancelled."""
        self.adopt(job_id)  # a second drop restarts the grace
        task = asyncio.get_running_loop().create_task(self._expire(job_id, tenant), name=f"genq-orphan-{job_id}")
        self._pending[job_id] = (tenant, task)

    def adopt(self, job_id: str) -> bool:
        """A retry with the job's key re-attached in this process: keep the job."""
        pending = self._pending.pop(job_id, None)
        if pending is not None:
            pending[1].cancel()
            log.info("job re-attached by a retry", job_id=job_id)
        return pending is not None

    async def _expire(self, job_id: str, tenant: str) -> None:
        await asyncio.sleep(self.grace_s)  # a deadline, not a wait for an event
        if self._pending.get(job_id, (None, None))[1] is asyncio.current_task():
            del self._pending[job_id]
        await self._settle(job_id, tenant)

    async def _settle(self, job_id: str, tenant: str) -> None:
        try:
            if await self._broker.followers(job_id) > 0:
                log.info("orphaned job kept: it is followed again", job_id=job_id)
                return
            await cancel_quietly(self._broker, job_id, tenant)
        except Exception as e:  # noqa: BLE001 - Redis away: the job runs to its end, its result stays readable
            log.warning("could not cancel an orphaned job", job_id=job_id, error=str(e))

    async def aclose(self) -> None:
        """At shutdown the retry may come to the restarted API (or another one): keep the jobs,
        which run to their end with their results readable; only the timers stop here."""
        pending, self._pending = self._pending, {}
        for _, task in pending.values():
            task.cancel()
        if pending:
            log.info("shutting down: jobs kept for a retry", jobs=len(pending))
