"""Harness for the API tests: a real uvicorn server on a free port and a real worker (simulated engine).

Both run in background threads with their own event loops, so the official
``openai`` client (sync and async), httpx streaming and real TCP disconnects are
exercised. Imported by the ``test_api_*`` modules; it holds no tests itself.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

from api.app import create_app
from api.auth import create_key
from api.server import uvicorn_options
from api.settings import ApiSettings
from broker import Broker, BrokerSettings
from broker.client import OutputWrite
from broker.models import Lease, TenantLimits

ADMIN_KEY = "gq-admin-" + secrets.token_hex(16)
SIM_STEP_MS = 2.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An event loop in a thread: runs the worker and the tests' set-up coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class LiveServer:
    """uvicorn serving the app in a thread; ``started`` is uvicorn's own flag (no event exists for it)."""

    def __init__(self, settings: ApiSettings) -> None:
        self.port = _free_port()
        self.app = create_app(settings)
        options = {**uvicorn_options(settings), "timeout_graceful_shutdown": 2}  # as `genq api` serves
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, lifespan="on", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class WorkerHandle:
    """The real worker loop (worker.loop.Worker) on the simulated engine, in the loop thread."""

    def __init__(self, portal: LoopThread, settings: BrokerSettings, model: str, **engine: Any) -> None:
        self.portal, self.settings, self.model, self.engine_kw = portal, settings, model, engine
        self.task: Any = None

    def start(self) -> None:
        from worker.engine.base import EngineSettings
        from worker.engine.simulated import SimulatedEngine
        from worker.loop import Worker
        from worker.settings import WorkerSettings

        async def main(ready: asyncio.Event) -> int:
            self.stop_event = asyncio.Event()
            es = {"sim_step_ms": SIM_STEP_MS, "sim_step_ms_per_seq": 0.0, "max_num_seqs": 16, **self.engine_kw}
            broker = Broker.from_settings(self.settings)
            async with SimulatedEngine(EngineSettings(kind="simulated", served_model_name=self.model, **es)) as eng:
                ws = WorkerSettings(
                    engine="simulated",
                    served_model_name=self.model,
                    heartbeat_s=0.5,
                    flush_interval_ms=5,
                    drain_grace_s=2,
                )
                self.worker = Worker(broker, eng, ws, self.stop_event)
                run = asyncio.create_task(self.worker.run())
                await asyncio.wait(
                    {run, asyncio.create_task(self.worker.started.wait())}, return_when=asyncio.FIRST_COMPLETED
                )
                # its first heartbeat is written by a task of its own, with no event to wait on
                while not run.done() and self.worker.id not in {w["id"] for w in await broker.workers()}:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                ready.set()
                try:
                    return await run
                finally:
                    await broker.close()

        async def launch() -> None:
            ready = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(main(ready))
            async with asyncio.timeout(20):
                await ready.wait()

        self.portal.run(launch())

    def stop(self) -> None:
        async def halt() -> None:
            self.stop_event.set()
            async with asyncio.timeout(20):
                await self.task

        self.portal.run(halt())


@dataclass
class Stack:
    settings: ApiSettings
    portal: LoopThread
    server: LiveServer
    workers: list[WorkerHandle] = field(default_factory=list)
    admin_key: str = ADMIN_KEY

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, fn: Callable[[Broker], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``fn(broker)`` against this stack's Redis namespace (from a sync test)."""

        async def go() -> Any:
            async with Broker.from_settings(self.settings) as b:
                return await fn(b)

        return self.portal.run(go())

    def key(self, tenant: str, limits: TenantLimits | None = None, *, admin: bool = False) -> str:
        async def make(b: Broker) -> str:
            if limits is not None:
                await b.set_tenant(tenant, limits)
            return await create_key(b, tenant, f"test-{tenant}", admin)

        return self.call(make)

    def add_worker(self, model: str = "m", **engine: Any) -> WorkerHandle:
        w = WorkerHandle(self.portal, self.settings, model, **engine)
        w.start()
        self.workers.append(w)
        return w


class HandWorker:
    """A worker the test plays by hand through the broker: a heartbeat, then claims and tokens on cue.

    For tests that must control when a job starts and when each token is written.
    """

    def __init__(self, stack: Stack, model: str, worker_id: str = "w-hand") -> None:
        self.stack, self.model, self.id = stack, model, worker_id
        self.heartbeat()

    def heartbeat(self) -> None:
        record = {"model": self.model, "state": "running", "capacity": 1}
        self.stack.call(lambda b: b.heartbeat(self.id, record))

    def claim(self, n: int = 1) -> list[Lease]:
        return self.stack.call(lambda b: b.claim(self.model, self.id, n))

    def token(self, lease: Lease, text: str, token_id: int = 1) -> None:
        ok = self.stack.call(lambda b: b.append_many([OutputWrite(lease.id, lease.fence, text, [token_id])]))
        assert ok == {lease.id: True}

    def finish(self, lease: Lease, finish_reason: str = "stop") -> None:
        self.stack.call(lambda b: b.complete(lease, finish_reason))


def api_settings(base: BrokerSettings, **overrides: Any) -> ApiSettings:
    values = {**base.model_dump(), "admin_key": ADMIN_KEY, "position_interval_s": 0.2, **overrides}
    return ApiSettings(**values)


@pytest.fixture
def make_stack(settings: BrokerSettings) -> Iterator[Callable[..., Stack]]:
    """``make_stack(worker=True, **api_overrides)``: server (+ one simulated worker on model "m")."""
    made: list[Stack] = []
    extra_queues: list[str] = []
    portal = LoopThread()

    def make(*, worker: bool = True, fresh_queue: bool = False, **overrides: Any) -> Stack:
        """``fresh_queue``: a namespace of its own (for global limits), dropped at the end."""
        base = settings
        if fresh_queue:
            base = settings.model_copy(update={"queue": "t" + secrets.token_hex(6)})
            extra_queues.append(base.queue)
        s = api_settings(base, **overrides)
        server = LiveServer(s)
        server.start()
        stack = Stack(s, portal, server)
        made.append(stack)
        if worker:
            stack.add_worker("m")
        return stack

    yield make
    for stack in made:
        for w in stack.workers:
            w.stop()
        stack.server.stop()
    for queue in extra_queues:
        portal.run(_drop(settings.model_copy(update={"queue": queue})))
    portal.close()


async def _drop(settings: BrokerSettings) -> None:
    async with Broker.from_settings(settings) as b:
        await b.drop_namespace()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
