"""OpenAI Files: upload (multipart, ``purpose=batch``), list, retrieve, content, delete.

Content goes to the file store (a local folder or an object store, ``batcher.storage``);
Redis keeps only the record. Another tenant's file does not exist for this key (404).
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from api.auth import Auth, Principal
from api.errors import bad_request, file_too_large, no_such, openapi_errors
from api.openai_schemas import openai_list
from api.runtime import Runtime, get_runtime, note
from batcher.storage import FileStore, TooLarge, store

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/files", tags=["files"])
RT = Annotated[Runtime, Depends(get_runtime)]
PURPOSES = ("batch",)
FILE_ID = re.compile(r"^file-[0-9a-z]{1,64}$")


def files(rt: Runtime) -> FileStore:
    return store(rt.settings.files_root)


def file_object(rec: dict[str, str]) -> dict[str, Any]:
    return {
        "id": rec["id"],
        "object": "file",
        "bytes": int(rec["bytes"]),
        "created_at": int(rec["created_at"]),
        "filename": rec["filename"],
        "purpose": rec["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


async def owned_file(rt: Runtime, who: Principal, file_id: str) -> dict[str, str]:
    rec = await rt.broker.batches.get_file(file_id, who.tenant) if FILE_ID.match(file_id) else None
    if rec is None:
        raise no_such("File", file_id, "file_id")
    return rec


@router.post("", responses=openapi_errors(400, 401, 413))
async def upload_file(
    request: Request, who: Auth, rt: RT, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    """Upload a JSONL file for a batch (`purpose=batch`), up to the size limit (`GENQ_MAX_FILE_BYTES`)."""
    if purpose not in PURPOSES:
        raise bad_request(f"purpose must be 'batch' (the only purpose genq serves), got {purpose[:40]!r}.", "purpose")
    file_id = "file-" + secrets.token_hex(12)
    note(request, file_id=file_id)
    try:
        size = await files(rt).put(file_id, file.file, rt.settings.max_file_bytes)
    except TooLarge:
        raise file_too_large(rt.settings.max_file_bytes) from None
    rec = {
        "id": file_id,
        "tenant": who.tenant,
        "purpose": purpose,
        "filename": (file.filename or "upload.jsonl")[:256],
        "bytes": size,
        "created_at": int(time.time()),
        "path": file_id,
    }
    await rt.broker.batches.put_file(rec)
    log.info("file uploaded", file_id=file_id, bytes=size, tenant=who.tenant)
    return file_object({k: str(v) for k, v in rec.items()})


@router.get("", responses=openapi_errors(400, 401))
async def list_files(
    who: Auth,
    rt: RT,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["desc"] = "desc",
) -> dict[str, Any]:
    """The caller's files, newest first; `after` is the last id of the previous page."""
    page = await rt.broker.batches.list_files(who.tenant, limit, after, purpose)
    data = [file_object(r) for r in page.items]
    return openai_list(data, page.has_more)


@router.get("/{file_id}", responses=openapi_errors(401, 404))
async def get_file(file_id: str, who: Auth, rt: RT) -> dict[str, Any]:
    return file_object(await owned_file(rt, who, file_id))


@router.get("/{file_id}/content", responses=openapi_errors(401, 404))
async def file_content(file_id: str, who: Auth, rt: RT) -> StreamingResponse:
    rec = await owned_file(rt, who, file_id)
    return StreamingResponse(
        files(rt).stream(rec["path"]),
        media_type="application/octet-stream",
        headers={"Content-Length": rec["bytes"]},
    )


@router.delete("/{file_id}", responses=openapi_errors(401, 404))
async def delete_file(file_id: str, who: Auth, rt: RT) -> dict[str, Any]:
    rec = await owned_file(rt, who, file_id)
    await rt.broker.batches.delete_file(file_id, who.tenant)
    await files(rt).delete(rec["path"])
    return {"id": file_id, "object": "file", "deleted": True}
