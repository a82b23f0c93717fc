"""A worker told to stop while Redis is down exits within its bounds, and logs little.

Each test runs its own redis-server, gives an in-process worker (simulated engine)
long-running jobs, kills Redis, then stops the worker: the drain lasts at most
``drain_grace_s``, the hand-back and the final flush at most ``HANDBACK_TIMEOUT_S``
(the leases then lapse and the jobs are retried elsewhere), and a second stop
(``force``) cuts every wait.  The log lines written while Redis is down stay few.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable

import pytest
import structlog
from structlog.testing import capture_logs

from broker import Broker, BrokerSettings
from tests.conftest import RedisServer
from tests.test_worker_sim import admit, sim_engine, spec, worker_settings
from worker.loop import EXIT_OK, HANDBACK_TIMEOUT_S, Worker

DRAIN_S = 2.0
log = structlog.get_logger(__name__)


@pytest.fixture
async def down_broker(redis_server: Callable[..., RedisServer]) -> AsyncIterator[tuple[Broker, RedisServer]]:
    srv = redis_server()
    b = Broker.from_settings(BrokerSettings(redis_url=srv.url, queue="t" + secrets.token_hex(6), models=["m"]))
    await b.register_model("m", 4096)
    yield b, srv
    await b.close()


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


async def start_then_kill_redis(broker: Broker, srv: RedisServer, worker: Worker, jobs: int = 4) -> None:
    """Jobs running (for minutes), some output written, then Redis gone."""
    await admit(broker, [spec(i, max_tokens=2000) for i in range(jobs)])
    await wait_for(lambda: len(worker.runs) == jobs, 10, "jobs claimed")
    await wait_for(lambda: worker.streamer.flushes > 2, 10, "output written")
    srv.stop(kill=True)


async def test_stop_with_redis_down_exits_within_drain_and_handback(down_broker: tuple[Broker, RedisServer]) -> None:
    broker, srv = down_broker
    async with sim_engine(capacity=4, step_ms=20) as engine:
        w = Worker(broker, engine, worker_settings(drain_grace_s=DRAIN_S))
        with capture_logs() as logs:
            task = asyncio.create_task(w.run())
            await asyncio.wait_for(w.started.wait(), 5)
            await start_then_kill_redis(broker, srv, w)
            down = len(logs)
            await asyncio.sleep(3.0)  # the worker carries on with Redis away for a while (the figure: log lines)
            t0 = time.monotonic()
            w.stop()
            try:
                code = await asyncio.wait_for(task, DRAIN_S + 5)
            finally:
                took = time.monotonic() - t0
        assert code == EXIT_OK
        assert took < DRAIN_S + HANDBACK_TIMEOUT_S + 1.0
        lines = logs[down:]
        assert len(lines) < 30, [e["event"] for e in lines]
        tracebacks = [e for e in lines if e.get("exc_info")]
        assert len(tracebacks) <= len({e["event"] for e in tracebacks})  # at most one per loop
        assert any(e["event"] == "worker.gave_up_on_redis" for e in lines)
        log.info("figures", stop_s=round(took, 2), lines_while_down=len(lines))


async def test_second_stop_cuts_every_wait(down_broker: tuple[Broker, RedisServer]) -> None:
    broker, srv = down_broker
    async with sim_engine(capacity=4, step_ms=20) as engine:
        w = Worker(broker, engine, worker_settings(drain_grace_s=DRAIN_S))
        with capture_logs():
            task = asyncio.create_task(w.run())
            await asyncio.wait_for(w.started.wait(), 5)
            await start_then_kill_redis(broker, srv, w)
            w.stop()
            await asyncio.sleep(DRAIN_S + 0.5)  # past the drain: the hand-back is waiting on Redis
            assert not task.done()
            t0 = time.monotonic()
            w.stop(force=True)
            try:
                code = await asyncio.wait_for(task, 5)
            finally:
                took = time.monotonic() - t0
        assert code == EXIT_OK
        assert took < 1.0, took
        log.info("figures", forced_stop_s=round(took, 2))


async def test_second_stop_during_drain(down_broker: tuple[Broker, RedisServer]) -> None:
    broker, srv = down_broker
    async with sim_engine(capacity=4, step_ms=20) as engine:
        w = Worker(broker, engine, worker_settings(drain_grace_s=30.0))
        with capture_logs():
            task = asyncio.create_task(w.run())
            await asyncio.wait_for(w.started.wait(), 5)
            await start_then_kill_redis(broker, srv, w)
            t0 = time.monotonic()
            w.stop()
            await asyncio.sleep(0.3)
            w.stop(force=True)
            try:
                code = await asyncio.wait_for(task, 10)
            finally:
                took = time.monotonic() - t0
        assert code == EXIT_OK
        assert took < 0.3 + 3.0, took  # one write attempt at most, not the 30 s drain
        log.info("figures", forced_in_drain_s=round(took, 2))
