"""OpenAI Batches: create, retrieve, list, cancel. The batcher (``genq batcher``) does the work.

Creating a batch only records it (``validating``); a batcher's sweep picks it up within a
second, validates its file, feeds its lines at batch priority and writes the output and
error files. Statuses, ``request_counts`` and ``errors`` are OpenAI's.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Auth, Principal
from api.errors import bad_request, batch_not_cancellable, no_such, openapi_errors
from api.openai_schemas import Metadata, openai_list
from api.routes_files import owned_file
from api.runtime import Runtime, get_runtime, note
from api.service import checked_webhook_url
from batcher.lines import ENDPOINTS
from broker.batches import BatchStatusConflict
from broker.contract import Webhook
from broker.models import TenantLimits

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/batches", tags=["batches"])
RT = Annotated[Runtime, Depends(get_runtime)]
BATCH_ID = re.compile(r"^batch_[0-9a-f]{32}$")
WINDOWS = ("24h",)
TIMES = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: str
    completion_window: str = "24h"
    metadata: Metadata | None = Field(None, max_length=16)
    # genq: where the batch's terminal state is POSTed, signed; default: the tenant's
    webhook_url: str | None = Field(None, min_length=1, max_length=2048)


def batch_object(rec: dict[str, str]) -> dict[str, Any]:

    def opt_int(f: str) -> int | None:
        return int(rec[f]) if rec.get(f) else None

    return {
        "id": rec["id"],
        "object": "batch",
        "endpoint": rec["endpoint"],
        "errors": json.loads(rec["errors"]) if rec.get("errors") else None,
        "input_file_id": rec["input_file_id"],
        "completion_window": rec["completion_window"],
        "status": rec["status"],
        "output_file_id": rec.get("output_file_id") or None,
        "error_file_id": rec.get("error_file_id") or None,
        "created_at": int(rec["created_at"]),
        "expires_at": int(float(rec["expires_at"])),
        **{f"{t}_at": opt_int(f"{t}_at") for t in TIMES},
        "request_counts": {
            "total": int(rec.get("total") or 0),
            "completed": int(rec.get("completed") or 0),
            "failed": int(rec.get("failed") or 0),
        },
        "metadata": json.loads(rec["metadata"]) if rec.get("metadata") else None,
        "webhook": hook.view() if (hook := Webhook.from_hash(rec)) else None,
    }


async def owned_batch(rt: Runtime, who: Principal, batch_id: str) -> dict[str, str]:
    rec = await rt.broker.batches.get_batch(batch_id, who.tenant) if BATCH_ID.match(batch_id) else None
    if rec is None:
        raise no_such("Batch", batch_id, "batch_id")
    return rec


@router.post("", responses=openapi_errors(400, 401, 404))
async def create_batch(body: BatchRequest, request: Request, who: Auth, rt: RT) -> dict[str, Any]:
    """Run every request of an uploaded JSONL file (`purpose=batch`) at batch priority."""
    if body.endpoint not in ENDPOINTS:
        raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {body.endpoint[:80]!r}.", "endpoint")
    if body.completion_window not in WINDOWS:
        raise bad_request(f"completion_window must be '24h', got {body.completion_window[:20]!r}.", "completion_window")
    f = await owned_file(rt, who, body.input_file_id)
    if f["purpose"] != "batch":
        raise bad_request(
            f"The file {f['id']} has purpose '{f['purpose']}'; a batch's input needs purpose 'batch'.",
            "input_file_id",
        )
    webhook_url = await checked_webhook_url(rt, body.webhook_url)
    if webhook_url is None:
        webhook_url = (await rt.broker.get_tenant(who.tenant) or TenantLimits()).webhook_url
    now = time.time()
    batch_id = "batch_" + secrets.token_hex(16)
    note(request, batch_id=batch_id)
    rec: dict[str, Any] = {
        "id": batch_id,
        "tenant": who.tenant,
        "status": "validating",
        "endpoint": body.endpoint,
        "input_file_id": f["id"],
        "completion_window": body.completion_window,
        "created_at": int(now),
        "expires_at": f"{now + rt.settings.batch_window_s:.3f}",
        "total": 0,
        "completed": 0,
        "failed": 0,
        "next_line": 0,
        "epoch": 0,
    }
    if body.metadata:
        rec["metadata"] = json.dumps(body.metadata)
    if webhook_url:
        rec["webhook"] = webhook_url
    await rt.broker.batches.create_batch(rec)
    log.info("batch created", batch_id=batch_id, tenant=who.tenant, input_file_id=f["id"])
    return batch_object({k: str(v) for k, v in rec.items()})


@router.get("", responses=openapi_errors(400, 401))
async def list_batches(
    who: Auth, rt: RT, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    """The caller's batches, newest first; `after` is the last id of the previous page."""
    page = await rt.broker.batches.list_batches(who.tenant, limit, after)
    data = [batch_object(r) for r in page.items]
    return openai_list(data, page.has_more)


@router.get("/{batch_id}", responses=openapi_errors(401, 404))
async def get_batch(batch_id: str, who: Auth, rt: RT) -> dict[str, Any]:
    return batch_object(await owned_batch(rt, who, batch_id))


@router.post("/{batch_id}/cancel", responses=openapi_errors(401, 404, 409))
async def cancel_batch(batch_id: str, who: Auth, rt: RT) -> dict[str, Any]:
    """Stop a batch: `cancelling` at once, `cancelled` once its batcher has kept the finished lines."""
    await owned_batch(rt, who, batch_id)
    try:
        await rt.broker.batches.update(
            batch_id,
            allowed=("validating", "in_progress"),
            set={"status": "cancelling", "cancelling_at": int(time.time())},
        )
    except BatchStatusConflict as e:
        if e.status not in ("cancelling", "cancelled"):  # cancelling twice is not an error
            raise batch_not_cancellable(batch_id, e.status) from None
    return batch_object(await owned_batch(rt, who, batch_id))
