"""The broker: one typed ``async`` method per atomic transition, plus introspection.

Everything a worker or the API does to Redis goes through here. Lua replies are
mapped to exceptions through :class:`broker.errors.Code` in one place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from broker import errors
from broker.errors import Code
from broker.keys import PRIORITIES, Keys
from broker.models import Admission, Job, JobSpec, JobStatus, Lease, QueueStats, TenantLimits, new_job_id
from broker.scripts import Scripts
from broker.settings import BrokerSettings

log = structlog.get_logger(__name__)


def now_ms() -> int:
    """The one wall clock on the Python side (Lua uses Redis ``TIME``)."""
    return time.time_ns() // 1_000_000


def connect_redis(url: str, **kw: Any) -> Redis:
    """A pooled asyncio client that rides out short Redis restarts."""
    return Redis.from_url(
        url,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=20),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=10,
        **kw,
    )


@dataclass(slots=True)
class Delta:
    """Output to append to a running job (one flush of a worker)."""

    job_id: str
    fence: int
    text: str
    token_ids: Sequence[int]
    # Completion tokens of the job already written before this delta; makes a replayed
    # write (pipeline retried after a lost reply) a no-op. -1 = unchecked.
    offset: int = -1


class Broker:
    def __init__(self, redis: Redis, settings: BrokerSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.queue)
        self.scripts = Scripts.register(redis)

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> Broker:
        return cls(connect_redis(settings.redis_url), settings)

    async def close(self) -> None:
        await self.redis.aclose()

    async def drop_namespace(self) -> int:
        """Delete every key of this queue namespace (benchmarks and tests; never FLUSH)."""
        keys = [k async for k in self.redis.scan_iter(match=f"{self.keys.prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await self.redis.unlink(*keys[i : i + 500])
        return len(keys)

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- models, tenants, workers ---------------------------------------
    async def register_model(
        self, model: str, max_model_len: int = 0, *, only_if_absent: bool = False, **info: Any
    ) -> None:
        """Make a model admissible. ``info`` may carry e.g. ``tokenizer`` (a local folder).

        ``only_if_absent`` never overwrites a record (a worker's knows max_model_len).
        """
        record = json.dumps({"max_model_len": max_model_len, **info})
        if only_if_absent:
            await self.redis.hsetnx(self.keys.models, model, record)
        else:
            await self.redis.hset(self.keys.models, model, record)

    async def models(self) -> dict[str, dict]:
        raw = await self.redis.hgetall(self.keys.models)
        return {m: json.loads(v) for m, v in raw.items()}

    async def set_tenant(self, tenant: str, limits: TenantLimits) -> None:
        data = limits.model_dump()
        data["priorities"] = "".join(str(p) for p in sorted(set(limits.priorities)))
        key = self.keys.tenant(tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key).hset(key, mapping=data)
            await pipe.execute()

    async def get_tenant(self, tenant: str) -> TenantLimits | None:
        raw = await self.redis.hgetall(self.keys.tenant(tenant))
        if not raw:
            return None
        raw["priorities"] = [int(c) for c in raw.get("priorities", "")]
        return TenantLimits.model_validate(raw)

    async def heartbeat(self, worker_id: str, record: dict[str, Any]) -> None:
        record = {**record, "id": worker_id, "seen_ms": now_ms()}
        await self.redis.hset(self.keys.workers, worker_id, json.dumps(record))

    async def deregister(self, worker_id: str) -> None:
        await self.redis.hdel(self.keys.workers, worker_id)

    async def workers(self, max_age_ms: int = 15_000) -> list[dict[str, Any]]:
        raw = await self.redis.hgetall(self.keys.workers)
        cutoff, alive, dead = now_ms() - max_age_ms, [], []
        for wid, rec in raw.items():
            r = json.loads(rec)
            if r.get("seen_ms", 0) >= cutoff:
                alive.append(r)
            else:
                dead.append(wid)
        if dead:
            await self.redis.hdel(self.keys.workers, *dead)
        return alive

    # -- API keys (stored only as hashes) ---------------------------------
    async def put_api_key(self, key_hash: str, record: dict[str, Any]) -> None:
        await self.redis.hset(self.keys.api_keys, key_hash, json.dumps(record))

    async def get_api_key(self, key_hash: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self.keys.api_keys, key_hash)
        return json.loads(raw) if raw else None

    async def api_keys(self) -> dict[str, dict[str, Any]]:
        return {h: json.loads(v) for h, v in (await self.redis.hgetall(self.keys.api_keys)).items()}

    async def delete_api_key(self, key_hash: str) -> bool:
        return bool(await self.redis.hdel(self.keys.api_keys, key_hash))

    # -- admission ------------------------------------------------------
    def _admit_args(self, spec: JobSpec, job_id: str) -> tuple[list[str], list[Any]]:
        s, k = self.settings, self.keys
        if spec.max_tokens > s.max_tokens_limit:
            raise errors.InvalidRequest(
                f"max_tokens must be at most {s.max_tokens_limit}, got {spec.max_tokens}", param="max_tokens"
            )
        request = spec.request_json()
        if len(request) > s.max_payload_bytes:
            raise errors.InvalidRequest(
                f"request is {len(request)} bytes; the limit is {s.max_payload_bytes}", param="messages"
            )
        keys = [
            k.job(job_id),
            k.idem(spec.tenant, spec.idempotency_key),
            k.tenant(spec.tenant),
            k.tenant_state(spec.tenant),
            k.tenant_jobs(spec.tenant),
            k.models,
            k.global_,
            k.stats(spec.model),
        ]
        args = [
            k.prefix,
            job_id,
            spec.tenant,
            spec.model,
            spec.priority,
            spec.prompt_tokens,
            spec.max_tokens,
            1 if spec.idempotency_key else 0,
            request,
            s.result_ttl_ms,
            s.max_queued_global,
            s.default_rpm,
            s.default_rpm_burst,
            s.default_tpm,
            s.default_tpm_burst,
            s.default_max_queued,
            s.default_weight,
            spec.deadline_ms or 0,
            s.max_attempts,
            s.events_maxlen,
        ]
        return keys, args

    @staticmethod
    def _admission(spec: JobSpec, reply: list[Any]) -> Admission:
        code = Code(int(reply[0]))
        limits = dict(
            zip(
                ("rq_limit", "rq_remaining", "rq_reset_ms", "tk_limit", "tk_remaining", "tk_reset_ms"),
                (int(x) for x in reply[3:9]),
                strict=True,
            )
        )
        if code in (Code.OK, Code.DUPLICATE):
            return Admission(reply[1], code is Code.DUPLICATE, int(reply[2]), limits)
        if code in errors.REFUSALS:
            cls, reason, msg = errors.REFUSALS[code]
            raise cls(reason, msg, int(reply[9]), limits)
        if code is Code.UNKNOWN_MODEL:
            raise errors.UnknownModel(f"The model `{spec.model}` does not exist.", param="model")
        if code is Code.CONTEXT_TOO_LONG:
            raise errors.ContextTooLong(
                f"This model's maximum context length is {reply[2]} tokens. However, you requested "
                f"{spec.prompt_tokens + spec.max_tokens} tokens ({spec.prompt_tokens} in the messages, "
                f"{spec.max_tokens} in the completion).",
                param="messages",
            )
        if code is Code.TOO_LARGE_FOR_LIMIT:
            raise errors.InvalidRequest(
                f"Request needs {spec.prompt_tokens + spec.max_tokens} tokens, more than this tenant's "
                f"token burst of {reply[2]}.",
                param="max_tokens",
            )
        if code is Code.PRIORITY_NOT_ALLOWED:
            raise errors.InvalidRequest(f"priority {spec.priority} is not allowed for this key", param="priority")
        raise errors.BrokerError(f"unexpected admit reply {reply!r}")

    async def admit(self, spec: JobSpec) -> Admission:
        job_id = new_job_id()
        keys, args = self._admit_args(spec, job_id)
        return self._admission(spec, await self.scripts.admit(keys, args))

    async def admit_many(self, specs: Sequence[JobSpec]) -> list[Admission | errors.BrokerError]:
        """Admit many jobs in one pipeline; each result is an Admission or the error for that job."""
        results: list[Admission | errors.BrokerError | None] = [None] * len(specs)
        pipe = self.redis.pipeline(transaction=False)
        sent: list[int] = []
        for i, spec in enumerate(specs):
            try:
                keys, args = self._admit_args(spec, new_job_id())
            except errors.BrokerError as e:
                results[i] = e
                continue
            await self.scripts.admit(keys, args, client=pipe)
            sent.append(i)
        replies = await pipe.execute() if sent else []
        for i, reply in zip(sent, replies, strict=True):
            try:
                results[i] = self._admission(specs[i], reply)
            except errors.BrokerError as e:
                results[i] = e
        return results  # type: ignore[return-value]

    # -- worker side ----------------------------------------------------
    async def claim(self, model: str, worker_id: str, max_jobs: int, max_tokens: int = 1 << 40) -> list[Lease]:
        if max_jobs <= 0:
            return []
        s, k = self.settings, self.keys
        reply = await self.scripts.claim(
            [k.stats(model), k.leases(model), k.global_],
            [k.prefix, model, max_jobs, max_tokens, s.lease_ms, worker_id, s.result_ttl_ms, s.events_maxlen],
        )
        leases = []
        for rec in reply:
            h = dict(zip(rec[2::2], rec[3::2], strict=True))
            leases.append(Lease(Job.from_hash(h), int(rec[1])))
        return leases

    async def wait_for_work(self, model: str, timeout_s: float) -> bool:
        """Block until a job may be claimable (or timeout). No polling: BLPOP on the wake list."""
        return await self.redis.blpop([self.keys.wake(model)], timeout=timeout_s) is not None

    async def renew(self, model: str, leases: Iterable[tuple[str, int]]) -> dict[str, Code]:
        pairs = list(leases)
        if not pairs:
            return {}
        args: list[Any] = [self.keys.prefix, self.settings.lease_ms]
        for jid, fence in pairs:
            args += [jid, fence]
        reply = await self.scripts.renew([self.keys.leases(model)], args)
        return {jid: Code(int(c)) for (jid, _), c in zip(pairs, reply, strict=True)}

    async def append_many(self, deltas: Sequence[Delta]) -> dict[str, bool]:
        """Write one flush of deltas for many jobs in one pipeline; False = stale lease."""
        if not deltas:
            return {}
        k, s = self.keys, self.settings
        pipe = self.redis.pipeline(transaction=False)
        for d in deltas:
            await self.scripts.append(
                [k.job(d.job_id), k.events(d.job_id), k.output(d.job_id), k.output_ids(d.job_id)],
                [
                    d.fence,
                    d.text,
                    ",".join(map(str, d.token_ids)),
                    len(d.token_ids),
                    s.events_maxlen,
                    k.channel(d.job_id),
                    d.offset,
                ],
                client=pipe,
            )
        replies = await pipe.execute()
        ok: dict[str, bool] = {}
        for d, r in zip(deltas, replies, strict=True):  # a job may have several deltas in one flush
            ok[d.job_id] = ok.get(d.job_id, True) and int(r[0]) == Code.OK
        return ok

    async def complete(
        self,
        lease: Lease,
        finish_reason: str,
        text: str = "",
        token_ids: Sequence[int] = (),
        status: JobStatus = JobStatus.SUCCEEDED,
        *,
        offset: int = -1,
        prompt_tokens: int = 0,
    ) -> None:
        """Finish a running job (succeeded, or cancelled once aborted). Raises StaleLease.

        ``offset`` dedupes a replayed last delta (see Delta); ``prompt_tokens`` replaces the
        admission-time count with the engine's exact one.
        """
        reply = await self.scripts.complete(
            *self._complete_args(lease, finish_reason, text, token_ids, status, offset, prompt_tokens)
        )
        if int(reply[0]) == Code.STALE_LEASE:
            raise errors.StaleLease(f"lease on {lease.id} (fence {lease.fence}) is no longer held")

    async def complete_many(
        self, leases: Sequence[Lease], finish_reason: str, status: JobStatus = JobStatus.SUCCEEDED
    ) -> dict[str, bool]:
        """Finish many running jobs (no further output) in one pipeline; False = stale lease, nothing written."""
        if not leases:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for lease in leases:
            await self.scripts.complete(*self._complete_args(lease, finish_reason, "", (), status), client=pipe)
        replies = await pipe.execute()
        return {lease.id: int(r[0]) == Code.OK for lease, r in zip(leases, replies, strict=True)}

    def _complete_args(
        self,
        lease: Lease,
        finish_reason: str,
        text: str,
        token_ids: Sequence[int],
        status: JobStatus,
        offset: int = -1,
        prompt_tokens: int = 0,
    ) -> tuple[list[str], list[Any]]:
        job, k, s = lease.job, self.keys, self.settings
        return (
            [
                k.job(job.id),
                k.events(job.id),
                k.leases(job.model),
                k.stats(job.model),
                k.tenant_state(job.tenant),
                k.output(job.id),
                k.output_ids(job.id),
            ],
            [
                lease.fence,
                text,
                ",".join(map(str, token_ids)),
                len(token_ids),
                finish_reason,
                status.value,
                s.result_ttl_ms,
                s.events_maxlen,
                k.channel(job.id),
                k.prefix,
                job.id,
                offset,
                prompt_tokens,
            ],
        )

    async def fail(self, lease: Lease, code: str, message: str, *, retry: bool, handback: bool = False) -> str:
        """Fail a running job; with ``retry`` it goes back to the queue while attempts remain.

        Returns the outcome: ``queued``, ``failed`` or ``cancelled``. Raises StaleLease.
        """
        k, s, jid = self.keys, self.settings, lease.job.id
        reply = await self.scripts.fail(
            [k.job(jid), k.events(jid)],
            [
                lease.fence,
                k.prefix,
                jid,
                code,
                message,
                (2 if handback else 1) if retry else 0,
                s.result_ttl_ms,
                s.events_maxlen,
            ],
        )
        if int(reply[0]) == Code.STALE_LEASE:
            raise errors.StaleLease(f"lease on {jid} (fence {lease.fence}) is no longer held")
        return reply[1]

    async def reap(self, model: str, limit: int = 100) -> list[tuple[str, str]]:
        """Requeue (or fail) jobs whose lease expired. Safe to call from anywhere, any time."""
        k, s = self.keys, self.settings
        reply = await self.scripts.reap([k.leases(model)], [k.prefix, limit, s.result_ttl_ms, s.events_maxlen])
        for jid, outcome in reply:
            log.warning("lease expired", job_id=jid, outcome=outcome)
        return [(jid, outcome) for jid, outcome in reply]

    # -- client side ----------------------------------------------------
    async def cancel(self, job_id: str, tenant: str | None = None) -> JobStatus:
        """Cancel a job. Returns ``cancelled`` (done now) or ``running`` (its worker will abort it).

        Raises NotFound (also for another tenant's job) and AlreadyTerminal.
        """
        k, s = self.keys, self.settings
        code, status = await self.scripts.cancel(
            [k.job(job_id)], [k.prefix, job_id, tenant or "", s.result_ttl_ms, s.events_maxlen]
        )
        if int(code) == Code.NOT_FOUND:
            raise errors.NotFound(f"No job found with id '{job_id}'.", param="job_id")
        if int(code) == Code.ALREADY_TERMINAL:
            raise errors.AlreadyTerminal(f"Job '{job_id}' is already {status}.")
        return JobStatus(status)

    async def _load(self, job_ids: Sequence[str]) -> list[dict[str, str]]:
        pipe = self.redis.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hgetall(self.keys.job(jid)).get(self.keys.output(jid)).get(self.keys.output_ids(jid))
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
            raise errors.NotFound(f"No job found with id '{job_id}'.", param="job_id")
        return Job.from_hash(found[0])

    async def list_jobs(self, tenant: str, status: JobStatus | None = None, limit: int = 100) -> list[Job]:
        ids = await self.redis.zrevrange(self.keys.tenant_jobs(tenant), 0, max(limit * 4, 400) - 1)
        jobs = [Job.from_hash(h) for h in await self._load(ids)]
        return [j for j in jobs if status is None or j.status == status][:limit]

    async def followers(self, job_id: str) -> int:
        """API processes following the job's live events now (each process subscribes once)."""
        reply = await self.redis.pubsub_numsub(self.keys.channel(job_id))
        return int(reply[0][1]) if reply else 0

    async def position(self, job: Job) -> tuple[int | None, float | None]:
        """Jobs ahead in strict priority + FIFO order (fairness may reorder it), and an ETA in seconds."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrank(self.keys.queued(job.model), job.id)
        pipe.hmget(self.keys.stats(job.model), "dr", "w_start", "w_jobs")
        rank, stats = await pipe.execute()
        if rank is None:
            return None, None
        rate = _drain_rate(stats, now_ms())
        return rank, (rank + 1) / rate if rate > 0 else None

    async def queue_stats(self, model: str) -> QueueStats:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.stats(model))
        pipe.zcard(self.keys.leases(model))
        for p in PRIORITIES:
            pipe.zrangebyscore(
                self.keys.queued(model), p * 10**13, (p + 1) * 10**13 - 1, start=0, num=1, withscores=True
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
