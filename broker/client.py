"""The broker: one typed ``async`` method per atomic transition, plus introspection.

Everything a worker or the API does to Redis goes through here; the Redis client and
the key map are private. Lua replies are mapped to exceptions and typed results through
:class:`broker.errors.Code` in one place, and redis-py's connection and timeout errors
become :class:`broker.errors.Unavailable` at this boundary.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import NoScriptError

from broker import errors
from broker.batches import BatchStore
from broker.connection import RedisClient, connect_redis, wait_replicas
from broker.contract import LOWEST_PRIORITY, EventType, FailOutcome, JobErrorCode, RenewResult, TokenLogprob
from broker.errors import Code, translated
from broker.events import ControlListener, EventHub
from broker.keys import PRIORITIES, Keys
from broker.models import (
    Admission,
    Job,
    JobSpec,
    JobStatus,
    Lease,
    QueuePlace,
    QueueStats,
    TenantLimits,
    new_job_id,
)
from broker.redis_check import check_redis
from broker.replies import typed_reply
from broker.scripts import Scripts
from broker.settings import BrokerSettings
from broker.usage import UsageReader
from broker.webhooks import WebhookStore

log = structlog.get_logger(__name__)


def now_ms() -> int:
    """The one wall clock on the Python side (Lua uses Redis ``TIME``)."""
    return time.time_ns() // 1_000_000


def _fingerprint(spec: JobSpec) -> str:
    return hashlib.sha256(spec.fingerprint_source().encode()).hexdigest()[:32]


LIST_CHUNK = 500  # index entries read per round trip when listing jobs
LIST_SCAN_BUDGET = 20_000  # index entries one listing call reads at most


@dataclass(slots=True)
class JobPage:
    jobs: list[Job]
    has_more: bool
    next_after: str | None  # pass as ``after`` to continue; None at the end


@dataclass(slots=True)
class Completion:
    """A running job to finish, with its last delta (see ``Broker.complete``)."""

    lease: Lease
    finish_reason: str
    text: str = ""
    token_ids: Sequence[int] = ()
    status: JobStatus = JobStatus.SUCCEEDED
    offset: int = -1  # as in OutputWrite
    prompt_tokens: int = 0  # the engine's count (0 = keep the admission-time one)
    logprobs: str = ""  # as in OutputWrite


@dataclass(slots=True)
class OutputWrite:
    """Output to append to a running job (one flush of a worker)."""

    job_id: str
    fence: int
    text: str
    token_ids: Sequence[int]
    # Completion tokens of the job already written before this delta; makes a replayed
    # write (pipeline retried after a lost reply) a no-op. -1 = unchecked.
    offset: int = -1
    # The tokens' logprobs, when the job asked for them: contract.logprobs_fragment of them.
    logprobs: str = ""


APPEND_CHUNK = 128  # writes per append call: one flush of a full worker, a bounded time inside Redis


class Broker:
    max_tenants = 64  # backlogged tenants read to estimate a queue position

    def __init__(self, redis: RedisClient, settings: BrokerSettings) -> None:
        self._redis = redis
        self.settings = settings
        self._keys = Keys(settings.queue)
        self._scripts = Scripts.register(redis, self._keys.slot_guard)

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> Broker:
        return cls(connect_redis(settings.redis_url), settings)

    async def close(self) -> None:
        await self._redis.aclose()

    async def drop_namespace(self) -> int:
        """Delete every key of this queue namespace (benchmarks and tests; never FLUSH)."""
        keys = [k async for k in self._redis.scan_iter(match=f"{self._keys.prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await self._redis.unlink(*keys[i : i + 500])
        return len(keys)

    async def ping(self) -> None:
        """Raises :class:`errors.Unavailable` unless Redis answers."""
        await self._redis.ping()

    async def _run(self, pipe: Any) -> list[Any]:
        """Execute a pipeline of script calls. redis-py loads a pipeline's scripts before sending
        it, but a pipeline retried across a Redis restart finds them forgotten: load them again and
        send it once more (each script is replay-safe: admission by job id, writes by offset and
        fence). A cluster pipeline does the same itself (broker.connection)."""
        stack = list(getattr(pipe, "command_stack", ()))
        try:
            return list(await pipe.execute())
        except NoScriptError:
            if not stack:
                raise
            await self.load_scripts()
            pipe.command_stack = stack
            return list(await pipe.execute())

    async def load_scripts(self) -> None:
        """Make sure Redis holds every script (a restarted or failed-over Redis forgets them).

        Raises :class:`errors.Unavailable` unless Redis answers."""
        for script in self._scripts.all():
            if not (await self._redis.script_exists(script.sha))[0]:
                await self._redis.script_load(script.script)

    async def check_server(self) -> list[str]:
        """Durability problems of the Redis server (AOF, eviction, version); raises
        :class:`errors.RedisMisconfigured` for them in production."""
        return await check_redis(self._redis, self.settings)

    @functools.cached_property
    def batches(self) -> BatchStore:
        """Files and batches metadata and a batch's progress checkpoint (broker.batches)."""
        return BatchStore(self._redis, self._keys)

    @functools.cached_property
    def webhooks(self) -> WebhookStore:
        """Webhooks due, their delivery records and the tenants' signing secrets (broker.webhooks)."""
        return WebhookStore(self._redis, self._keys)

    @functools.cached_property
    def usage(self) -> UsageReader:
        """Tenants' requests, tokens, queued and running jobs against their limits (broker.usage)."""
        return UsageReader(self._redis, self._keys)

    def event_hub(self, resync_s: float = 5.0) -> EventHub:
        """The process's one pub/sub follower of job events (an async context manager)."""
        return EventHub(self._redis, self._keys, resync_s)

    def cancel_notices(self, model: str) -> ControlListener:
        """A worker's subscription to the cancel notices of its model (an async context manager)."""
        return ControlListener(self._redis, self._keys, model)

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- models, tenants, workers ---------------------------------------
    async def register_model(
        self, model: str, max_model_len: int = 0, *, tokenizer: str | None = None, only_if_absent: bool = False
    ) -> None:
        """Make a model admissible; ``tokenizer`` is a local folder the API may count tokens with.

        ``only_if_absent`` never overwrites a record (a worker's knows max_model_len).
        """
        info: dict[str, Any] = {"max_model_len": max_model_len}
        if tokenizer:
            info["tokenizer"] = tokenizer
        record = json.dumps(info)
        if only_if_absent:
            await typed_reply(self._redis.hsetnx(self._keys.models, model, record))
        else:
            await typed_reply(self._redis.hset(self._keys.models, model, record))

    async def models(self) -> dict[str, dict[str, Any]]:
        raw = await typed_reply(self._redis.hgetall(self._keys.models))
        return {m: json.loads(v) for m, v in raw.items()}

    async def set_tenant(self, tenant: str, limits: TenantLimits) -> None:
        data = limits.model_dump()
        data["priorities"] = "".join(str(p) for p in sorted(set(limits.priorities)))
        # Every field is written, so one HSET replaces the record atomically (no MULTI: a
        # cluster client has none).
        await typed_reply(self._redis.hset(self._keys.tenant(tenant), mapping=data))

    async def get_tenant(self, tenant: str) -> TenantLimits | None:
        raw = await typed_reply(self._redis.hgetall(self._keys.tenant(tenant)))
        if not raw:
            return None
        raw["priorities"] = [int(c) for c in raw.get("priorities", "")]
        return TenantLimits.model_validate(raw)

    async def heartbeat(self, worker_id: str, record: dict[str, Any]) -> None:
        record = {**record, "id": worker_id, "seen_ms": now_ms()}
        await typed_reply(self._redis.hset(self._keys.workers, worker_id, json.dumps(record)))

    async def deregister(self, worker_id: str) -> None:
        await typed_reply(self._redis.hdel(self._keys.workers, worker_id))

    async def workers(self, max_age_ms: int = 15_000) -> list[dict[str, Any]]:
        raw = await typed_reply(self._redis.hgetall(self._keys.workers))
        cutoff, alive, dead = now_ms() - max_age_ms, [], []
        for wid, rec in raw.items():
            r = json.loads(rec)
            if r.get("seen_ms", 0) >= cutoff:
                alive.append(r)
            else:
                dead.append(wid)
        if dead:
            await typed_reply(self._redis.hdel(self._keys.workers, *dead))
        return alive

    # -- API keys (stored only as hashes) ---------------------------------
    async def put_api_key(self, key_hash: str, record: dict[str, Any]) -> None:
        await typed_reply(self._redis.hset(self._keys.api_keys, key_hash, json.dumps(record)))

    async def get_api_key(self, key_hash: str) -> dict[str, Any] | None:
        raw = await typed_reply(self._redis.hget(self._keys.api_keys, key_hash))
        return json.loads(raw) if raw else None

    async def api_keys(self) -> dict[str, dict[str, Any]]:
        return {h: json.loads(v) for h, v in (await typed_reply(self._redis.hgetall(self._keys.api_keys))).items()}

    async def delete_api_key(self, key_hash: str) -> bool:
        return bool(await typed_reply(self._redis.hdel(self._keys.api_keys, key_hash)))

    # -- admission ------------------------------------------------------
    def _admit_args(self, spec: JobSpec, job_id: str, record: bool = False) -> tuple[list[str], list[Any]]:
        s, k = self.settings, self._keys
        if spec.max_tokens > s.max_tokens_limit:
            raise errors.LimitExceeded("max_tokens", spec.max_tokens, s.max_tokens_limit)
        request = spec.request_json()
        if len(request) > s.max_payload_bytes:
            raise errors.LimitExceeded("request_bytes", len(request), s.max_payload_bytes)
        ttl_ms = (spec.result_ttl_s or s.result_ttl_s) * 1000
        keys = [
            k.job(job_id),
            k.events(job_id),
            k.output(job_id),
            k.output_ids(job_id),
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
            ttl_ms,
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
            k.channel(job_id),
            _fingerprint(spec),
            "" if spec.webhook_url is None else spec.webhook_url or "-",
            1 if record else 0,
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
            job = None
            if len(reply) > 10:  # the record asked for: a new job has no output yet
                rec = reply[10]
                job = Job.from_hash({**dict(zip(rec[::2], rec[1::2], strict=True)), "output": "", "output_ids": ""})
            return Admission(reply[1], code is Code.DUPLICATE, int(reply[2]), limits, job)
        if code in errors.REFUSALS:
            cls, reason = errors.REFUSALS[code]
            raise cls(reason, int(reply[9]), limits)
        if code is Code.UNKNOWN_MODEL:
            raise errors.UnknownModel(spec.model)
        if code is Code.CONTEXT_TOO_LONG:
            raise errors.ContextTooLong(int(reply[2]), spec.prompt_tokens, spec.max_tokens)
        if code is Code.TOO_LARGE_FOR_LIMIT:
            raise errors.LimitExceeded("tokens", spec.prompt_tokens + spec.max_tokens, int(reply[2]))
        if code is Code.PRIORITY_NOT_ALLOWED:
            raise errors.PriorityNotAllowed(spec.priority)
        if code is Code.IDEMPOTENCY_CONFLICT:
            raise errors.IdempotencyConflict(spec.idempotency_key or "", reply[1])
        raise errors.BrokerError(f"unexpected admit reply {reply!r}")

    async def admit(self, spec: JobSpec, *, record: bool = False) -> Admission:
        """Admit one job (raises the refusal). ``record``: the Admission carries the job as
        admitted (``Admission.job``, read in the same call; not for a duplicate)."""
        job_id = new_job_id()
        keys, args = self._admit_args(spec, job_id, record)
        if not self.settings.redis_wait_replicas:
            return self._admission(spec, await self._scripts.admit(keys, args))
        pipe = self._redis.pipeline(transaction=False)  # WAIT must follow on the same connection
        await self._scripts.admit(keys, args, client=pipe)
        self._wait_replicas(pipe, keys[0])
        reply, acked = await self._run(pipe)
        self._check_replicas(acked)
        return self._admission(spec, reply)

    def _wait_replicas(self, pipe: Any, key: str) -> None:
        wait_replicas(self._redis, pipe, key, self.settings.redis_wait_replicas, self.settings.redis_wait_timeout_ms)

    def _check_replicas(self, acked: int) -> None:
        if int(acked) < self.settings.redis_wait_replicas:  # e.g. a failover under way
            raise errors.Unavailable(
                f"the write reached {acked} of {self.settings.redis_wait_replicas} Redis replicas "
                f"within {self.settings.redis_wait_timeout_ms} ms"
            )

    async def admit_many(self, specs: Sequence[JobSpec]) -> list[Admission | errors.BrokerError]:
        """Admit many jobs in one pipeline; each result is an Admission or the error for that job."""
        results: list[Admission | errors.BrokerError | None] = [None] * len(specs)
        pipe = self._redis.pipeline(transaction=False)
        sent: list[int] = []
        last_key = ""
        for i, spec in enumerate(specs):
            try:
                keys, args = self._admit_args(spec, new_job_id())
            except errors.BrokerError as e:
                results[i] = e
                continue
            await self._scripts.admit(keys, args, client=pipe)
            sent.append(i)
            last_key = keys[0]
        if sent and self.settings.redis_wait_replicas:
            self._wait_replicas(pipe, last_key)
        replies = await self._run(pipe) if sent else []
        if sent and self.settings.redis_wait_replicas:
            self._check_replicas(replies.pop())
        for i, reply in zip(sent, replies, strict=True):
            try:
                results[i] = self._admission(specs[i], reply)
            except errors.BrokerError as e:
                results[i] = e
        return [r for r in results if r is not None]

    # -- worker side ----------------------------------------------------
    async def claim(
        self,
        model: str,
        worker_id: str,
        max_jobs: int,
        max_tokens: int = 1 << 40,
        *,
        max_priority: int = LOWEST_PRIORITY,
    ) -> list[Lease]:
        """Lease up to ``max_jobs`` queued jobs (``max_tokens`` in all, the first one always) of
        priority ``max_priority`` or more urgent, in claim order (see claim.lua)."""
        if max_jobs <= 0 or max_priority < 0:
            return []
        s, k = self.settings, self._keys
        reply = await self._scripts.claim(
            [k.stats(model), k.leases(model), k.global_],
            [
                k.prefix,
                model,
                max_jobs,
                max_tokens,
                s.lease_ms,
                worker_id,
                s.events_maxlen,
                max_priority,
            ],
        )
        leases = []
        for rec in reply:
            h = dict(zip(rec[2::2], rec[3::2], strict=True))
            leases.append(Lease(Job.from_hash(h), int(rec[1])))
        return leases

    async def wait_for_work(self, model: str, timeout_s: float, *, urgent: bool = False) -> bool:
        """Block until a job may be claimable (or timeout). No polling: BLPOP on the wake list;
        ``urgent``: only for work more urgent than the lowest priority (what a full worker may
        claim to preempt its batch work)."""
        key = self._keys.wake_urgent(model) if urgent else self._keys.wake(model)
        # Redis >= 6 takes a fractional BLPOP timeout; redis-py 5 annotates it as int.
        woke = await typed_reply(self._redis.blpop([key], timeout=timeout_s))  # type: ignore[arg-type]
        return woke is not None

    async def renew(self, model: str, leases: Iterable[tuple[str, int]]) -> dict[str, RenewResult]:
        """Extend the leases (job id, fence) a worker holds; per job, what renewal found."""
        pairs = list(leases)
        if not pairs:
            return {}
        args: list[Any] = [self._keys.prefix, self.settings.lease_ms]
        for jid, fence in pairs:
            args += [jid, fence]
        reply = await self._scripts.renew([self._keys.leases(model)], args)
        return {jid: _RENEWED[Code(int(c))] for (jid, _), c in zip(pairs, reply, strict=True)}

    async def append_many(self, writes: Sequence[OutputWrite]) -> dict[str, bool]:
        """Write one flush of output for many jobs: one script call per ``APPEND_CHUNK`` writes,
        pipelined; False = stale lease (nothing written for that job)."""
        if not writes:
            return {}
        k, s = self._keys, self.settings
        pipe = self._redis.pipeline(transaction=False)
        chunks = [writes[i : i + APPEND_CHUNK] for i in range(0, len(writes), APPEND_CHUNK)]
        for chunk in chunks:
            keys: list[str] = []
            args: list[Any] = [s.events_maxlen]
            for d in chunk:
                keys += [k.job(d.job_id), k.events(d.job_id), k.output(d.job_id), k.output_ids(d.job_id)]
                args += [
                    d.fence,
                    d.text,
                    ",".join(map(str, d.token_ids)),
                    len(d.token_ids),
                    k.channel(d.job_id),
                    d.offset,
                    d.logprobs,
                ]
            await self._scripts.append(keys, args, client=pipe)
        replies = await self._run(pipe)
        ok: dict[str, bool] = {}
        for chunk, codes in zip(chunks, replies, strict=True):
            for d, c in zip(chunk, codes, strict=True):  # a job may have several writes in one flush
                ok[d.job_id] = ok.get(d.job_id, True) and int(c) == Code.OK
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
        logprobs: str = "",
    ) -> None:
        """Finish a running job (succeeded, or cancelled once aborted). Raises StaleLease.

        ``offset`` dedupes a replayed last write (see OutputWrite); ``prompt_tokens`` replaces the
        admission-time count with the engine's exact one; ``logprobs`` as in OutputWrite.
        """
        done = Completion(lease, finish_reason, text, token_ids, status, offset, prompt_tokens, logprobs)
        if not (await self.complete_batch([done]))[lease.id]:
            raise errors.StaleLease(lease.id, lease.fence)

    async def complete_many(
        self, leases: Sequence[Lease], finish_reason: str, status: JobStatus = JobStatus.SUCCEEDED
    ) -> dict[str, bool]:
        """Finish many running jobs (no further output); False = stale lease, nothing written."""
        return await self.complete_batch([Completion(lease, finish_reason, status=status) for lease in leases])

    async def complete_batch(self, items: Sequence[Completion]) -> dict[str, bool]:
        """Finish running jobs, each with its last delta: one script call per model and
        ``APPEND_CHUNK`` jobs, pipelined. False = stale lease, nothing written for that job."""
        if not items:
            return {}
        k, s = self._keys, self.settings
        chunks: list[list[Completion]] = []
        for model in dict.fromkeys(c.lease.job.model for c in items):
            mine = [c for c in items if c.lease.job.model == model]
            chunks += [mine[i : i + APPEND_CHUNK] for i in range(0, len(mine), APPEND_CHUNK)]
        pipe = self._redis.pipeline(transaction=False)
        for chunk in chunks:
            model = chunk[0].lease.job.model
            keys: list[str] = [k.leases(model), k.stats(model)]
            args: list[Any] = [s.events_maxlen]
            for c in chunk:
                job = c.lease.job
                keys += [k.job(job.id), k.events(job.id), k.output(job.id), k.output_ids(job.id)]
                keys.append(k.tenant_state(job.tenant))
                args += [
                    c.lease.fence,
                    c.text,
                    ",".join(map(str, c.token_ids)),
                    len(c.token_ids),
                    c.finish_reason,
                    c.status.value,
                    k.channel(job.id),
                    job.id,
                    c.offset,
                    c.prompt_tokens,
                    c.logprobs,
                ]
            await self._scripts.complete(keys, args, client=pipe)
        replies = await self._run(pipe)
        return {
            c.lease.id: int(code) == Code.OK
            for chunk, codes in zip(chunks, replies, strict=True)
            for c, code in zip(chunk, codes, strict=True)
        }

    async def fail(
        self, lease: Lease, code: JobErrorCode, message: str, *, retry: bool, handback: bool = False
    ) -> FailOutcome:
        """Fail a running job; with ``retry`` it goes back to the queue while attempts remain.

        A ``handback`` (a stopping worker) retries without spending the attempt. Raises StaleLease.
        """
        k, s, jid = self._keys, self.settings, lease.job.id
        mode = (2 if handback else 1) if retry else 0
        reply = await self._scripts.fail(
            [k.job(jid), k.events(jid), k.output(jid), k.output_ids(jid)],
            [lease.fence, k.prefix, jid, code.value, message, mode, s.events_maxlen, k.channel(jid)],
        )
        if int(reply[0]) == Code.STALE_LEASE:
            raise errors.StaleLease(jid, lease.fence)
        return FailOutcome(reply[1])

    async def reap(self, model: str, limit: int = 100) -> list[tuple[str, JobStatus]]:
        """Requeue (or fail) jobs whose lease expired, and expire queued jobs past their deadline.

        Safe to call from anywhere, any time. Returns (job id, where it went).
        """
        k, s = self._keys, self.settings
        reply = await self._scripts.reap([k.leases(model), k.deadlines(model)], [k.prefix, limit, s.events_maxlen])
        out = [(jid, JobStatus(outcome)) for jid, outcome in reply]
        for jid, outcome in out:
            if outcome is JobStatus.EXPIRED:
                log.info("deadline reached while queued", job_id=jid)
            else:
                log.warning("lease expired", job_id=jid, outcome=outcome.value)
        return out

    # -- client side ----------------------------------------------------
    async def cancel(self, job_id: str, tenant: str | None = None) -> JobStatus:
        """Cancel a job. Returns ``cancelled`` (done now) or ``running`` (its worker will abort it).

        Raises NotFound (also for another tenant's job) and AlreadyTerminal.
        """
        return JobStatus((await self._cancel(job_id, tenant, record=False))[1])

    async def cancel_job(self, job_id: str, tenant: str | None = None) -> Job:
        """:meth:`cancel`, answered with the job as the call left it (one round trip)."""
        reply = await self._cancel(job_id, tenant, record=True)
        h, text, ids = reply[2:5]
        return Job.from_hash({**dict(zip(h[::2], h[1::2], strict=True)), "output": text, "output_ids": ids})

    async def _cancel(self, job_id: str, tenant: str | None, *, record: bool) -> list[Any]:
        k, s = self._keys, self.settings
        reply = await self._scripts.cancel(
            [k.job(job_id), k.events(job_id), k.output(job_id), k.output_ids(job_id)],
            [k.prefix, job_id, tenant or "", s.events_maxlen, k.channel(job_id), 1 if record else 0],
        )
        code, status = int(reply[0]), reply[1]
        if code == Code.NOT_FOUND:
            raise errors.NotFound(job_id)
        if code == Code.ALREADY_TERMINAL:
            raise errors.AlreadyTerminal(job_id, status)
        return list(reply)

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


_RENEWED = {
    Code.OK: RenewResult.OK,
    Code.STALE_LEASE: RenewResult.STALE,
    Code.CANCEL_REQUESTED: RenewResult.CANCEL_REQUESTED,
}


def _drain_rate(stats: Sequence[str | None], now: int) -> float:
    dr, w_start, w_jobs = stats
    if dr:
        return float(dr)
    if w_start and now > int(w_start):
        return int(w_jobs or 0) * 1000 / max(1000, now - int(w_start))
    return 0.0


# Every public coroutine method of the broker answers Unavailable, never a redis-py error.
for _name, _fn in list(vars(Broker).items()):
    if not _name.startswith("_") and inspect.iscoroutinefunction(_fn):
        setattr(Broker, _name, translated(_fn))
