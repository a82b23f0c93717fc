"""OpenAI-compatible endpoints, served THROUGH THE QUEUE: admit a job, then follow its events.

A client that disconnects cancels its job, unless it asked for background mode
(``X-Background: true`` or ``"background": true``), which answers 202 with the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.auth import Auth, Principal
from api.errors import ApiError, client_closed, from_broker, from_job_end, openapi_errors, sync_timeout
from api.openai_schemas import (
    ChatCompletionRequest,
    ChatFormatter,
    CompletionFormatter,
    CompletionRequest,
    Formatter,
    usage_dict,
)
from api.runtime import Runtime, get_runtime
from api.service import accepted_view, admit, priority_header
from api.streams import SlotEventSourceResponse, follow, open_slot, shielded
from broker import errors as be
from broker.contract import EventType
from broker.events import Event

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])
RT = Annotated[Runtime, Depends(get_runtime)]


def _background(request: Request, body: ChatCompletionRequest | CompletionRequest) -> bool:
    return body.background or request.headers.get("x-background", "").lower() in ("1", "true", "yes")


async def _cancel_quietly(rt: Runtime, job_id: str, tenant: str) -> None:
    with contextlib.suppress(be.NotFound, be.AlreadyTerminal):
        await rt.broker.cancel(job_id, tenant)
        log.info("job cancelled: nobody is waiting for it any more", job_id=job_id)


async def _terminal_event(rt: Runtime, job_id: str, model: str) -> Event:
    async with contextlib.aclosing(follow(rt, job_id)) as events:
        async for ev in events:
            if ev is not None and ev.type is EventType.RETRY:
                rt.metrics.retry_seen(model, job_id, ev.id)
            if ev is not None and ev.terminal:
                return ev
    raise be.BrokerError(f"event stream of {job_id} ended without a terminal event")


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(
    rt: Runtime, request: Request, who: Principal, job_id: str, model: str, fmt: Formatter, headers: dict[str, str]
) -> JSONResponse:
    waiter = asyncio.create_task(_terminal_event(rt, job_id, model))
    gone = asyncio.create_task(_client_gone(request))
    try:
        done, _ = await asyncio.wait(
            {waiter, gone}, timeout=rt.settings.sync_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
        if not waiter.done():
            waiter.cancel()
    if waiter not in done:
        await _cancel_quietly(rt, job_id, who.tenant)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await waiter  # let it unsubscribe
        if gone in done:
            return client_closed().response()
        raise sync_timeout(rt.settings.sync_timeout_s)
    ev = waiter.result()
    if ev.type is not EventType.DONE:
        raise from_job_end(ev.type, ev.data)
    job = await rt.broker.get_job(job_id)
    rt.metrics.job_finished(job)
    usage = usage_dict(job.prompt_tokens, job.completion_tokens)
    return JSONResponse(fmt.full(job.output, ev.data.get("finish_reason") or job.finish_reason, usage), headers=headers)


async def _chunks(rt: Runtime, who: Principal, job_id: str, model: str, fmt: Formatter) -> AsyncIterator[str]:
    finished = False
    try:
        for c in fmt.start():
            yield json.dumps(c)
        async with contextlib.aclosing(follow(rt, job_id)) as events:
            async for ev in events:
                if ev is None:
                    continue
                if ev.type is EventType.TOKEN and ev.data.get("text"):
                    yield json.dumps(fmt.delta(ev.data["text"]))
                elif ev.type is EventType.RETRY:
                    rt.metrics.retry_seen(model, job_id, ev.id)
                elif ev.type is EventType.DONE:
                    finished = True
                    yield json.dumps(fmt.finish(ev.data.get("finish_reason") or "stop"))
                    if fmt.include_usage:
                        u = ev.data.get("usage") or {}
                        yield json.dumps(
                            fmt.usage_chunk(usage_dict(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)))
                        )
                    rt.metrics.job_finished(await rt.broker.get_job(job_id))
                elif ev.terminal:
                    finished = True
                    yield json.dumps(from_job_end(ev.type, ev.data).body())
        yield "[DONE]"
    finally:
        if not finished:  # client went away (or the stream broke): nobody will read the output
            await shielded(_cancel_quietly(rt, job_id, who.tenant))


async def _serve(
    rt: Runtime,
    request: Request,
    who: Principal,
    body: ChatCompletionRequest | CompletionRequest,
    formatter: type[Formatter],
) -> Any:
    sub = body.submission(priority_header(request, body.priority if body.priority is not None else 5))
    adm, headers = await admit(rt, request, who, sub)
    if _background(request, body):
        return JSONResponse(await accepted_view(rt, who, adm), status_code=202, headers=headers)
    fmt = formatter(adm.job_id, body.model, include_usage=body.include_usage)
    if body.stream:
        try:
            slot = open_slot(rt, who.tenant)
        except ApiError:
            await _cancel_quietly(rt, adm.job_id, who.tenant)  # admitted, but nobody can follow it
            raise
        return SlotEventSourceResponse(
            _chunks(rt, who, adm.job_id, body.model, fmt), slot, ping=rt.settings.keepalive_s, headers=headers
        )
    return await _complete(rt, request, who, adm.job_id, body.model, fmt, headers)


OPENAI_ERRORS = openapi_errors(400, 401, 404, 409, 413, 429, 503)


@router.post("/chat/completions", responses=OPENAI_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, who: Auth, rt: RT) -> Any:
    return await _serve(rt, request, who, body, ChatFormatter)


@router.post("/completions", responses=OPENAI_ERRORS)
async def completions(body: CompletionRequest, request: Request, who: Auth, rt: RT) -> Any:
    return await _serve(rt, request, who, body, CompletionFormatter)


async def _model_ids(rt: Runtime) -> list[str]:
    ids = dict.fromkeys(rt.settings.models)
    ids.update(dict.fromkeys(await rt.broker.models()))
    for w in await rt.broker.workers(rt.settings.worker_max_age_ms):
        if w.get("model"):
            ids[str(w["model"])] = None
    return list(ids)


def _model_obj(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "genq"}


@router.get("/models", responses=openapi_errors(401))
async def list_models(who: Auth, rt: RT) -> dict[str, Any]:
    return {"object": "list", "data": [_model_obj(m) for m in await _model_ids(rt)]}


@router.get("/models/{model_id:path}", responses=openapi_errors(401, 404))
async def get_model(model_id: str, who: Auth, rt: RT) -> dict[str, Any]:
    if model_id not in await _model_ids(rt):
        raise from_broker(be.UnknownModel(model_id))
    return _model_obj(model_id)
