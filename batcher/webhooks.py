"""Webhook delivery: the arq function that POSTs a finished job or batch, and the drain that feeds it.

- :func:`drain` (a task of each batcher) blocks on the webhooks due (``broker.webhooks``) and
  enqueues one arq job per entry, with an id derived from the job or batch id, so a replayed
  entry is not queued twice while its delivery is pending; it acknowledges an entry only once
  the delivery is queued, and claims the entries of a batcher that died before doing so.
- :meth:`Deliverer.deliver` (arq ``deliver_webhook``) POSTs ``{type, timestamp, data}`` (data:
  the object as ``GET /v1/jobs/{id}`` or ``GET /v1/batches/{id}`` shows it, without its
  ``webhook`` field), signed as the Standard Webhooks spec says (``webhook-id``,
  ``webhook-timestamp``, ``webhook-signature``: HMAC-SHA256 with the tenant's secret). Any 2xx
  answer delivers it; otherwise it is retried with exponential backoff (arq's ``Retry``) up to
  ``GENQ_WEBHOOK_MAX_ATTEMPTS``. Each attempt is recorded on the object before the next; the
  object's own result is unaffected either way. It checks the record first, so a delivery
  that already ended (delivered or given up) is never repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog
from arq import ArqRedis, Retry
from standardwebhooks.webhooks import Webhook as Signer

from api.routes_batches import batch_object
from api.service import job_view
from batcher.settings import BatcherSettings
from batcher.webhook_urls import UrlRefused, check_url, pinned
from broker import Broker
from broker import errors as be
from broker.contract import Webhook, WebhookKind, WebhookState

log = structlog.get_logger(__name__)

FUNCTION = "deliver_webhook"
RECLAIM_IDLE_MS = 30_000  # an entry read this long ago and not acknowledged: its batcher died
RECLAIM_EVERY_S = 10.0


def arq_job_id(kind: WebhookKind, object_id: str) -> str:
    return f"webhook:{kind.value}:{object_id}"


def _ms_to_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


class Deliverer:
    """What one batcher process shares between deliveries."""

    def __init__(self, broker: Broker, settings: BatcherSettings, http: httpx.AsyncClient) -> None:
        self.broker, self.settings, self.http = broker, settings, http

    async def _target(self, kind: WebhookKind, object_id: str) -> tuple[str, Webhook, dict[str, Any]] | None:
        """(tenant, webhook, payload) of a finished job or batch; None when it is gone or has no webhook."""
        if kind is WebhookKind.JOB:
            try:
                job = await self.broker.get_job(object_id)
            except be.NotFound:
                return None
            if job.webhook is None:
                return None
            data = job_view(job)
            event, at_ms = f"job.{job.status.value}", job.finished_ms or job.created_ms
            tenant, hook = job.tenant, job.webhook
        else:
            rec = await self.broker.batches.get_batch(object_id)
            batch_hook = Webhook.from_hash(rec) if rec else None
            if rec is None or batch_hook is None:
                return None
            data = batch_object(rec)
            status = data["status"]
            event, at_ms = f"batch.{status}", 1000 * int(data.get(f"{status}_at") or data["created_at"])
            tenant, hook = rec["tenant"], batch_hook
        data.pop("webhook", None)
        return tenant, hook, {"type": event, "timestamp": _ms_to_iso(at_ms), "data": data}

    def _backoff_s(self, attempts: int) -> float:
        s = self.settings
        return float(min(s.webhook_backoff_max_s, s.webhook_backoff_s * 2 ** max(0, attempts - 1)))

    async def _post(
        self, url: str, addresses: list[str], msg_id: str, body: str, secret: str
    ) -> tuple[int | None, str | None]:
        """(status code, error) of one POST to the checked ``addresses``; the answer's body is never read."""
        target, host, extensions = pinned(url, addresses)
        now = datetime.now(UTC)
        headers = {
            **host,
            "content-type": "application/json",
            "user-agent": "genq-webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Signer(secret).sign(msg_id, now, body),
        }
        request = self.http.build_request("POST", target, content=body.encode(), headers=headers, extensions=extensions)
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):  # the whole attempt, not each phase
                async with contextlib.aclosing(await self.http.send(request, stream=True)) as answer:
                    return answer.status_code, None
        except TimeoutError:
            return None, f"no answer within {self.settings.webhook_timeout_s:g} s"
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"[:300]

    async def deliver(self, kind: WebhookKind, object_id: str) -> str:
        """One attempt; raises arq's Retry while attempts remain and it failed. Returns the state."""
        target = await self._target(kind, object_id)
        if target is None:
            return "gone"
        tenant, hook, payload = target
        if hook.finished:
            return hook.state.value  # a replay: this delivery already ended
        attempts = list(hook.attempts)
        at_ms, start = time.time_ns() // 1_000_000, time.monotonic()
        code: int | None = None
        error: str | None = None
        refused = False
        addresses: list[str] = []
        try:
            addresses = await check_url(hook.url, allow_private=self.settings.webhooks_allow_private)
        except UrlRefused as e:  # what the name resolves to changed since submission
            error, refused = str(e), True
        if not refused:
            secret = await self.broker.webhooks.secret(tenant)
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
            code, error = await self._post(hook.url, addresses, f"msg_{object_id}", body, secret)
            if code is not None and not 200 <= code < 300:
                error = f"HTTP {code}"
        attempts.append(
            {
                "at_ms": at_ms,
                "status_code": code,
                "error": error,
                "duration_ms": round(1000 * (time.monotonic() - start)),
            }
        )
        if error is None:
            state = WebhookState.DELIVERED
        elif refused or len(attempts) >= self.settings.webhook_max_attempts:
            state = WebhookState.FAILED
        else:
            state = WebhookState.PENDING
        await self.broker.webhooks.note(kind, object_id, attempts, state)
        log.info(
            "webhook attempt",
            kind=kind.value,
            id=object_id,
            attempt=len(attempts),
            status_code=code,
            error=error,
            state=state.value,
        )
        if state is WebhookState.PENDING:
            raise Retry(defer=self._backoff_s(len(attempts)))
        return state.value


async def deliver_webhook(ctx: dict[str, Any], kind: str, object_id: str) -> str:
    state: str = await ctx["webhooks"].deliver(WebhookKind(kind), object_id)
    return state


async def drain(broker: Broker, arq: ArqRedis, consumer: str, block_ms: int = 1000) -> None:
    """Forever: hand each webhook due to arq (see the module docstring). Runs until cancelled."""
    loop = asyncio.get_running_loop()
    reclaim_at = 0.0
    down = True  # first make sure the consumer group exists
    while True:
        try:
            if down:
                await broker.webhooks.ensure_group()
                down = False
            due = await broker.webhooks.due(consumer, block_ms)
            if loop.time() >= reclaim_at:
                due += await broker.webhooks.reclaim(consumer, RECLAIM_IDLE_MS)
                reclaim_at = loop.time() + RECLAIM_EVERY_S
            for d in due:
                await arq.enqueue_job(FUNCTION, d.kind.value, d.object_id, _job_id=arq_job_id(d.kind, d.object_id))
            await broker.webhooks.done([d.entry_id for d in due])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # Redis away: entries stay pending and are read again  # noqa: BLE001
            if not down:
                log.warning("webhook drain failed; retrying", error=f"{type(e).__name__}: {e}")
            down = True
            await asyncio.sleep(1.0)  # Redis is away: there is no event to wait on
