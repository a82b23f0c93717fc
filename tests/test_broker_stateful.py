"""Property-based: random admit/claim/renew/append/complete/fail/cancel/reap sequences against a model.

The model is a plain dict of jobs. After every step the real broker (real Redis) must agree with it:
no job lost, none duplicated, never two valid leases on one job, statuses only move forward.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass

import pytest
import redis as redis_sync
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker import Broker, BrokerSettings, JobSpec, JobStatus
from broker.client import OutputWrite as Delta
from broker.contract import JobErrorCode, RenewResult
from broker.errors import AlreadyTerminal, IdempotencyConflict, NotFound, StaleLease
from broker.models import TERMINAL, Lease

REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TENANTS = ("a", "b", "c")
MAX_ATTEMPTS = 2

Q, R = JobStatus.QUEUED, JobStatus.RUNNING
# Allowed observed transitions between two consecutive steps (a queued job may be claimed and
# settled back to queued within one step only through rules that say so; see `moves`).
FORWARD = {
    Q: {Q, R, JobStatus.CANCELLED},
    R: {R, Q, *TERMINAL},
    **{t: {t} for t in TERMINAL},
}


@dataclass
class MJob:
    id: str
    tenant: str
    priority: int
    seq: int  # admission order: FIFO inside (tenant, priority), kept across retries
    status: JobStatus = Q
    attempts: int = 0
    fence: int | None = None  # the fence of the one valid lease while running
    cancel: bool = False


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.settings = BrokerSettings(
            redis_url=REDIS_URL,
            queue="sm" + secrets.token_hex(6),
            models=["m"],
            max_attempts=MAX_ATTEMPTS,
            lease_ms=60_000,
        )
        self.broker = Broker.from_settings(self.settings)
        self.run(self.broker.register_model("m", 4096))
        self.jobs: dict[str, MJob] = {}
        self.idem: dict[tuple[str, str], tuple[str, int]] = {}
        self.leases: list[Lease] = []  # every lease ever handed out, stale ones included
        self.seq = 0
        self.last_fence = 0
        self.seen: dict[str, JobStatus] = {}

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.broker.close())
        finally:
            self.loop.close()
            client = redis_sync.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(match=f"{self.broker._keys.prefix}*", count=1000):
                client.unlink(key)
            client.close()

    # -- helpers ------------------------------------------------------------------------
    def valid(self, lease: Lease) -> bool:
        j = self.jobs[lease.id]
        return j.status == R and j.fence == lease.fence

    def settle(self, j: MJob, retry: bool) -> str:
        """What the broker must do with a running job that failed or lost its lease."""
        j.fence = None
        if j.cancel:
            j.status = JobStatus.CANCELLED
        elif retry and j.attempts < MAX_ATTEMPTS:
            j.status = Q
        else:
            j.status = JobStatus.FAILED
        return j.status.value

    def in_status(self, *statuses: JobStatus) -> list[str]:
        """Job ids in admission order (ids are random: sampling must not depend on their order)."""
        return [jid for jid, j in self.jobs.items() if j.status in statuses]

    # -- rules --------------------------------------------------------------------------
    @initialize(tenants=st.lists(st.sampled_from(TENANTS), min_size=1, max_size=4))
    def some_jobs(self, tenants: list[str]) -> None:
        for t in tenants:
            self.admit(t, 5, None)

    @rule(
        tenant=st.sampled_from(TENANTS),
        priority=st.sampled_from([0, 1, 5, 9]),
        key=st.none() | st.sampled_from(["k1", "k2"]),
    )
    def admit(self, tenant: str, priority: int, key: str | None) -> None:
        spec = JobSpec(
            tenant=tenant,
            model="m",
            kind="completion",
            prompt="x",
            max_tokens=16,
            priority=priority,
            idempotency_key=key,
        )
        if key is not None and (tenant, key) in self.idem:
            earlier, earlier_priority = self.idem[(tenant, key)]
            if priority != earlier_priority:  # same key, another request: refused, nothing written
                with pytest.raises(IdempotencyConflict):
                    self.run(self.broker.admit(spec))
                return
            adm = self.run(self.broker.admit(spec))
            assert adm.duplicate and adm.job_id == earlier
            return
        adm = self.run(self.broker.admit(spec))
        assert not adm.duplicate and adm.job_id not in self.jobs
        self.seq += 1
        self.jobs[adm.job_id] = MJob(adm.job_id, tenant, priority, self.seq)
        if key is not None:
            self.idem[(tenant, key)] = (adm.job_id, priority)

    @rule(worker=st.sampled_from(["w1", "w2"]), n=st.integers(1, 3))
    def claim(self, worker: str, n: int) -> None:
        queued = {jid: self.jobs[jid] for jid in self.in_status(Q)}
        leases = self.run(self.broker.claim("m", worker, n))
        assert len(leases) == min(n, len(queued))
        for lease in leases:
            assert lease.id in queued, "claimed a job that was not queued (duplicate lease?)"
            j = queued.pop(lease.id)
            # strict priority, FIFO inside one tenant
            assert j.priority == min([j.priority] + [q.priority for q in queued.values()])
            assert j.seq == min(
                [j.seq] + [q.seq for q in queued.values() if (q.tenant, q.priority) == (j.tenant, j.priority)]
            )
            assert lease.fence > self.last_fence
            self.last_fence = lease.fence
            assert lease.job.attempts == j.attempts + 1
            assert (lease.job.status, lease.job.worker) == (R, worker)
            j.status, j.attempts, j.fence = R, j.attempts + 1, lease.fence
            self.leases.append(lease)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        got = self.run(self.broker.renew("m", [(lease.id, lease.fence)]))
        j = self.jobs[lease.id]
        want = (
            (RenewResult.CANCEL_REQUESTED if j.cancel else RenewResult.OK) if self.valid(lease) else RenewResult.STALE
        )
        assert got == {lease.id: want}

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        got = self.run(self.broker.append_many([Delta(lease.id, lease.fence, "t", [1])]))
        assert got == {lease.id: self.valid(lease)}

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), status=st.sampled_from([JobStatus.SUCCEEDED, JobStatus.CANCELLED]))
    def complete(self, data: st.DataObject, status: JobStatus) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        if not self.valid(lease):
            with pytest.raises(StaleLease):
                self.run(self.broker.complete(lease, "stop", status=status))
            return
        self.run(self.broker.complete(lease, "stop", status=status))
        j = self.jobs[lease.id]
        j.status, j.fence = status, None

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), retry=st.booleans())
    def fail(self, data: st.DataObject, retry: bool) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        if not self.valid(lease):
            with pytest.raises(StaleLease):
                self.run(self.broker.fail(lease, JobErrorCode.WORKER_ERROR, "boom", retry=retry))
            return
        outcome = self.run(self.broker.fail(lease, JobErrorCode.WORKER_ERROR, "boom", retry=retry))
        assert outcome == self.settle(self.jobs[lease.id], retry)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), who=st.sampled_from(["owner", "other", "admin"]))
    def cancel(self, data: st.DataObject, who: str) -> None:
        j = self.jobs[data.draw(st.sampled_from(list(self.jobs)))]
        tenant = {"owner": j.tenant, "other": "zz", "admin": None}[who]
        if who == "other":
            with pytest.raises(NotFound):
                self.run(self.broker.cancel(j.id, tenant))
        elif j.status in TERMINAL:
            with pytest.raises(AlreadyTerminal):
                self.run(self.broker.cancel(j.id, tenant))
        elif j.status == Q:
            assert self.run(self.broker.cancel(j.id, tenant)) == JobStatus.CANCELLED
            j.status = JobStatus.CANCELLED
        else:
            assert self.run(self.broker.cancel(j.id, tenant)) == R
            j.cancel = True

    @rule(data=st.data())
    def expire_and_reap(self, data: st.DataObject) -> None:
        running = self.in_status(R)
        if not running:
            assert self.run(self.broker.reap("m")) == []
            return
        j = self.jobs[data.draw(st.sampled_from(running))]
        # scaffolding: the lease's expiry moves into the past instead of waiting for it
        leases_key = self.broker._keys.leases("m")
        assert self.run(self.broker._redis.zadd(leases_key, {j.id: 0}, xx=True, ch=True)) == 1
        got = self.run(self.broker.reap("m"))
        assert got == [(j.id, self.settle(j, retry=True))]

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def agrees_with_model(self) -> None:
        ids = sorted(self.jobs)

        async def read():
            pipe = self.broker._redis.pipeline(transaction=False)
            for jid in ids:
                pipe.hmget(self.broker._keys.job(jid), "status", "attempts", "fence", "cancel")
            pipe.zrange(self.broker._keys.leases("m"), 0, -1)
            pipe.zrange(self.broker._keys.queued("m"), 0, -1)
            pipe.hget(self.broker._keys.global_, "queued")
            for t in TENANTS:
                pipe.hget(self.broker._keys.tenant_state(t), "q")
            return await pipe.execute(), await self.broker.queue_stats("m")

        replies, stats = self.run(read())
        rows, (leased, queued, global_q), tenant_q = replies[: len(ids)], replies[len(ids) : len(ids) + 3], replies[-3:]
        for jid, (status, attempts, fence, cancel) in zip(ids, rows, strict=True):
            j = self.jobs[jid]
            assert status is not None, f"job {jid} lost"
            status = JobStatus(status)
            assert status == j.status, (jid, status, j)
            assert status in FORWARD[self.seen.get(jid, Q)]
            self.seen[jid] = status
            assert int(attempts or 0) == j.attempts  # a job never claimed has no attempts field: 0
            if status == R:
                assert int(fence) == j.fence
                assert (cancel == "1") == j.cancel
                # exactly one lease ever handed out is still valid for a running job
                assert sum(1 for x in self.leases if x.id == jid and x.fence == int(fence)) == 1
        assert sorted(leased) == sorted(self.in_status(R))
        assert sorted(queued) == sorted(self.in_status(Q))
        assert int(global_q or 0) == len(queued) == stats.total_depth
        assert stats.running == len(leased)
        for p, d in stats.depth.items():
            assert d == sum(1 for j in self.jobs.values() if j.status == Q and j.priority == p)
        for t, q in zip(TENANTS, tenant_q, strict=True):
            assert int(q or 0) == sum(1 for j in self.jobs.values() if j.status == Q and j.tenant == t)


BrokerMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBrokerStateMachine = BrokerMachine.TestCase
