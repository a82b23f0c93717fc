"""The worker process: settings, logging, broker, engine, signals, exit code.

Started by ``python -m worker.main`` or ``genq worker`` (same flags, see
:mod:`worker.cli`, which calls :func:`run`).  SIGTERM or SIGINT stops claiming and drains
for ``drain_grace_s``; a second signal hands the running jobs back at once.

Exit codes: 0 drained and stopped; 1 the engine died (its jobs were handed
back) or the worker crashed; 2 start-up failed (bad settings or engine arguments, Redis
unreachable or misconfigured, engine would not load).  Engine arguments are checked first,
before Redis is contacted or an engine is built.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from pydantic import ValidationError

from broker.client import Broker
from broker.errors import RedisMisconfigured
from broker.logs import configure_logging
from broker.settings import BrokerSettings
from worker.engine import EngineArgsError, open_engine
from worker.loop import Worker
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

EXIT_CRASHED = 1
EXIT_STARTUP = 2


async def serve(settings: WorkerSettings, broker_settings: BrokerSettings) -> int:
    """Open the broker and the engine, run one worker until a signal, close both."""
    stop = asyncio.Event()
    worker: Worker | None = None
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() and worker is not None:
            log.warning("second signal: handing running jobs back now", signal=sig.name)
            worker.stop(force=True)
        else:
            log.info("signal: draining", signal=sig.name, grace_s=settings.drain_grace_s)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    try:
        engine_settings = settings.engine_settings()
    except (EngineArgsError, ValidationError) as e:
        log.error("worker.bad_engine_settings", error=str(e))
        return EXIT_STARTUP

    broker = Broker.from_settings(broker_settings)
    try:
        try:
            await broker.check_server()
        except RedisMisconfigured as e:
            log.error("worker.redis_misconfigured", error=str(e))
            return EXIT_STARTUP
        except Exception as e:  # noqa: BLE001 - connection refused, auth, DNS...
            log.error("worker.redis_unreachable", url=broker_settings.redis_url, error=str(e))
            return EXIT_STARTUP
        log.info("worker.engine_opening", engine=engine_settings.kind, model=engine_settings.model)
        try:
            engine = await open_engine(engine_settings)
        except EngineArgsError as e:  # vLLM refused the configuration: no traceback needed
            log.error("worker.engine_refused_configuration", engine=engine_settings.kind, error=str(e))
            return EXIT_STARTUP
        except Exception:
            log.exception("worker.engine_failed_to_start", engine=engine_settings.kind)
            return EXIT_STARTUP
        try:
            worker = Worker(broker, engine, settings, stop)
            return await worker.run()
        except Exception:
            log.exception("worker.crashed")
            return EXIT_CRASHED
        finally:
            await engine.close()
    finally:
        await broker.close()


def run(settings: WorkerSettings, broker_settings: BrokerSettings | None = None) -> int:
    configure_logging(settings.json_logs, settings.log_level)
    return asyncio.run(serve(settings, broker_settings or BrokerSettings()))
