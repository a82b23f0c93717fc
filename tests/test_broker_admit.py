"""Admission: idempotency, bad input, rate limits (real time), token refunds, queue caps, TTL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import structlog
from pydantic import ValidationError
from redis.asyncio import Redis

from broker import Broker, JobSpec, JobStatus
from broker.client import now_ms
from broker.errors import (
    AlreadyTerminal,
    ContextTooLong,
    IdempotencyConflict,
    LimitExceeded,
    NotFound,
    PriorityNotAllowed,
    QueueFull,
    RateLimited,
    UnknownModel,
)
from broker.models import TenantLimits

pytestmark = pytest.mark.asyncio
log = structlog.get_logger(__name__)


def spec(tenant: str = "acme", **kw) -> JobSpec:
    kw.setdefault("model", "m")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return JobSpec(tenant=tenant, **kw)


async def snapshot(broker: Broker) -> dict[bytes, bytes]:
    """Every key of the queue namespace with its serialized value (DUMP)."""
    raw = Redis.from_url(broker.settings.redis_url)  # bytes, not decoded
    try:
        keys = [k async for k in raw.scan_iter(match=f"{broker._keys.prefix}*", count=1000)]
        pipe = raw.pipeline(transaction=False)
        for k in keys:
            pipe.dump(k)
        return dict(zip(keys, await pipe.execute(), strict=True))
    finally:
        await raw.aclose()


async def depth(broker: Broker) -> int:
    return (await broker.queue_stats("m")).total_depth


# -- idempotency -------------------------------------------------------------


async def test_idempotent_admit_same_tenant_same_job(broker: Broker) -> None:
    first = await broker.admit(spec(idempotency_key="order-42"))
    again = await broker.admit(spec(idempotency_key="order-42"))
    assert first.duplicate is False
    assert again.duplicate is True
    assert again.job_id == first.job_id
    assert await depth(broker) == 1
    assert len(await broker.list_jobs("acme")) == 1

    other = await broker.admit(spec("globex", idempotency_key="order-42"))
    assert other.duplicate is False
    assert other.job_id != first.job_id
    assert await depth(broker) == 2

    fresh = await broker.admit(spec(idempotency_key="order-43"))
    assert fresh.job_id not in (first.job_id, other.job_id)
    assert await depth(broker) == 3


async def test_a_repeated_key_with_another_webhook_url_is_a_conflict(broker: Broker) -> None:
    first = await broker.admit(spec(idempotency_key="hook-1", webhook_url="https://example.com/a"))
    again = await broker.admit(spec(idempotency_key="hook-1", webhook_url="https://example.com/a"))
    assert again.duplicate and again.job_id == first.job_id
    for other in ("https://example.com/b", None):
        with pytest.raises(IdempotencyConflict):
            await broker.admit(spec(idempotency_key="hook-1", webhook_url=other))
    assert await depth(broker) == 1


async def test_job_ids_have_128_random_bits(broker: Broker) -> None:
    ids = [(await broker.admit(spec())).job_id for _ in range(20)]
    assert len(set(ids)) == 20
    for jid in ids:
        assert jid.startswith("job_")
        assert len(bytes.fromhex(jid.removeprefix("job_"))) * 8 >= 128


# -- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(priority=10),
        dict(priority=-1),
        dict(max_tokens=0),
        dict(max_tokens=-5),
        dict(idempotency_key="has space"),
        dict(idempotency_key=""),
        dict(idempotency_key="k" * 129),
        dict(tenant="no/slash"),
        dict(model="bad model"),
        dict(messages=[]),
        dict(kind="completion", messages=None),
        dict(temperature=3.0),
    ],
)
async def test_invalid_spec_is_rejected_before_redis(broker: Broker, bad: dict) -> None:
    await broker.admit(spec())  # so that the namespace has its usual keys
    before = await snapshot(broker)
    kw = {"tenant": "acme", "model": "m", "messages": [{"role": "user", "content": "hi"}], **bad}
    with pytest.raises(ValidationError):
        await broker.admit(JobSpec(**kw))
    assert await snapshot(broker) == before


@pytest.mark.parametrize(
    ("bad", "error", "param"),
    [
        (dict(model="no-such-model"), UnknownModel, "model"),
        (dict(max_tokens=10**9), LimitExceeded, "max_tokens"),
        (dict(max_tokens=32_769), LimitExceeded, "max_tokens"),
        (dict(prompt_tokens=4000, max_tokens=97), ContextTooLong, "input"),
        (dict(messages=[{"role": "user", "content": "x" * 1_000_001}]), LimitExceeded, "request_bytes"),
    ],
)
async def test_bad_request_raises_typed_error_and_writes_nothing(
    broker: Broker, bad: dict, error: type[Exception], param: str
) -> None:
    await broker.admit(spec())
    before = await snapshot(broker)
    assert len(before) >= 8  # job, events, tenant state, tenant jobs, models, global, stats, queues...
    with pytest.raises(error) as info:
        await broker.admit(spec(**bad))
    assert type(info.value) is error
    assert info.value.field == param
    assert await snapshot(broker) == before


async def test_context_limit_is_inclusive(broker: Broker) -> None:
    # max_model_len is 4096: exactly 4096 fits, 4097 does not.
    await broker.admit(spec(prompt_tokens=4000, max_tokens=96))
    with pytest.raises(ContextTooLong) as info:
        await broker.admit(spec(prompt_tokens=4000, max_tokens=97))
    assert (info.value.max_model_len, info.value.prompt_tokens, info.value.max_tokens) == (4096, 4000, 97)


async def test_priority_not_allowed_for_tenant(broker: Broker) -> None:
    await broker.set_tenant("batchy", TenantLimits(priorities=[5, 9]))
    assert (await broker.get_tenant("batchy")).priorities == [5, 9]
    before = await snapshot(broker)
    with pytest.raises(PriorityNotAllowed) as info:
        await broker.admit(spec("batchy", priority=0))
    assert info.value.field == "priority"
    assert await snapshot(broker) == before
    await broker.admit(spec("batchy", priority=9))


async def test_admit_many_isolates_bad_items(broker: Broker) -> None:
    specs = [spec(), spec(model="nope"), spec(max_tokens=10**6), spec(priority=0), spec(prompt_tokens=5000)]
    results = await broker.admit_many(specs)
    assert [type(r).__name__ for r in results] == [
        "Admission",
        "UnknownModel",
        "LimitExceeded",
        "Admission",
        "ContextTooLong",
    ]
    assert await depth(broker) == 2
    claimed = await broker.claim("m", "w", 10)
    assert [lease.id for lease in claimed] == [results[3].job_id, results[0].job_id]


# -- rate limits ---------------------------------------------------------------


async def offered_load(
    broker: Broker, make: Callable[[int], JobSpec], rate_per_s: float, duration_s: float
) -> tuple[int, list[RateLimited], float]:
    """Submit at a steady rate (submission i at t0 + i/rate); count what is accepted."""
    loop = asyncio.get_running_loop()
    accepted, refused = 0, []
    t0 = loop.time()
    for i in range(int(rate_per_s * duration_s)):
        delay = t0 + i / rate_per_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # load pacing, not waiting for an event
        try:
            await broker.admit(make(i))
            accepted += 1
        except RateLimited as e:
            refused.append(e)
    span = loop.time() - t0
    log.info("offered load", offered=int(rate_per_s * duration_s), accepted=accepted, span_s=round(span, 3))
    return accepted, refused, span


async def test_request_rate_limit_steady_load(broker: Broker) -> None:
    # 10 requests/s with a burst of 20, offered 50/s for 10 s: 20 + 10 * 10 = 120 accepted.
    await broker.set_tenant("acme", TenantLimits(rpm=600, rpm_burst=20))
    accepted, refused, span = await offered_load(broker, lambda i: spec(), 50, 10)
    assert span < 10.5, f"load generator fell behind ({span:.2f} s)"
    assert abs(accepted - 120) <= 3, accepted
    assert accepted + len(refused) == 500
    assert {e.reason for e in refused} == {"requests"}
    assert all(0 < e.retry_after_ms <= 100 for e in refused)
    assert {e.limits["rq_limit"] for e in refused} == {600}
    assert await depth(broker) == accepted


async def test_token_rate_limit_steady_load(broker: Broker) -> None:
    # 1,000 tokens/s with a burst of 2,000; each job costs 40 + 60 = 100 tokens: 120 accepted.
    await broker.set_tenant("acme", TenantLimits(tpm=60_000, tpm_burst=2_000))
    accepted, refused, span = await offered_load(broker, lambda i: spec(prompt_tokens=40, max_tokens=60), 50, 10)
    assert span < 10.5, f"load generator fell behind ({span:.2f} s)"
    assert abs(accepted - 120) <= 3, accepted
    assert accepted + len(refused) == 500
    assert {e.reason for e in refused} == {"tokens"}
    assert all(0 < e.retry_after_ms <= 100 for e in refused)
    assert (await broker.queue_stats("m")).queued_tokens[5] == 100 * accepted


async def test_requests_refusal_retry_after_is_honoured(broker: Broker) -> None:
    await broker.set_tenant("acme", TenantLimits(rpm=600, rpm_burst=2))
    a = await broker.admit(spec())
    assert (a.limits["rq_limit"], a.limits["rq_remaining"]) == (600, 1)
    await broker.admit(spec())
    with pytest.raises(RateLimited) as info:
        await broker.admit(spec())
    e = info.value
    assert e.reason == "requests"
    assert e.code == "rate_limit_exceeded"
    assert 0 < e.retry_after_ms <= 100
    assert await depth(broker) == 2
    # another tenant is not limited by acme's bucket
    await broker.admit(spec("globex"))
    await asyncio.sleep(e.retry_after_ms / 1000)  # honouring Retry-After is the behaviour under test
    await broker.admit(spec())
    assert await depth(broker) == 4


async def test_tokens_refusal_retry_after_is_honoured(broker: Broker) -> None:
    await broker.set_tenant("acme", TenantLimits(tpm=60_000, tpm_burst=200))
    first = await broker.admit(spec(prompt_tokens=50, max_tokens=100))
    assert (first.limits["tk_limit"], first.limits["tk_remaining"]) == (60_000, 50)
    with pytest.raises(RateLimited) as info:
        await broker.admit(spec(prompt_tokens=50, max_tokens=100))
    e = info.value
    assert e.reason == "tokens"
    assert 90 <= e.retry_after_ms <= 100  # 100 missing tokens at 1 token/ms
    await asyncio.sleep(e.retry_after_ms / 1000)
    await broker.admit(spec(prompt_tokens=50, max_tokens=100))


async def test_request_larger_than_token_burst_is_invalid(broker: Broker) -> None:
    await broker.set_tenant("acme", TenantLimits(tpm=6_000, tpm_burst=500))
    with pytest.raises(LimitExceeded) as info:
        await broker.admit(spec(prompt_tokens=1, max_tokens=500))
    assert (info.value.field, info.value.value, info.value.limit) == ("tokens", 501, 500)
    await broker.admit(spec(prompt_tokens=0, max_tokens=500))


async def test_unused_tokens_are_refunded_at_completion(broker: Broker) -> None:
    # 60 tokens/min = 1 token/s of refill: negligible during this test.
    await broker.set_tenant("acme", TenantLimits(tpm=60, tpm_burst=100))
    adm = await broker.admit(spec(max_tokens=100))
    assert adm.limits["tk_remaining"] == 0
    with pytest.raises(RateLimited) as info:
        await broker.admit(spec(max_tokens=90))
    assert info.value.reason == "tokens"
    assert info.value.retry_after_ms > 80_000

    [lease] = await broker.claim("m", "w", 1)
    await broker.complete(lease, "stop", "ten tokens", list(range(10)))
    job = await broker.get_job(adm.job_id)
    assert (job.status, job.completion_tokens) == (JobStatus.SUCCEEDED, 10)

    refunded = await broker.admit(spec(max_tokens=90))  # fails without the 90-token refund
    assert refunded.limits["tk_remaining"] == 0
    with pytest.raises(RateLimited):
        await broker.admit(spec(max_tokens=5))


async def test_cancel_of_queued_job_refunds_whole_reservation(broker: Broker) -> None:
    await broker.set_tenant("acme", TenantLimits(tpm=60, tpm_burst=100))
    adm = await broker.admit(spec(prompt_tokens=30, max_tokens=70))
    with pytest.raises(RateLimited):
        await broker.admit(spec(prompt_tokens=30, max_tokens=70))
    assert await broker.cancel(adm.job_id, "acme") == JobStatus.CANCELLED
    await broker.admit(spec(prompt_tokens=30, max_tokens=70))


# -- queue caps ------------------------------------------------------------------


async def test_global_queue_full(broker: Broker) -> None:
    small = Broker(broker._redis, broker.settings.model_copy(update={"max_queued_global": 3}))
    for i in range(3):
        await small.admit(spec(f"t{i}"))
    before = await snapshot(broker)
    with pytest.raises(QueueFull) as info:
        await small.admit(spec("t9"))
    assert info.value.reason == "queue_full"
    assert info.value.code == "queue_full"
    assert info.value.retry_after_ms > 0
    assert await snapshot(broker) == before
    # Claiming frees a slot.
    [lease] = await small.claim("m", "w", 1)
    assert lease.job.tenant == "t0"
    await small.admit(spec("t9"))
    with pytest.raises(QueueFull):
        await small.admit(spec("t10"))


async def test_tenant_max_queued(broker: Broker) -> None:
    await broker.set_tenant("acme", TenantLimits(max_queued=2))
    first = await broker.admit(spec())
    await broker.admit(spec())
    with pytest.raises(RateLimited) as info:
        await broker.admit(spec())
    assert info.value.reason == "tenant_queue_full"
    assert info.value.retry_after_ms > 0
    await broker.admit(spec("globex"))  # other tenants are not affected
    await broker.cancel(first.job_id, "acme")
    await broker.admit(spec())
    assert await depth(broker) == 3


# -- results expire ----------------------------------------------------------------


async def test_results_and_events_expire_with_ttl(broker: Broker) -> None:
    b = Broker(broker._redis, broker.settings.model_copy(update={"result_ttl_s": 1}))
    adm = await b.admit(spec())
    job_key, ev_key = b._keys.job(adm.job_id), b._keys.events(adm.job_id)
    assert await b._redis.pttl(job_key) == -1  # no TTL while the job is live
    assert not await b._redis.exists(ev_key)  # a queued job's first event is not stored (broker.events)
    [lease] = await b.claim("m", "w", 1)
    await b.complete(lease, "stop", "ok", [1, 2])
    for key in (job_key, ev_key):
        assert 0 < await b._redis.pttl(key) <= 1000
    assert (await b.get_job(adm.job_id)).status == JobStatus.SUCCEEDED
    # No keyspace event to wait on here: poll with a deadline.
    async with asyncio.timeout(3):
        while await b._redis.exists(job_key, ev_key):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert await b.list_jobs("acme") == []


async def test_a_tenants_index_drops_entries_older_than_the_ttl_as_it_admits(broker: Broker) -> None:
    """Admission trims the tenant's job index now and then (about one call in 16, by the clock):
    under a steady trickle of admissions every tenant's old entries go, whatever its turn."""
    b = Broker(broker._redis, broker.settings.model_copy(update={"result_ttl_s": 1}))
    index = b._keys.tenant_jobs("acme")
    old = [(await b.admit(spec())).job_id for _ in range(3)]
    others = ["t" + str(i) for i in range(15)]
    # No event marks a TTL's end: admit (16 tenants taking turns) until the old entries are gone.
    async with asyncio.timeout(10):
        while any([await b._redis.zscore(index, j) is not None for j in old]):
            for t in ["acme", *others]:
                await b.admit(spec(tenant=t))
            await asyncio.sleep(0.002)  # a new millisecond for the next round
    assert await b._redis.zcard(index) >= 1  # what was admitted within the TTL stays


