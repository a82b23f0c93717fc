"""Redis restarted in the middle of 1,000 jobs: nothing acknowledged is lost, all finish once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import pytest
import structlog
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from broker import Broker, BrokerSettings, JobSpec, JobStatus
from broker.connection import DeadlineRetry, connect_redis
from broker.errors import StaleLease, Unavailable
from tests.conftest import SHARED_REDIS

pytestmark = pytest.mark.asyncio

N_JOBS = 1000
RESTART_AT = 300  # acknowledged admissions before the server is stopped
log = structlog.get_logger(__name__)
TRANSIENT = (Unavailable, OSError)  # the broker answers Unavailable, never a redis-py error


async def test_redis_restart_mid_run_loses_no_acknowledged_job(redis_server, settings: BrokerSettings) -> None:
    srv = redis_server("--appendonly", "yes", "--appendfsync", "everysec")
    s = settings.model_copy(update={"redis_url": srv.url, "lease_ms": 500, "reap_interval_ms": 100})
    loop = asyncio.get_running_loop()
    acked: list[str] = []
    done: set[str] = set()
    errors: Counter[str] = Counter()
    half_way = asyncio.Event()
    admitted_all = asyncio.Event()
    restart = {"acked_at_stop": -1, "acked_at_start": -1, "downtime_s": 0.0}

    async with Broker.from_settings(s) as broker:
        await broker.register_model("m", 4096)

        async def admit_all() -> None:
            for i in range(N_JOBS):
                # The idempotency key makes a retried admission (reply lost in the restart) return the same job.
                spec = JobSpec(
                    tenant=f"t{i % 3}",
                    model="m",
                    kind="completion",
                    prompt="p",
                    max_tokens=8,
                    idempotency_key=f"job-{i}",
                )
                while True:
                    try:
                        adm = await broker.admit(spec)
                        break
                    except TRANSIENT as e:  # past the client's own retries: back off and try again
                        errors[f"admit {type(e).__name__}"] += 1
                        await asyncio.sleep(0.05)
                acked.append(adm.job_id)
                if len(acked) == RESTART_AT:
                    half_way.set()
            admitted_all.set()

        async def work() -> None:
            next_reap = 0.0
            while True:
                try:
                    if loop.time() >= next_reap:  # leases whose completion was lost come back
                        await broker.reap("m")
                        next_reap = loop.time() + s.reap_interval_ms / 1000
                    leases = await broker.claim("m", "w1", 16)
                    if not leases:
                        if admitted_all.is_set():
                            stats = await broker.queue_stats("m")
                            if stats.total_depth == 0 and stats.running == 0:
                                return
                        await broker.wait_for_work("m", 0.1)
                        continue
                    for lease in leases:
                        with contextlib.suppress(StaleLease):  # reaped meanwhile, or a retried reply
                            await broker.complete(lease, "length", "ok", [1, 2, 3])
                            done.add(lease.id)
                except TRANSIENT as e:
                    errors[f"worker {type(e).__name__}"] += 1
                    await asyncio.sleep(0.05)

        async def restart_redis() -> None:
            await half_way.wait()
            restart["acked_at_stop"] = len(acked)
            t0 = loop.time()
            await asyncio.to_thread(srv.stop)  # SIGTERM: Redis fsyncs its AOF and exits
            await asyncio.to_thread(srv.start)  # same port, same dir: reloads the AOF
            restart["downtime_s"] = loop.time() - t0
            restart["acked_at_start"] = len(acked)

        async with asyncio.timeout(60):
            await asyncio.gather(admit_all(), work(), restart_redis())

        assert len(acked) == len(set(acked)) == N_JOBS
        assert done <= set(acked)
        # No job was created twice by a retried admission.
        jobs = [k async for k in broker._redis.scan_iter(match=broker._keys.job("*"), count=1000)]
        assert len(jobs) == N_JOBS
        # The restart really happened mid-run: admissions before the stop and after the start.
        assert RESTART_AT <= restart["acked_at_stop"] <= restart["acked_at_start"] < N_JOBS, restart

        pipe = broker._redis.pipeline(transaction=False)
        for jid in acked:
            pipe.hget(broker._keys.job(jid), "status")
        statuses = await pipe.execute()
        assert {st for st in statuses} == {JobStatus.SUCCEEDED.value}, (
            f"{sum(st is None for st in statuses)} acknowledged jobs lost"
        )
        # Visible completion exactly once: one "done" event per job, and it is the last one.
        async with broker.event_hub() as hub:
            for jid in acked:
                types = [ev.type for ev in await hub.backlog(jid)]
                assert types.count("done") == 1 and types[0] == "queued" and types[-1] == "done", (jid, types)
        log.info(
            "redis restart survived",
            jobs=N_JOBS,
            completed_by_worker=len(done),
            transient_errors=dict(errors),
            **restart,
        )
        assert (await broker.queue_stats("m")).total_depth == 0
        assert int(await broker._redis.hget(broker._keys.global_, "queued")) == 0


async def test_a_follower_rides_through_a_redis_restart(redis_server, settings: BrokerSettings) -> None:
    """Was: the follower's resync read, right after pub/sub lost its server, raised Unavailable
    (no retry), so every open SSE stream of the API died with an unhandled error in one Redis
    restart. The resync must follow the reconnect at once, not the quiet-stream safety net."""
    srv = redis_server("--appendonly", "yes", "--appendfsync", "everysec")
    s = settings.model_copy(update={"redis_url": srv.url})
    async with Broker.from_settings(s) as broker:
        await broker.register_model("m", 4096)
        await broker.admit(JobSpec(tenant="t", model="m", kind="completion", prompt="p", max_tokens=4))
        [lease] = await broker.claim("m", "w1", 1)
        async with broker.event_hub(resync_s=60) as hub:
            seen: list[str] = []
            started = asyncio.Event()

            async def follow() -> None:
                async for ev in hub.follow(lease.id):
                    seen.append(ev.type)
                    if ev.type == "started":
                        started.set()

            follower = asyncio.create_task(follow())
            async with asyncio.timeout(10):
                await started.wait()
                await asyncio.to_thread(srv.stop, kill=True)
                await asyncio.to_thread(srv.start)  # same port: reloads the AOF
                await broker.complete(lease, "length", "ok", [1, 2])  # published live, after the resubscribe
                await follower
        assert seen == ["queued", "started", "token", "done"]  # the completion wrote its text, then done


async def test_a_call_made_while_redis_restarts_waits_for_it(redis_server, settings: BrokerSettings) -> None:
    """Was: no retry at all (redis-py's sync Retry given to the asyncio client, and a refused
    connect not retried): any call in a restart failed at once, though the client promises ~15 s."""
    srv = redis_server("--appendonly", "yes")
    async with Broker.from_settings(settings.model_copy(update={"redis_url": srv.url})) as broker:
        await broker.ping()
        await asyncio.to_thread(srv.stop, kill=True)  # the pooled connection is now dead
        restart = asyncio.create_task(asyncio.to_thread(srv.start))
        async with asyncio.timeout(10):
            await broker.ping()  # refused until the server listens again, then answered
            await restart


async def test_nested_retries_share_one_deadline() -> None:
    """redis-py retries a connect inside a command's retry: with counted retries a call on a
    dead Redis took 20 x 20 tries (368 s measured); one deadline bounds both levels."""
    retry = DeadlineRetry(0.3, cap_s=0.02)
    tries = 0

    async def refused() -> None:
        nonlocal tries
        tries += 1
        raise RedisConnectionError("refused")

    async def command() -> None:  # as redis-py's send_command -> connect()
        await retry.call_with_retry(refused, lambda e: asyncio.sleep(0))

    t0 = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await retry.call_with_retry(command, lambda e: asyncio.sleep(0))
    assert time.monotonic() - t0 < 0.6 and tries > 3


async def test_a_handshake_cut_by_a_restart_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen in the chaos run (tests/test_chaos.py): the TCP connect of a new pooled connection
    succeeded, its handshake (CLIENT SETINFO) met the dying server, and redis-py, which retries
    only the TCP connect, failed the call at once."""
    client = connect_redis(SHARED_REDIS)
    cuts = 2
    real = AbstractConnection.on_connect

    async def flaky(self: AbstractConnection) -> None:
        nonlocal cuts
        if cuts:
            cuts -= 1
            raise RedisConnectionError("Error UNKNOWN while writing to socket. Connection lost.")
        await real(self)

    monkeypatch.setattr(AbstractConnection, "on_connect", flaky)
    try:
        assert await client.ping()
        assert cuts == 0
    finally:
        await client.aclose()
