"""The broker's reads of jobs: one job, a tenant's pages, logprobs, followers, a queue's place and stats.

Reads only (no scripts); a part of :class:`broker.client.Broker` (its methods are the broker's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broker import errors
from broker.connection import RedisClient
from broker.contract import EventType, TokenLogprob
from broker.fleet import now_ms
from broker.keys import PRIORITIES, Keys
from broker.models import Job, JobStatus, QueuePlace, QueueStats
from broker.replies import typed_reply
from broker.settings import BrokerSettings

LIST_CHUNK = 500  # index entries read per round trip when listing jobs
LIST_SCAN_BUDGET = 20_000  # index entries one listing call reads at most


@dataclass(slots=True)
class JobPage:
    jobs: list[Job]
    has_more: bool
    next_after: str | None  # pass as ``after`` to continue; None at the end


class JobReads:
    max_tenants = 64  # backlogged tenants read to estimate a queue position
    _redis: RedisClient
    _keys: Keys
    settings: BrokerSettings

    async def _load(self, job_ids: Sequence[str]) -> list[dict[str, str]]:
        pipe = self._redis.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hgetall(self._keys.job(jid))
            pipe.get(self._keys.output(jid))
            pipe.get(self._keys.output_ids(jid))
        raw = await pipe.execute()
        out = []
        for i in range(0, len(raw), 3):
            h, text, ids = raw[i : i + 3]
            if h:
                out.append({**h, "output": text or "", "output_ids": ids or ""})
        return out

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        found = await self._load([job_id])
        if not found or (tenant is not None and found[0].get("tenant") != tenant):
            raise errors.NotFound(job_id)
        return Job.from_hash(found[0])

    async def list_jobs(self, tenant: str, status: JobStatus | None = None, limit: int = 100) -> list[Job]:
        return (await self.job_page(tenant, status, limit)).jobs

    async def job_page(
        self, tenant: str, status: JobStatus | None = None, limit: int = 100, after: str | None = None
    ) -> JobPage:
        """The tenant's jobs newest first, at most ``limit``, older than the job ``after`` (a cursor).

        Walks the tenant's index (``tjobs``, by creation time) in chunks, reading only each
        job's status, until ``limit`` jobs match or ``LIST_SCAN_BUDGET`` entries were read,
        so a status filter is exact at any backlog size and one call's Redis work is bounded.
        ``next_after`` continues the walk (it may name a job not in the page: the last one
        read). Raises NotFound when ``after`` is not (or no longer) in the index.
        """
        index = self._keys.tenant_jobs(tenant)
        cursor: tuple[float, str] | None = None
        if after is not None:
            score = await self._redis.zscore(index, after)
            if score is None:
                raise errors.NotFound(after)
            cursor = (score, after)
        matched: list[str] = []
        read = 0
        while len(matched) < limit and read < LIST_SCAN_BUDGET:
            chunk = await self._index_after(index, cursor, LIST_CHUNK)
            if not chunk:
                return JobPage([Job.from_hash(h) for h in await self._load(matched)], False, None)
            pipe = self._redis.pipeline(transaction=False)
            for jid, _ in chunk:
                pipe.hget(self._keys.job(jid), "status")
            for (jid, score), st in zip(chunk, await pipe.execute(), strict=True):
                read += 1
                cursor = (score, jid)
                if st is not None and (status is None or st == status.value):
                    matched.append(jid)
                    if len(matched) == limit:
                        break
        more = bool(await self._index_after(index, cursor, 1))
        jobs = [Job.from_hash(h) for h in await self._load(matched)]
        return JobPage(jobs, more, cursor[1] if more and cursor else None)

    async def _index_after(self, index: str, cursor: tuple[float, str] | None, n: int) -> list[tuple[str, float]]:
        """Up to ``n`` entries of a time index after ``cursor`` in ZREVRANGE order (score
        descending, then member descending). By score, not rank, so jobs admitted meanwhile
        (newer, at the top) shift nothing; entries sharing the cursor's millisecond are skipped
        up to and including the cursor itself."""
        if cursor is None:
            first: list[tuple[str, float]] = await typed_reply(
                self._redis.zrevrangebyscore(index, "+inf", "-inf", start=0, num=n, withscores=True)
            )
            return first
        score, member = cursor
        want = n
        while True:
            got: list[tuple[str, float]] = await typed_reply(
                self._redis.zrevrangebyscore(index, score, "-inf", start=0, num=want, withscores=True)
            )
            rest = [(m, sc) for m, sc in got if sc < score or m < member]
            if rest or len(got) < want:
                return rest[:n]
            want *= 2  # every entry read shares the cursor's millisecond and sorts before it

    async def remember_retry_key(self, tenant: str, digest: str, idempotency_key: str, ttl_ms: int) -> None:
        """Note the idempotency key a request's first attempt was admitted with, by the request's
        digest, so the client's automatic retry (same request, a retry counter) finds that job."""
        await self._redis.set(self._keys.retry_hint(tenant, digest), idempotency_key, px=ttl_ms)

    async def recall_retry_key(self, tenant: str, digest: str) -> str | None:
        key: str | None = await self._redis.get(self._keys.retry_hint(tenant, digest))
        return key

    async def logprobs(self, job_id: str) -> list[TokenLogprob]:
        """The job's output logprobs so far, in token order (none unless it asked for them).

        Its token events carry them (see contract.TokenLogprob), so nothing stores them twice;
        this reads the event stream, so call it only for a job that asked.
        """
        out: list[TokenLogprob] = []
        start, page = "-", 1000
        while True:
            entries = await self._redis.xrange(self._keys.events(job_id), min=start, max="+", count=page)
            for _, f in entries:
                if f.get("t") == EventType.TOKEN:
                    out.extend(TokenLogprob.from_wire(t) for t in json.loads(f["d"]).get("logprobs") or ())
            if len(entries) < page:
                return out
            start = f"({entries[-1][0]}"

    async def followers(self, job_id: str) -> int:
        """API processes following the job's live events now (each process subscribes once)."""
        reply = await self._redis.pubsub_numsub(self._keys.channel(job_id))
        return int(reply[0][1]) if reply else 0

    async def position(self, job: Job) -> QueuePlace | None:
        """Where a queued job stands (None once it left the queue): exact bounds and a fair-share estimate.

        Strict priority is exact: every job queued at a higher priority runs first. Inside the
        job's priority its own tenant's earlier jobs run first (FIFO); other tenants are served
        by lowest virtual token counter (VTC), so the estimate counts, for each other backlogged
        tenant, the jobs it gets before this tenant's counter reaches this job's turn, at the
        priority's mean cost. Two pipelined round trips; at most ``max_tenants`` tenants read.
        """
        k, prio = self._keys, job.priority
        fields = [f"d{p}" for p in PRIORITIES] + [f"k{prio}", "dr", "w_start", "w_jobs"]
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrank(k.queued(job.model), job.id)
        pipe.hmget(k.stats(job.model), fields)
        pipe.zrank(k.tenant_queue(job.model, prio, job.tenant), job.id)
        pipe.zrange(k.tenants(job.model, prio), 0, self.max_tenants - 1, withscores=True)
        fifo, stats, own_ahead, counters = await pipe.execute()
        if fifo is None or own_ahead is None:
            return None
        depth = [int(d or 0) for d in stats[:10]]
        higher = sum(depth[:prio])
        others = [(t, float(v)) for t, v in counters if t != job.tenant]
        depths: list[Any] = []
        weights: list[float] = []
        if others:  # alone at its priority, no other tenant's turn to count: no second round trip
            pipe = self._redis.pipeline(transaction=False)
            for t, _ in others:
                pipe.zcard(k.tenant_queue(job.model, prio, t))
            for t in (job.tenant, *(t for t, _ in others)):
                pipe.hget(k.tenant(t), "weight")
            replies = await pipe.execute()
            depths = replies[: len(others)]
            weights = [float(w or self.settings.default_weight) for w in replies[len(others) :]]
        mine = dict(counters).get(job.tenant)
        cost = max(1.0, int(stats[10] or 0) / depth[prio]) if depth[prio] else 1.0
        estimate = higher + own_ahead
        if mine is not None and others:
            turn = float(mine) + own_ahead * cost / weights[0]  # this tenant's counter when the job is next
            for (t, v), d, w in zip(others, depths, weights[1:], strict=True):
                served = (turn - v) * w / cost  # jobs of t served while its counter is below the turn
                n = math.ceil(served) if served > 0 else 0
                if t < job.tenant and served >= 0 and served == int(served):
                    n += 1  # a tie goes to the lower name (ZRANGE order)
                estimate += min(int(d), n)
        ahead_min, ahead_max = higher + own_ahead, higher + depth[prio] - 1
        estimate = min(max(estimate, ahead_min), max(ahead_max, ahead_min))
        return QueuePlace(fifo, estimate, ahead_min, max(ahead_max, ahead_min), _drain_rate(stats[11:], now_ms()))

    async def queue_stats(self, model: str) -> QueueStats:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._keys.stats(model))
        pipe.zcard(self._keys.leases(model))
        for p in PRIORITIES:
            pipe.zrangebyscore(
                self._keys.queued(model), p * 10**13, (p + 1) * 10**13 - 1, start=0, num=1, withscores=True
            )
        stats, running, *oldest = await pipe.execute()
        now = now_ms()
        first = [int(o[0][1]) % 10**13 for o in oldest if o]
        rate = _drain_rate([stats.get("dr"), stats.get("w_start"), stats.get("w_jobs")], now)
        return QueueStats(
            model=model,
            depth={p: int(stats.get(f"d{p}", 0)) for p in PRIORITIES},
            queued_tokens={p: int(stats.get(f"k{p}", 0)) for p in PRIORITIES},
            running=running,
            oldest_wait_ms=max(0, now - min(first)) if first else 0,
            drain_jobs_per_s=rate,
            drain_tokens_per_s=float(stats.get("dt") or 0.0),
        )


def _drain_rate(stats: Sequence[str | None], now: int) -> float:
    dr, w_start, w_jobs = stats
    if dr:
        return float(dr)
    if w_start and now > int(w_start):
        return int(w_jobs or 0) * 1000 / max(1000, now - int(w_start))
    return 0.0