async def test_admit_returns_the_job_as_admitted_when_asked(broker: Broker) -> None:
    first = await broker.admit(spec(idempotency_key="k1", webhook_url=None), record=True)
    assert first.job is not None and not first.duplicate
    assert first.job == await broker.get_job(first.job_id)  # what a second read would have said
    assert first.job.status is JobStatus.QUEUED and first.job.output == ""
    assert (await broker.admit(spec(), record=False)).job is None  # only when asked: admit_many never
    again = await broker.admit(spec(idempotency_key="k1", webhook_url=None), record=True)
    assert again.duplicate and again.job_id == first.job_id and again.job is None  # it may have moved on
    # numbers the script computes (a fractional weight, token limits, the priority score) read the same
    await broker.set_tenant("frac", TenantLimits(weight=0.5, tpm=100_000, tpm_burst=20_000, rpm=600))
    odd = await broker.admit(spec(tenant="frac", priority=2, deadline_ms=now_ms() + 60_000), record=True)
    assert odd.job == await broker.get_job(odd.job_id)


async def test_cancel_job_answers_with_the_job_as_the_call_left_it(broker: Broker) -> None:
    adm = await broker.admit(spec())
    job = await broker.cancel_job(adm.job_id, "acme")
    assert job == await broker.get_job(adm.job_id) and job.status is JobStatus.CANCELLED
    with pytest.raises(NotFound):
        await broker.cancel_job(adm.job_id, "someone-else")  # another tenant's job is not found
    with pytest.raises(AlreadyTerminal):
        await broker.cancel_job(adm.job_id, "acme")
