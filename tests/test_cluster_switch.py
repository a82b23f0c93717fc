"""The queue's owner changes mid-run on a Redis Cluster (3 masters, one with a replica).

A ``CLUSTER FAILOVER`` on the replica of the queue's master while submissions (confirmed
by that replica, ``WAIT 1``) and a real worker (simulated engine) keep running: every
acknowledged job completes, every failure during the switch is
:class:`broker.errors.Unavailable` (the API's 503), and service comes back without
restarting anything; the recovery time is logged (``cluster.failover``).

A slot *migration* (reshard) of the queue's slot: a claim on either side of it is whole or a
clear Unavailable, never half done, and with the keys moved one by one (as ``redis-cli
--cluster reshard`` moves them) every job is claimed exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_sync
import structlog
from redis.crc import key_slot

from broker import Broker, BrokerSettings, JobSpec, JobStatus
from broker.connection import ClusterClient, connect_redis
from broker.contract import RenewResult
from broker.errors import Unavailable
from broker.keys import Keys
from broker.models import Job
from tests.conftest import RedisCluster, RedisServer, _wait_until, free_cluster_port, start_cluster
from worker.engine.base import EngineSettings
from worker.engine.simulated import SimulatedEngine
from worker.loop import Worker
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.topologies, pytest.mark.timeout(120)]
log = structlog.get_logger(__name__)


def owner_port(cluster: RedisCluster, slot: int) -> int:
    """The port of the master that owns ``slot``, as node 1 sees it."""
    client = redis_sync.Redis(port=cluster.nodes[1].port, decode_responses=True)
    for lo, hi, master, *_ in client.cluster("slots"):
        if lo <= slot <= hi:
            return int(master[1])
    raise AssertionError(f"slot {slot} not covered")


def queue_on(cluster: RedisCluster, node: int) -> tuple[str, int]:
    while True:
        queue = "t" + secrets.token_hex(6)
        slot = key_slot(Keys(queue).prefix.encode())
        if owner_port(cluster, slot) == cluster.nodes[node].port:
            return queue, slot


def spec(model: str = "m") -> JobSpec:
    return JobSpec(tenant="acme", model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


async def unfinished(b: Broker, job_ids: list[str]) -> list[Job]:
    jobs: list[Job] = []
    for i in range(0, len(job_ids), 200):
        jobs += await asyncio.gather(*(b.get_job(j) for j in job_ids[i : i + 200]))
    return [j for j in jobs if j.status is not JobStatus.SUCCEEDED]


def add_replica(cluster: RedisCluster, master: int, base: Path) -> RedisServer:
    """A replica of node ``master``, joined through ``redis-cli --cluster add-node``, in sync."""
    node = RedisServer(free_cluster_port(), base / "replica", ["--cluster-enabled", "yes", "--appendonly", "yes"])
    node.args += ["--cluster-config-file", str(node.dir / "nodes.conf"), "--cluster-node-timeout", "2000"]
    node.dir.mkdir(parents=True)
    node.start()
    owner = cluster.nodes[master]
    master_id = redis_sync.Redis(port=owner.port, decode_responses=True).cluster("myid")
    subprocess.run(
        [
            *("redis-cli", "--cluster", "add-node", f"127.0.0.1:{node.port}", f"127.0.0.1:{owner.port}"),
            *("--cluster-slave", "--cluster-master-id", master_id),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    rep = redis_sync.Redis(port=node.port, decode_responses=True)
    _wait_until(lambda: rep.info("replication")["master_link_status"] == "up", "the replica to sync")
    for n in cluster.nodes:  # every master lists it, so the clients' slot maps carry it
        c = redis_sync.Redis(port=n.port, decode_responses=True)
        _wait_until(lambda c=c: any(len(s) > 3 for s in c.cluster("slots")), f"node {n.port} to see the replica")
    return node


def role(port: int) -> str:
    return str(redis_sync.Redis(port=port, decode_responses=True).info("replication")["role"])


async def test_cluster_failover_loses_no_acknowledged_job(tmp_path: Path) -> None:
    """``CLUSTER FAILOVER`` on the replica of the queue's owner, with admissions confirmed by
    that replica (``GENQ_REDIS_WAIT_REPLICAS=1``)."""
    cluster = start_cluster(tmp_path)
    replica = add_replica(cluster, 0, tmp_path)
    old = cluster.nodes[0].port
    try:
        queue, slot = queue_on(cluster, 0)

        def switch() -> None:
            redis_sync.Redis(port=replica.port).execute_command("CLUSTER", "FAILOVER")
            _wait_until(lambda: role(replica.port) == "master" and role(old) == "slave", "the failover")
            _wait_until(lambda: owner_port(cluster, slot) == replica.port, "the slot map to name the new master")

        await _switch_run(cluster, queue, switch, "cluster.failover")
    finally:
        replica.stop(kill=True)
        cluster.stop()


async def _switch_run(cluster: RedisCluster, queue: str, switch: Callable[[], None], event: str) -> None:
    settings = BrokerSettings(redis_url=cluster.url, queue=queue, models=["m"], lease_ms=5_000, redis_wait_replicas=1)
    b = Broker.from_settings(settings)
    await b.register_model("m", 0)
    await b.register_model("probe", 0)
    loop = asyncio.get_running_loop()
    acked: list[str] = []
    failures: list[tuple[float, BaseException]] = []
    switched = asyncio.Event()
    stop = asyncio.Event()
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

    engine_settings = EngineSettings(
        kind="simulated", served_model_name="m", sim_step_ms=2.0, sim_step_ms_per_seq=0.0, max_num_seqs=32
    )
    worker_settings = WorkerSettings(
        engine="simulated", served_model_name="m", heartbeat_s=0.2, flush_interval_ms=5, drain_grace_s=2
    )
    wb = Broker.from_settings(settings)  # the worker's own connections, as in its own process
    async with SimulatedEngine(engine_settings) as engine:
        worker = Worker(wb, engine, worker_settings)
        run = asyncio.create_task(worker.run())
        tasks = [asyncio.create_task(submit()) for _ in range(4)]
        try:
            async with asyncio.timeout(15):
                while len(acked) < 300:  # noqa: ASYNC110 - wait for traffic
                    await asyncio.sleep(0.01)
            t_start = loop.time()
            await asyncio.to_thread(switch)
            t_moved = loop.time()
            switched.set()
            async with asyncio.timeout(30):
                while recovered_at is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                n = len(acked)
                while len(acked) < n + 200:  # noqa: ASYNC110 - and it keeps serving
                    await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*tasks)
            async with asyncio.timeout(30):  # the worker drains every acknowledged job
                while (pending := await unfinished(b, acked)) and not run.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # the worker's progress, in Redis: poll it
            assert not run.done(), run.result()  # the worker survived the switch
        finally:
            stop.set()
            worker.stop()
            await asyncio.wait_for(run, 20)
            for t in tasks:
                t.cancel()
            await wb.close()

    assert all(isinstance(e, Unavailable) for _, e in failures), {repr(e) for _, e in failures}
    assert not pending, [(j.id, j.status) for j in pending[:5]]
    assert len(acked) == len(set(acked))
    # Scripts this client first runs after the switch load on the new owner (redis-py took
    # it for a replica after a second MOVED and loaded them on every other master).
    probe = await b.admit(spec(model="probe"))
    [lease] = await b.claim("probe", "w-probe", 1)
    assert await b.renew("probe", [(lease.id, lease.fence)]) == {lease.id: RenewResult.OK}
    assert await b.reap("probe") == []
    await b.complete(lease, "stop", "ok", [1])
    assert (await b.get_job(probe.job_id)).status is JobStatus.SUCCEEDED
    first_fail = min((t for t, _ in failures), default=t_start)
    last_fail = max((t for t, _ in failures), default=t_start)
    log.info(
        event,
        acknowledged=len(acked),
        lost=0,
        unavailable_calls=len(failures),
        unavailable_from_s=round(first_fail - t_start, 3),
        unavailable_until_s=round(last_fail - t_start, 3),
        switch_s=round(t_moved - t_start, 3),
        recovered_after_s=round(recovered_at - t_start, 3),
        worker_claimed=worker.jobs_claimed,
    )
    await b.drop_namespace()
    await b.close()


def assign_slot(cluster: RedisCluster, slot: int, node: int) -> None:
    """Give an empty ``slot`` to ``node`` (no keys to move), on every node."""
    owner = redis_sync.Redis(port=cluster.nodes[node].port, decode_responses=True).cluster("myid")
    for n in cluster.nodes:
        redis_sync.Redis(port=n.port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)


async def test_new_owner_stays_a_primary_after_concurrent_moved(redis_cluster: RedisCluster) -> None:
    """Calls in flight when a slot changes owner all answer MOVED; the client must still see
    the new owner as a primary (scripts are loaded on primaries only)."""
    queue, slot = queue_on(redis_cluster, 0)
    key = Keys(queue).prefix
    client = connect_redis(redis_cluster.url)
    assert isinstance(client, ClusterClient)
    try:
        assert await client.get(key) is None  # the slot map is loaded, and the slot is empty
        assign_slot(redis_cluster, slot, 1)
        # fewer than 5: redis-py reloads the whole slot map at every 5th MOVED, which hid it
        await asyncio.gather(*(client.get(key) for _ in range(3)))
        new = client.get_node_from_key(key)
        assert new.port == redis_cluster.nodes[1].port
        assert new in client.get_primaries(), new.server_type
        sha = await client.script_load("return KEYS[1]")  # on every primary
        assert await client.evalsha(sha, 1, key) == key
    finally:
        assign_slot(redis_cluster, slot, 0)
        await client.aclose()


async def test_claim_on_a_migrating_slot_leaves_the_queue_whole(redis_cluster: RedisCluster) -> None:
    queue, slot = queue_on(redis_cluster, 0)
    b = Broker.from_settings(BrokerSettings(redis_url=redis_cluster.url, queue=queue, models=["m"]))
    src, dst = (redis_sync.Redis(port=redis_cluster.nodes[i].port, decode_responses=True) for i in (0, 1))
    try:
        await b.register_model("m", 0)
        await b.admit(spec())
        assert len(await b.claim("m", "w", 1)) == 1  # a lease held: every key the claim names exists
        admitted = {(await b.admit(spec())).job_id for _ in range(2)}
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src.cluster("myid"))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst.cluster("myid"))
        claimed: set[str] = set()
        try:
            claimed |= {le.id for le in await b.claim("m", "w", 2)}
        except Unavailable:
            pass  # a clear error while the slot moves is fine; half a claim is not
        finally:
            for node in (src, dst):
                node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        claimed |= {le.id for le in await b.claim("m", "w", 2)}
        assert claimed == admitted
    finally:
        await b.drop_namespace()
        await b.close()


async def test_a_live_reshard_of_the_queues_slot_claims_every_job_once(redis_cluster: RedisCluster) -> None:
    """The queue's slot moves to another master key by key (MIGRATE, as ``redis-cli --cluster
    reshard`` does), with a claim, an admission and a completion between every two keys: each is
    whole or Unavailable, no MIGRATE meets a key a script created on the target (BUSYKEY), and
    once the slot has moved every admitted job has been claimed and completed exactly once,
    with the queue's counters at zero."""
    queue, slot = queue_on(redis_cluster, 0)
    b = Broker.from_settings(BrokerSettings(redis_url=redis_cluster.url, queue=queue, models=["m"]))
    src, dst = (redis_sync.Redis(port=redis_cluster.nodes[i].port, decode_responses=True) for i in (0, 1))
    dst_port = redis_cluster.nodes[1].port
    moved = False
    try:
        await b.register_model("m", 0)
        tenants = ("a", "b", "c")
        admitted = [
            (await b.admit(JobSpec(**{**spec().model_dump(), "tenant": tenants[i % 3], "priority": 3 + i % 2}))).job_id
            for i in range(9)
        ]
        # A lease held, so every key the claim names (KEYS) exists: Redis itself answers TRYAGAIN
        # for a script whose declared keys are partly missing on a moving slot, before it runs.
        held = await b.claim("m", "w", 1)
        claimed = [le.id for le in held]
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src.cluster("myid"))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst.cluster("myid"))
        done: list[str] = []
        unavailable = steps = 0
        # The order a reshard moves keys in is arbitrary; this one lets claims run on both sides:
        # half of the other keys first (the script runs on the source, some of its keys gone),
        # then the three it declares, then the rest (it runs on the target, some yet to arrive).
        k = Keys(queue)
        declared = [k.stats("m"), k.leases("m"), k.global_]
        others = sorted(set(src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10_000)) - set(declared))
        random.Random(7).shuffle(others)
        half = len(others) // 2
        for key in [*others[:half], *declared, *others[half:]]:
            src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", key)
            steps += 1
            try:  # a claim, an admission and a completion: each whole, or Unavailable
                got = await b.claim("m", "w", 1)
                claimed += [le.id for le in got]
                held += got
            except Unavailable as e:
                unavailable += 1
                log.info("cluster.reshard_claim_unavailable", step=steps, key=key, error=str(e)[:160])
            with contextlib.suppress(Unavailable):
                admitted.append((await b.admit(spec())).job_id)
            if held:
                with contextlib.suppress(Unavailable):
                    await b.complete(held[0], "length")
                    done.append(held.pop(0).id)
        assert src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        for n in redis_cluster.nodes:
            redis_sync.Redis(port=n.port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst.cluster("myid"))
        moved = True
        during = len(claimed) - 1
        while got := await b.claim("m", "w", 8):
            claimed += [le.id for le in got]
            held += got
        log.info("cluster.reshard", keys_moved=steps, claimed_during=during, unavailable=unavailable)
        assert sorted(claimed) == sorted(admitted)
        for lease in held:
            await b.complete(lease, "length")
            done.append(lease.id)
        stats = await b.queue_stats("m")
        assert stats.total_depth == 0 and sum(stats.queued_tokens.values()) == 0
        assert sorted(done) == sorted(claimed) and stats.running == 0
        for jid in admitted:
            assert (await b.get_job(jid)).status is JobStatus.SUCCEEDED
    finally:
        await b.drop_namespace()
        await b.close()
        if moved:  # the slot is empty again: give it back to its first owner
            assign_slot(redis_cluster, slot, 0)
        else:
            for node in (src, dst):
                node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
