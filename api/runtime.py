"""What one API process holds open while it runs, handed to routes as a dependency."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fastapi import Request

from api.errors import too_many_streams
from api.fleet import Fleet
from api.metrics import ApiMetrics
from api.orphans import Orphans
from api.settings import ApiSettings
from api.tokens import TokenCounter
from broker.client import Broker
from broker.events import EventHub


class StreamSlot:
    """One open SSE stream of a tenant; ``release`` is idempotent."""

    def __init__(self, owner: StreamSlots, tenant: str) -> None:
        self._owner, self._tenant, self._held = owner, tenant, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._owner.release(self._tenant)


class StreamSlots:
    """Open SSE streams per tenant in this process (the limit is per API process)."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self.open: Counter[str] = Counter()

    def acquire(self, tenant: str) -> StreamSlot:
        if self.open[tenant] >= self.per_tenant:
            raise too_many_streams(self.per_tenant)
        self.open[tenant] += 1
        return StreamSlot(self, tenant)

    def release(self, tenant: str) -> None:
        self.open[tenant] -= 1
        if self.open[tenant] <= 0:
            del self.open[tenant]


@dataclass(slots=True)
class Runtime:
    settings: ApiSettings
    broker: Broker
    hub: EventHub
    tokens: TokenCounter = field(default_factory=TokenCounter)
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    streams: StreamSlots = field(default_factory=lambda: StreamSlots(64))
    fleet: Fleet = field(init=False)
    orphans: Orphans = field(init=False)

    def __post_init__(self) -> None:
        self.fleet = Fleet(self.broker, self.settings.worker_max_age_ms)
        self.orphans = Orphans(self.broker, self.settings.reattach_grace_s)


async def get_runtime(request: Request) -> Runtime:
    rt: Runtime = request.state.rt
    return rt


def note(request: Request, **fields: object) -> None:
    """Add fields (tenant, job id) to this request's access-log line."""
    request.scope.setdefault("genq.log", {}).update(fields)
