"""The broker: one typed ``async`` method per atomic transition, plus introspection.

Everything a worker or the API does to Redis goes through here; the Redis client and
the key map are private. Lua replies are mapped to exceptions and typed results through
:class:`broker.errors.Code` in one place, and redis-py's connection and timeout errors
become :class:`broker.errors.Unavailable` at this boundary.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import NoScriptError

from broker import errors
from broker.batches import BatchStore
from broker.connection import RedisClient, connect_redis, wait_replicas
from broker.contract import LOWEST_PRIORITY, FailOutcome, JobErrorCode, RenewResult
from broker.errors import Code, translate_public
from broker.events import ControlListener, EventHub
from broker.fleet import FleetRecords
from broker.fleet import now_ms as now_ms  # the one wall clock, re-exported
from broker.keys import Keys
from broker.models import (
    Admission,
    Job,
    JobSpec,
    JobStatus,
    Lease,
    new_job_id,
)
from broker.reads import JobReads
from broker.redis_check import check_redis
from broker.replies import typed_reply
from broker.scripts import Scripts
from broker.settings import BrokerSettings
from broker.usage import UsageReader
from broker.webhooks import WebhookStore

log = structlog.get_logger(__name__)


def _fingerprint(spec: JobSpec) -> str:
    return hashlib.sha256(spec.fingerprint_source().encode()).hexdigest()[:32]


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


# What claim.lua returns of each claimed job, in its order (its HMGET's fields, as after the
# claim); the id, model, status and worker are the claim's own.
CLAIMED_FIELDS = (
    *("cost", "weight", "deadline_ms", "attempts", "started_ms", "evn", "seq_out", "tenant", "priority"),
    *("max_attempts", "request", "prompt_tokens", "max_tokens", "completion_tokens", "created_ms"),
    *("first_token_ms", "cancel", "lev", "output", "output_ids"),
)
APPEND_CHUNK = 128  # writes per append call: one flush of a full worker, a bounded time inside Redis


class Broker(JobReads, FleetRecords):
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
        return EventHub(self._redis, self._keys, self._scripts.backlog, resync_s)

    def cancel_notices(self, model: str) -> ControlListener:
        """A worker's subscription to the cancel notices of its model (an async context manager)."""
        return ControlListener(self._redis, self._keys, model)

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
            _fingerprint(spec) if spec.idempotency_key else "",
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
        running = {"model": model, "status": JobStatus.RUNNING.value, "worker": worker_id}
        for rec in reply:
            h = {f: v for f, v in zip(CLAIMED_FIELDS, rec[2:], strict=True) if v is not None}
            h.update(running, id=rec[0], fence=rec[1])
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
                keys += k.job_keys(d.job_id)
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
                keys += k.job_keys(job.id)
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
            k.job_keys(jid),
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
            k.job_keys(job_id),
            [k.prefix, job_id, tenant or "", s.events_maxlen, k.channel(job_id), 1 if record else 0],
        )
        code, status = int(reply[0]), reply[1]
        if code == Code.NOT_FOUND:
            raise errors.NotFound(job_id)
        if code == Code.ALREADY_TERMINAL:
            raise errors.AlreadyTerminal(job_id, status)
        return list(reply)


_RENEWED = {
    Code.OK: RenewResult.OK,
    Code.STALE_LEASE: RenewResult.STALE,
    Code.CANCEL_REQUESTED: RenewResult.CANCEL_REQUESTED,
}


# Every public coroutine method of the broker answers Unavailable, never a redis-py error.
translate_public(Broker)
