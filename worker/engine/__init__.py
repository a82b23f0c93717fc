"""Inference engines behind one interface (see :mod:`worker.engine.base`).

vLLM is imported only when a ``vllm`` engine is opened, so the simulated
engine works without it.
"""

from __future__ import annotations

from worker.engine.base import (
    Delta,
    Engine,
    EngineArgsError,
    EngineDeadError,
    EngineError,
    EngineSettings,
    EngineStats,
    GenRequest,
    InvalidRequestError,
    PromptTooLongError,
)

__all__ = [
    "Delta",
    "Engine",
    "EngineArgsError",
    "EngineDeadError",
    "EngineError",
    "EngineSettings",
    "EngineStats",
    "GenRequest",
    "InvalidRequestError",
    "PromptTooLongError",
    "open_engine",
]


async def open_engine(settings: EngineSettings) -> Engine:
    """Build and start the engine ``settings`` describe; close it when done.

    The result is also an async context manager whose exit closes it:
    ``async with await open_engine(settings) as engine: ...``.
    """
    if settings.kind == "simulated":
        from worker.engine.simulated import SimulatedEngine

        engine: Engine = SimulatedEngine(settings)
    elif settings.kind == "vllm":
        from worker.engine.vllm_engine import VllmEngine

        engine = VllmEngine(settings)
    else:  # pragma: no cover - pydantic rejects other kinds
        raise ValueError(f"unknown engine kind {settings.kind!r}")
    await engine.start()
    return engine
