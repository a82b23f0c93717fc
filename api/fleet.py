"""What one API process knows of the live workers, cached for a second.

Every submit and every view of a queued job (a position tick of thousands of
followers included) asks "does a live worker serve this model?"; a cache of
``TTL_S`` makes that cost no Redis call most of the time. Callers that must not
act on a stale answer pass ``fresh=True``. The registered models (their
``max_model_len``), read by every submit, are cached the same way; a model not in
the cache is looked up at once (a worker that just registered it is seen).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from broker.client import Broker

TTL_S = 1.0


class Fleet:
    def __init__(self, broker: Broker, worker_max_age_ms: int) -> None:
        self._broker, self._max_age_ms = broker, worker_max_age_ms
        self._workers: Counter[str] = Counter()
        self._workers_at = -TTL_S
        self._models: dict[str, dict[str, Any]] = {}
        self._models_at = -TTL_S

    async def model(self, name: str) -> dict[str, Any] | None:
        """The registration of model ``name`` (None: not registered)."""
        now = time.monotonic()
        if name not in self._models or now - self._models_at >= TTL_S:
            self._models = await self._broker.models()
            self._models_at = now
        return self._models.get(name)

    async def workers(self, model: str, *, fresh: bool = False) -> int:
        """Live workers taking new jobs of ``model`` (a draining worker takes none)."""
        return (await self.counts(fresh=fresh))[model]

    async def counts(self, *, fresh: bool = False) -> Counter[str]:
        """Live workers per model."""
        now = time.monotonic()
        if fresh or now - self._workers_at >= TTL_S:
            records = await self._broker.workers(self._max_age_ms)
            self._workers = Counter(str(w["model"]) for w in records if w.get("model") and w.get("state") != "draining")
            self._workers_at = now
        return self._workers
