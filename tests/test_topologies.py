"""The broker on a 3-master Redis Cluster and on Sentinel (1 master, 1 replica, 1 sentinel).

Every Lua transition (admit, claim, renew, append, complete, fail, reap, cancel), event
following, cancel notices and BLPOP wake-ups, on servers these tests start on loopback;
then a Sentinel failover mid-run: no acknowledged job lost, only Unavailable errors while
it switches, service back without a restart. ``pytest -m topologies`` runs this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis as redis_sync
import structlog
from arq.connections import create_pool
from redis.crc import key_slot

from batcher.arq_redis import arq_redis_settings
from broker import Broker, BrokerSettings, JobSpec, JobStatus
from broker.client import OutputWrite
from broker.connection import ClusterClient, connect_redis
from broker.contract import FailOutcome, JobErrorCode, RenewResult
from broker.errors import Unavailable
from broker.keys import Keys
from broker.models import TenantLimits
from broker.packing import HiredisPacking
from tests.conftest import RedisCluster, RedisSentinel, start_sentinel

pytestmark = pytest.mark.topologies
log = structlog.get_logger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def spec(tenant: str = "acme", **kw: object) -> JobSpec:
    kw.setdefault("model", "m")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return JobSpec(tenant=tenant, **kw)  # type: ignore[arg-type]


def queue_on(cluster: RedisCluster, node: int, *, owned: bool = True) -> str:
    """A queue name whose slot ``node`` owns (or, with ``owned=False``, does not own)."""
    client = redis_sync.Redis(port=cluster.nodes[node].port, decode_responses=True)
    me = client.cluster("myid")
    ranges = [(lo, hi) for lo, hi, master, *_ in client.cluster("slots") if master[2] == me]
    while True:
        queue = "t" + secrets.token_hex(6)
        slot = key_slot(Keys(queue).prefix.encode())
        if any(lo <= slot <= hi for lo, hi in ranges) == owned:
            return queue


@pytest.fixture(params=["cluster", "sentinel"])
async def topo(
    request: pytest.FixtureRequest, redis_cluster: RedisCluster, redis_sentinel: RedisSentinel
) -> AsyncIterator[Broker]:
    if request.param == "cluster":
        # Only one seed node, which does not own the queue's slot.
        url = f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}"
        queue = queue_on(redis_cluster, 0, owned=False)
    else:
        url, queue = redis_sentinel.url, "t" + secrets.token_hex(6)
    b = Broker.from_settings(BrokerSettings(redis_url=url, queue=queue, models=["m"], lease_ms=5_000))
    await b.load_scripts()
    await b.register_model("m", 4096)
    yield b
    await b.drop_namespace()
    await b.close()


def packs_with_hiredis(b: Broker) -> bool:
    """Every connection the client opened packs its commands with hiredis (broker.packing)."""
    client = b._redis
    if isinstance(client, ClusterClient):
        nodes = client.nodes_manager.nodes_cache.values()
        conns = [c for n in nodes for c in n._connections]
        return bool(conns) and all(isinstance(c, HiredisPacking) for c in conns)
    pool = client.connection_pool
    conns = [*pool._available_connections, *pool._in_use_connections]
    return bool(conns) and all(isinstance(c, HiredisPacking) for c in conns)


async def test_every_transition(topo: Broker) -> None:
    b = topo
    assert not await b.check_server()  # AOF on, noeviction: on every primary
    await b.set_tenant("acme", TenantLimits(rpm=1000, tpm=100_000, weight=2.0))
    assert (await b.get_tenant("acme")) == TenantLimits(rpm=1000, tpm=100_000, weight=2.0)

    # admit (one call and a pipeline), claim, renew, append, complete
    first = await b.admit(spec(max_tokens=8, idempotency_key="k1"))
    assert packs_with_hiredis(b)
    assert (await b.admit(spec(max_tokens=8, idempotency_key="k1"))).duplicate
    more = await b.admit_many([spec(max_tokens=8) for _ in range(4)])
    assert all(not isinstance(a, Exception) for a in more)
    assert (await b.queue_stats("m")).depth[5] == 5
    job = await b.get_job(first.job_id)
    place = await b.position(job)
    # first by admission order (ahead_min); the queued index's rank breaks a tie in the same ms by id
    assert place is not None and place.ahead_min == 0 and 0 <= place.fifo < 5
    leases = await b.claim("m", "w1", 2)
    assert leases[0].id == first.job_id
    assert await b.renew("m", [(le.id, le.fence) for le in leases]) == {le.id: RenewResult.OK for le in leases}
    ok = await b.append_many([OutputWrite(le.id, le.fence, "Hello", [1, 2], offset=0) for le in leases])
    assert ok == {le.id: True for le in leases}
    await b.complete(leases[0], "stop", " world", [3], offset=2)
    assert (await b.complete_many([leases[1]], "length")) == {leases[1].id: True}
    done = await b.get_job(first.job_id)
    assert (done.status, done.output) == (JobStatus.SUCCEEDED, "Hello world")

    # fail with retry (back to the queue), reap an expired lease, cancel queued and running
    [lease] = await b.claim("m", "w1", 1)
    assert await b.fail(lease, JobErrorCode.WORKER_ERROR, "boom", retry=True) is FailOutcome.QUEUED
    [lease] = await b.claim("m", "w1", 1)
    await b._redis.zadd(b._keys.leases("m"), {lease.id: 0}, xx=True)  # expire it now
    assert await b.reap("m") == [(lease.id, JobStatus.QUEUED)]
    queued = (await b.admit(spec())).job_id
    assert await b.cancel(queued, "acme") is JobStatus.CANCELLED
    [running, *_] = await b.claim("m", "w1", 3)
    assert await b.cancel(running.id) is JobStatus.RUNNING
    assert (await b.renew("m", [(running.id, running.fence)]))[running.id] is RenewResult.CANCEL_REQUESTED
    assert {j.id for j in await b.list_jobs("acme")} >= {first.job_id, queued}
    assert await b.drop_namespace() > 0


async def test_claimer_wakes_on_admission(topo: Broker) -> None:
    waiting = asyncio.create_task(topo.wait_for_work("m", 5.0))  # BLPOP on the queue's slot
    t0 = time.monotonic()
    await topo.admit(spec())
    assert await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - t0 < 1.0


async def test_events_follow_live_across_the_queue(topo: Broker) -> None:
    adm = await topo.admit(spec(max_tokens=16))
    [lease] = await topo.claim("m", "w1", 1)
    async with topo.event_hub() as hub:
        got: list[str] = []
        subscribed = asyncio.Event()

        async def follow() -> None:
            async with contextlib.aclosing(hub.follow(adm.job_id)) as events:
                async for ev in events:
                    got.append(ev.type)
                    if ev.type == "started":
                        subscribed.set()

        task = asyncio.create_task(follow())
        await asyncio.wait_for(subscribed.wait(), 5)
        assert await topo.followers(adm.job_id) == 1
        for i in range(5):
            await topo.append_many([OutputWrite(lease.id, lease.fence, f"t{i} ", [i])])
        await topo.complete(lease, "stop")
        await asyncio.wait_for(task, 5)
    assert got == ["queued", "started", *["token"] * 5, "done"]


async def test_cancel_notice_reaches_the_worker(topo: Broker) -> None:
    adm = await topo.admit(spec())
    await topo.claim("m", "w1", 1)
    async with topo.cancel_notices("m") as notices:
        await topo.cancel(adm.job_id)
        async with asyncio.timeout(5):
            async for job_id in notices:
                assert job_id == adm.job_id
                break


async def test_files_and_batches_round_trip(topo: Broker) -> None:
    """Files and batches records (scripts, no MULTI: the cluster client refuses transactions)."""
    bs = topo.batches
    f = {"id": "file-1", "tenant": "acme", "purpose": "batch", "filename": "in.jsonl", "bytes": 12, "path": "file-1"}
    await bs.put_file(f)
    assert await bs.get_file("file-1", "acme") == {k: str(v) for k, v in f.items()}
    assert [r["id"] for r in (await bs.list_files("acme", 10, purpose="batch")).items] == ["file-1"]
    rec = {"id": "batch_1", "tenant": "acme", "status": "validating", "input_file_id": "file-1", "next_line": 0}
    await bs.create_batch(rec)
    assert await bs.get_batch("batch_1", "acme") == {k: str(v) for k, v in rec.items()}
    assert await bs.get_batch("batch_1", "other") is None
    assert [r["id"] for r in (await bs.list_batches("acme", 10)).items] == ["batch_1"]
    assert await bs.active_batches() == ["batch_1"]
    assert await bs.lease("batch_1", "b1", 5_000) == (True, 1)
    assert await bs.update("batch_1", owner="b1", set={"status": "in_progress"}, lines={0: "job-a"}) == "in_progress"
    assert await bs.fed_lines("batch_1") == {0: "job-a"}
    assert await bs.delete_file("file-1", "other") is None
    assert (await bs.delete_file("file-1", "acme") or {}).get("id") == "file-1"
    assert await bs.get_file("file-1") is None
    assert (await bs.list_files("acme", 10)).items == []


async def test_batcher_arq_queue_behind_sentinel(redis_sentinel: RedisSentinel) -> None:
    """arq's own Sentinel support, from genq's Sentinel URL (batcher.arq_redis): jobs land on the master."""
    pool = await create_pool(arq_redis_settings(redis_sentinel.url))
    job_id, queue = "t" + secrets.token_hex(6), "arq:t" + secrets.token_hex(6)
    try:
        assert await pool.enqueue_job("drive_batch", "batch_1", _job_id=job_id, _queue_name=queue) is not None
        master = redis_sync.Redis(port=redis_sentinel.master_port(), decode_responses=True)
        assert master.exists(f"arq:job:{job_id}") and master.zscore(queue, job_id) is not None
    finally:
        await pool.delete(f"arq:job:{job_id}", queue)
        await pool.aclose()


async def test_cluster_client_routes_by_slot(redis_cluster: RedisCluster) -> None:
    """Queues on different masters; a pipeline of scripts survives a SCRIPT FLUSH."""
    client = connect_redis(redis_cluster.url)
    assert isinstance(client, ClusterClient)
    queues = [queue_on(redis_cluster, i) for i in range(3)]
    brokers = [Broker(client, BrokerSettings(redis_url=redis_cluster.url, queue=q, models=["m"])) for q in queues]
    try:
        for b in brokers:
            await b.register_model("m", 0)
        for n in redis_cluster.nodes:
            redis_sync.Redis(port=n.port).script_flush()
        for b in brokers:
            assert all(not isinstance(a, Exception) for a in await b.admit_many([spec(), spec()]))
            assert len(await b.claim("m", "w", 5)) == 2
    finally:
        for b in brokers:
            await b.drop_namespace()
        await client.aclose()


# -- Sentinel failover mid-run --------------------------------------------------------------


async def test_sentinel_failover_loses_no_acknowledged_job(tmp_path: Path) -> None:
    setup = start_sentinel(tmp_path)
    try:
        await _failover_run(setup)
    finally:
        setup.stop()


async def _failover_run(setup: RedisSentinel) -> None:
    settings = BrokerSettings(
        redis_url=setup.url, queue="t" + secrets.token_hex(6), models=["m"], redis_wait_replicas=1
    )
    b = Broker.from_settings(settings)
    await b.register_model("m", 0)
    acked: list[str] = []
    failures: list[tuple[float, BaseException]] = []
    switched = asyncio.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    recovered_at: float | None = None

    async def submit() -> None:
        nonlocal recovered_at
        while not stop.is_set():
            try:
                acked.append((await b.admit(spec())).job_id)
                if switched.is_set() and recovered_at is None:
                    recovered_at = loop.time()
            except Exception as e:  # noqa: BLE001 - every failure is recorded and checked below
                failures.append((loop.time(), e))
                await asyncio.sleep(0.02)  # a client's back-off, not a wait for an event

    beats: list[tuple[float, bool]] = []  # writes without WAIT: when does service resume?

    async def heartbeat() -> None:
        while not stop.is_set():
            try:
                await b.heartbeat("w", {"model": "m"})
                beats.append((loop.time(), True))
            except Unavailable:
                beats.append((loop.time(), False))
            await asyncio.sleep(0.02)  # a heartbeat period, not a wait for an event

    old = setup.master_port()
    tasks = [asyncio.create_task(submit()) for _ in range(4)] + [asyncio.create_task(heartbeat())]
    async with asyncio.timeout(10):
        while len(acked) < 200:  # noqa: ASYNC110 - wait for traffic
            await asyncio.sleep(0.01)
    t_failover = loop.time()
    setup.sentinel().execute_command("SENTINEL", "FAILOVER", setup.service)
    async with asyncio.timeout(30):
        while setup.master_port() == old:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        t_switch_seen = loop.time()
        switched.set()
        t_switched_ms = int(time.time() * 1000)
        new_master = redis_sync.Redis(port=setup.master_port(), decode_responses=True)
        while True:  # writes without WAIT reach the new master, not only the demoted one
            beat = new_master.hget(b._keys.workers, "w")
            if beat and json.loads(beat)["seen_ms"] > t_switched_ms:
                break
            await asyncio.sleep(0.02)
        t_writes_moved = loop.time()
        while recovered_at is None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        n = len(acked)
        while len(acked) < n + 100:  # noqa: ASYNC110 - and it keeps serving
            await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*tasks)

    assert setup.master_port() != old
    assert all(isinstance(e, Unavailable) for _, e in failures), {type(e).__name__ for _, e in failures}
    # Every acknowledged job is on the new master, queued, once. A call that answered
    # Unavailable may have admitted its job anyway (its client retries with an idempotency key).
    jobs = [await b.get_job(jid) for jid in acked]
    assert all(j.status is JobStatus.QUEUED for j in jobs)
    depth = (await b.queue_stats("m")).depth[5]
    assert len(acked) == len(set(acked)) <= depth <= len(acked) + len(failures)
    claimed = {le.id for le in await b.claim("m", "w", depth)}
    assert len(claimed) == depth and claimed >= set(acked)
    first_fail = min((t for t, _ in failures), default=t_failover)
    last_fail = max((t for t, _ in failures), default=t_failover)
    beat_fails = [t for t, ok in beats if not ok]
    print(
        f"\nsentinel failover: writes without WAIT failed {len(beat_fails)} times, reached the new master "
        f"at +{t_writes_moved - t_failover:.2f}s (sentinel named it at +{t_switch_seen - t_failover:.2f}s);"
        f"\nsentinel failover: {len(acked)} jobs acknowledged, none lost ({depth - len(acked)} more admitted "
        f"without acknowledgement); {len(failures)} calls answered "
        f"Unavailable between +{first_fail - t_failover:.2f}s and +{last_fail - t_failover:.2f}s; "
        f"first admission confirmed by a replica (WAIT 1) at +{recovered_at - t_failover:.2f}s "
        f"after SENTINEL FAILOVER (the demoted master must rejoin as a replica first)"
    )
    await b.drop_namespace()
    await b.close()


# -- a URL genq cannot use ----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis+sentinel://:secret@127.0.0.1:26379", "http://127.0.0.1:6379"])
@pytest.mark.parametrize("command", [["-m", "genq.cli", "api"], ["-m", "worker.main", "--engine", "simulated"]])
def test_bad_url_exits_2(url: str, command: list[str]) -> None:
    env = {"GENQ_REDIS_URL": url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "GENQ_REDIS_URL" in done.stderr and "Traceback" not in done.stderr
    assert "secret" not in done.stderr
