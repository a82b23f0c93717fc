"""OpenAI-compatible endpoints, served THROUGH THE QUEUE: admit a job, then follow its events.

Streams behave like vLLM's own server: nothing is sent before the first token (the
role chunk goes out with it), and a comment line only after a silence.

A model with no live worker: the call waits ``no_worker_grace_s`` for a worker to
take the job, then answers 503 ``no_worker`` with ``Retry-After`` (the stream too:
its headers wait for the grace), instead of holding the client for ``sync_timeout_s``.

A client that disconnects cancels its job; with an ``Idempotency-Key`` only after
``reattach_grace_s``, and a retry with the same key re-attaches to the job and
follows it from the start (see api.orphans). The official ``openai`` client sends no
key but numbers its automatic retries (``X-Stainless-Retry-Count``): its first attempt
gets a server-made key, found again by the retry of the same request (:func:`_retry_key`),
so a retry after an API restart re-attaches instead of making a second job.

On SIGTERM (api.server) streams get ``drain_grace_s`` to finish; a request cut by the
shutdown keeps its job (the client may reconnect to the restarted API). Background mode (``X-Background: true``
or ``"background": true``) answers 202 with the job shaped as a (choice-less) chat or
text completion, retrievable later at ``GET /v1/chat/completions/{id}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.auth import Auth, Principal
from api.errors import (
    ApiError,
    bad_request,
    client_closed,
    from_broker,
    from_job_end,
    no_worker,
    openapi_errors,
    sync_timeout,
)
from api.openai_schemas import (
    ChatCompletionRequest,
    ChatFormatter,
    Choice,
    CompletionFormatter,
    CompletionRequest,
    Formatter,
    usage_dict,
)
from api.orphans import cancel_quietly
from api.routes_jobs import owned_job
from api.runtime import Runtime, get_runtime, note
from api.service import Submission, accepted_view, admit, describe, priority_header, warning_headers
from api.streams import SlotEventSourceResponse, follow, follow_many, open_slot, shielded
from broker import errors as be
from broker.contract import WAITING_EVENTS, EventType, TokenLogprob
from broker.events import Event
from broker.models import Admission, Job, JobStatus

log = structlog.get_logger(__name__)

RETRY_COUNT = "x-stainless-retry-count"
RETRY_HINT_MS = 10 * 60 * 1000  # how long a first attempt can be found by its retries
# Request headers that shape the job, so two requests differing in them are not one retry.
JOB_HEADERS = ("x-priority", "x-max-queue-time", "x-background")
RETRY_ANEW = frozenset({JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.EXPIRED})

router = APIRouter(prefix="/v1", tags=["openai"])
RT = Annotated[Runtime, Depends(get_runtime)]
# What a background answer or a retrieved object adds to OpenAI's shape (from the job view).
JOB_FIELDS = (
    "status",
    "priority",
    "queue_position",
    "queue_position_kind",
    "queue_position_range",
    "eta_s",
    "eta_range_s",
    "warning",
    "error",
    "links",
)


def _background(request: Request, body: ChatCompletionRequest | CompletionRequest) -> bool:
    return body.background or request.headers.get("x-background", "").lower() in ("1", "true", "yes")


class Caller:
    """The request a job was admitted for: who, which job, and whether a retry can re-attach to it."""

    def __init__(self, rt: Runtime, request: Request, who: Principal, job_id: str, model: str) -> None:
        self.rt, self.request, self.who, self.job_id, self.model = rt, request, who, job_id, model
        # With an Idempotency-Key a retry finds this job again (admission dedupes on the key). A
        # server-made key does not count: its client may never retry, and it left on purpose.
        self.keyed = request.headers.get("idempotency-key") is not None and rt.settings.reattach_grace_s > 0

    async def abandon(self) -> None:
        """Nobody waits for the job any more: cancel it, or, if a retry may re-attach, after the grace.
        While the API drains the client did not leave, the process did: keep the job."""
        if self.rt.drain.started:
            log.info("api draining: job kept for a reconnect", job_id=self.job_id)
        elif self.keyed:
            self.rt.orphans.schedule(self.job_id, self.who.tenant)  # synchronous: safe in a cancelled scope
        else:
            await shielded(cancel_quietly(self.rt.broker, self.job_id, self.who.tenant))

    async def client_gone(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    async def wait_for_worker(self) -> ApiError | None:
        """With no live worker for the model: wait the grace for one to take the job.

        Returns None to go on (a worker exists, or took the job), else the error to answer
        (the job abandoned): 503 ``no_worker`` or, if the client left meanwhile, 499.
        """
        rt = self.rt
        if await rt.fleet.workers(self.model) > 0:
            return None
        progress = asyncio.create_task(self._progress())
        gone = asyncio.create_task(self.client_gone())
        try:
            done, _ = await asyncio.wait(
                {progress, gone}, timeout=rt.settings.no_worker_grace_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await progress  # let it unsubscribe
        if gone in done:
            await self.abandon()
            return client_closed()
        if progress in done or await rt.fleet.workers(self.model, fresh=True) > 0:
            return None
        await self.abandon()
        rt.metrics.rejected("no_worker")
        log.info("no live worker for the model", model=self.model, job_id=self.job_id)
        grace = rt.settings.reattach_grace_s
        # A keyed retry should come while the job is kept for it.
        retry_after = math.ceil(grace / 2) if self.keyed else math.ceil(rt.settings.no_worker_grace_s)
        return no_worker(self.model, retry_after, grace if self.keyed else None)

    async def _progress(self) -> None:
        """Returns once the job leaves the queue (a worker took it) or ends."""
        async with contextlib.aclosing(follow(self.rt, self.job_id)) as events:
            async for ev in events:
                if ev is not None and ev.type not in WAITING_EVENTS:
                    return


async def _terminal_event(rt: Runtime, job_id: str, model: str) -> Event:
    async with contextlib.aclosing(follow(rt, job_id)) as events:
        async for ev in events:
            if ev is not None and ev.type is EventType.RETRY:
                rt.metrics.retry_seen(model, job_id, ev.id)
            if ev is not None and ev.terminal:
                return ev
    raise be.BrokerError(f"event stream of {job_id} ended without a terminal event")


async def _complete(callers: list[Caller], fmt: Formatter, headers: dict[str, str]) -> JSONResponse:
    """Wait for every choice's job; one that fails ends the wait (the others are cancelled)."""
    rt = callers[0].rt
    waiters = [asyncio.create_task(_terminal_event(rt, c.job_id, c.model)) for c in callers]
    gone = asyncio.create_task(callers[0].client_gone())
    deadline = asyncio.get_running_loop().time() + rt.settings.sync_timeout_s
    try:
        while not gone.done() and not _one_failed(waiters):
            left, unfinished = deadline - asyncio.get_running_loop().time(), [w for w in waiters if not w.done()]
            if not unfinished or left <= 0:
                break
            await asyncio.wait([*unfinished, gone], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        client_left = gone.done() and not gone.cancelled()
    finally:
        gone.cancel()
        for w in waiters:
            if not w.done():
                w.cancel()
    finished = [(c, w) for c, w in zip(callers, waiters, strict=True) if w.done() and not w.cancelled()]
    for _, w in finished:
        w.result()  # a follower's own error
    failed = next((w.result() for _, w in finished if w.result().type is not EventType.DONE), None)
    if failed is None and len(finished) == len(callers):
        return JSONResponse(await _answer(rt, fmt, [w.result() for w in waiters], callers), headers=headers)
    rest = [c for c, w in zip(callers, waiters, strict=True) if (c, w) not in finished]  # still running
    for w in waiters:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await w  # let it unsubscribe (before abandon: a follower keeps an orphan alive)
    if failed is not None:
        for c in rest:  # its sibling choice failed: the answer cannot be whole
            await cancel_quietly(rt.broker, c.job_id, c.who.tenant)
        raise from_job_end(failed.type, failed.data)
    if client_left:
        for c in rest:
            await c.abandon()
        return client_closed().response()
    for c in rest:
        await cancel_quietly(rt.broker, c.job_id, c.who.tenant)  # the answer says it is cancelled
    raise sync_timeout(rt.settings.sync_timeout_s)


def _one_failed(waiters: list[asyncio.Task[Event]]) -> bool:
    return any(w.done() and (w.exception() is not None or w.result().type is not EventType.DONE) for w in waiters)


async def _answer(rt: Runtime, fmt: Formatter, events: list[Event], callers: list[Caller]) -> dict[str, Any]:
    """The whole completion: one choice per job; the prompt counted once, as vLLM reports it."""
    jobs = [await rt.broker.get_job(c.job_id) for c in callers]
    answers: list[Choice] = []
    for job, ev in zip(jobs, events, strict=True):
        answers.append((job.output, ev.data.get("finish_reason") or job.finish_reason, await _logprobs(rt, job)))
    return fmt.full(answers, usage_dict(jobs[0].prompt_tokens, sum(j.completion_tokens for j in jobs)))


async def _logprobs(rt: Runtime, job: Job) -> list[TokenLogprob] | None:
    """The job's logprobs if it asked for them (they are read back from its token events)."""
    return None if job.request.sampling.logprobs is None else await rt.broker.logprobs(job.id)


def _event_logprobs(ev: Event) -> list[TokenLogprob] | None:
    wire = ev.data.get("logprobs")
    return None if wire is None else [TokenLogprob.from_wire(t) for t in wire]


async def _chunks(callers: list[Caller], fmt: Formatter) -> AsyncIterator[str]:
    """The chunks of every choice as their tokens arrive (each with its ``index``)."""
    rt, model = callers[0].rt, callers[0].model
    running = set(range(len(callers)))  # choices whose job has not ended
    opened: set[int] = set()
    usage = [0, 0]  # the prompt once, every choice's completion tokens
    try:
        async with contextlib.aclosing(follow_many(rt, [c.job_id for c in callers])) as events:
            async for i, ev in events:
                if ev.type is EventType.TOKEN and (ev.data.get("text") or ev.data.get("logprobs")):
                    if i not in opened:  # like vLLM: the role chunk goes out with the first token, not before
                        opened.add(i)
                        for c in fmt.start(i):
                            yield json.dumps(c)
                    yield json.dumps(fmt.delta(ev.data["text"], _event_logprobs(ev), i))
                elif ev.type is EventType.RETRY:
                    rt.metrics.retry_seen(model, callers[i].job_id, ev.id)
                elif ev.type is EventType.DONE:
                    running.discard(i)
                    if i not in opened:
                        opened.add(i)
                        for c in fmt.start(i):
                            yield json.dumps(c)
                    yield json.dumps(fmt.finish(ev.data.get("finish_reason") or "stop", i))
                    u = ev.data.get("usage") or {}
                    usage[0] = usage[0] or u.get("prompt_tokens", 0)
                    usage[1] += u.get("completion_tokens", 0)
                    if fmt.include_usage and not running:
                        yield json.dumps(fmt.usage_chunk(usage_dict(*usage)))
                elif ev.terminal:
                    running.discard(i)
                    yield json.dumps(from_job_end(ev.type, ev.data).body())
                    break  # the other choices are abandoned below: the answer cannot be whole
        yield "[DONE]"
    finally:
        for i in sorted(running):  # client went away (or the stream broke): nobody will read the output
            await callers[i].abandon()


async def _admit_choices(
    rt: Runtime, request: Request, who: Principal, subs: list[Submission], retry_key: str | None
) -> tuple[list[Admission], dict[str, str]]:
    """Admit one job per choice, all or none."""
    admitted: list[Admission] = []
    try:
        for sub in subs:
            adm, headers = await admit(rt, request, who, sub, retry_key)
            admitted.append(adm)
    except Exception:
        for adm in admitted:
            await shielded(cancel_quietly(rt.broker, adm.job_id, who.tenant))
        raise
    return admitted, headers


async def _retry_key(
    rt: Runtime, request: Request, who: Principal, body: ChatCompletionRequest | CompletionRequest
) -> tuple[str | None, str]:
    """A server-made idempotency key for a request of the official ``openai`` client.

    That client sends no ``Idempotency-Key``; it resends the same request with
    ``X-Stainless-Retry-Count`` 1, 2... after a connection error or a 5xx. A first attempt
    (count 0) is admitted with a fresh key, noted under the request's digest; a retry takes
    the key of the latest first attempt of the same request, so it re-attaches to that job.
    Two identical requests sent on purpose are both first attempts: two jobs. Returns the
    key and the request's digest (None, "" for other clients).
    """
    count = request.headers.get(RETRY_COUNT)
    if count is None or request.headers.get("idempotency-key") is not None:
        return None, ""
    digest = hashlib.sha256(
        json.dumps(
            [request.url.path, who.key_id, body.model_dump(mode="json"), [request.headers.get(h) for h in JOB_HEADERS]],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    if count != "0":
        known = await rt.broker.recall_retry_key(who.tenant, digest)
        if known is not None:
            log.info("openai client retry recognised", retry=count[:8])
            return known, digest
    return await _fresh_retry_key(rt, who, digest), digest


async def _given_up(rt: Runtime, admitted: list[Admission]) -> bool:
    for adm in admitted:
        if adm.duplicate and (await rt.broker.get_job(adm.job_id)).status in RETRY_ANEW:
            return True
    return False


async def _fresh_retry_key(rt: Runtime, who: Principal, digest: str) -> str:
    key = "oai-" + secrets.token_hex(16)
    await rt.broker.remember_retry_key(who.tenant, digest, key, RETRY_HINT_MS)
    return key


async def _serve(
    rt: Runtime,
    request: Request,
    who: Principal,
    body: ChatCompletionRequest | CompletionRequest,
    formatter: type[Formatter],
) -> Any:
    background = _background(request, body)
    if background and body.choices > 1:
        raise bad_request("background mode takes one choice (n = 1).", "n", "unsupported_value")
    subs = body.submissions(priority_header(request, body.priority if body.priority is not None else 5))
    if background:  # answered with the job at once: nobody is there to follow it token by token
        subs = [dataclasses.replace(s, stream=False) for s in subs]
    retry_key, digest = await _retry_key(rt, request, who, body)
    admitted, headers = await _admit_choices(rt, request, who, subs, retry_key)
    if retry_key is not None and await _given_up(rt, admitted):
        # the first attempt's jobs were given up (its client left, or one failed): the retry is a new try
        admitted, headers = await _admit_choices(rt, request, who, subs, await _fresh_retry_key(rt, who, digest))
    for a in admitted:
        if a.duplicate:
            rt.orphans.adopt(a.job_id)  # a retry with the same key: the job is wanted again
    adm = admitted[0]
    if background:
        view = await accepted_view(rt, who, adm)
        fmt = formatter(adm.job_id, body.model, completion_id=adm.job_id, created=view["created_at"])
        return JSONResponse(_job_object(fmt, view), status_code=202, headers={**headers, **warning_headers(view)})
    callers = [Caller(rt, request, who, a.job_id, body.model) for a in admitted]
    refused = await callers[0].wait_for_worker()  # a worker for the model serves every choice
    if refused is not None:
        for c in callers[1:]:
            await c.abandon()
        return refused.response()
    fmt = formatter(adm.job_id, body.model, include_usage=body.include_usage)
    if body.stream:
        try:
            slot = open_slot(rt, who.tenant)
        except ApiError:
            for c in callers:
                await c.abandon()  # admitted, but nobody can follow it
            raise
        return SlotEventSourceResponse(
            _chunks(callers, fmt),
            slot,
            ping=rt.settings.keepalive_s,
            headers=headers,
            shutdown_grace_period=rt.settings.drain_grace_s,
        )
    return await _complete(callers, fmt, headers)


def _job_object(
    fmt: Formatter, view: dict[str, Any], job: Job | None = None, logprobs: list[TokenLogprob] | None = None
) -> dict[str, Any]:
    """The job as an OpenAI object: the completion once it succeeded, else without choices; plus its state."""
    if job is not None and job.status is JobStatus.SUCCEEDED:
        usage = usage_dict(job.prompt_tokens, job.completion_tokens)
        obj = fmt.full([(job.output, job.finish_reason, logprobs)], usage)
    else:
        obj = fmt.pending()
    obj.update({k: view[k] for k in JOB_FIELDS if k in view})
    obj["links"] = {**view["links"], "result": f"{fmt.path}/{view['id']}"}
    return obj


OPENAI_ERRORS = openapi_errors(400, 401, 404, 409, 413, 429, 503)


@router.post("/chat/completions", responses=OPENAI_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, who: Auth, rt: RT) -> Any:
    return await _serve(rt, request, who, body, ChatFormatter)


@router.post("/completions", responses=OPENAI_ERRORS)
async def completions(body: CompletionRequest, request: Request, who: Auth, rt: RT) -> Any:
    return await _serve(rt, request, who, body, CompletionFormatter)


async def _retrieve(
    rt: Runtime, request: Request, who: Principal, completion_id: str, formatter: type[Formatter]
) -> Any:
    job_id = completion_id.removeprefix(f"{formatter.prefix}-")
    note(request, job_id=job_id)
    job = await owned_job(rt, who, job_id)
    fmt = formatter(job.id, job.model, completion_id=completion_id, created=job.created_ms // 1000)
    logprobs = await _logprobs(rt, job) if job.status is JobStatus.SUCCEEDED else None
    return _job_object(fmt, await describe(rt, job), job, logprobs)


@router.get("/chat/completions/{completion_id}", responses=openapi_errors(401, 404))
async def retrieve_chat_completion(completion_id: str, request: Request, who: Auth, rt: RT) -> Any:
    """A chat completion by its id (a background job's, or `chatcmpl-<job id>`): `choices` once it
    succeeded, else empty, with the job's `status` (and `error`). `client.chat.completions.retrieve(id)`."""
    return await _retrieve(rt, request, who, completion_id, ChatFormatter)


@router.get("/completions/{completion_id}", responses=openapi_errors(401, 404))
async def retrieve_completion(completion_id: str, request: Request, who: Auth, rt: RT) -> Any:
    """A text completion by its id (a background job's, or `cmpl-<job id>`), as for chat completions."""
    return await _retrieve(rt, request, who, completion_id, CompletionFormatter)


async def _models(rt: Runtime) -> dict[str, int]:
    """Every admissible model with its live workers."""
    live = await rt.fleet.counts(fresh=True)
    ids = dict.fromkeys(rt.settings.models, 0)
    ids.update(dict.fromkeys(await rt.broker.models(), 0))
    ids.update(live)
    return ids


def _model_obj(model_id: str, workers: int) -> dict[str, Any]:
    # OpenAI's shape plus genq's: a model with no live worker still queues, but nothing runs it yet.
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "genq",
        "workers": workers,
        "ready": workers > 0,
    }


@router.get("/models", responses=openapi_errors(401))
async def list_models(who: Auth, rt: RT) -> dict[str, Any]:
    """The models, each with `workers` (live workers serving it) and `ready` (at least one)."""
    return {"object": "list", "data": [_model_obj(m, n) for m, n in (await _models(rt)).items()]}


@router.get("/models/{model_id:path}", responses=openapi_errors(401, 404))
async def get_model(model_id: str, who: Auth, rt: RT) -> dict[str, Any]:
    models = await _models(rt)
    if model_id not in models:
        raise from_broker(be.UnknownModel(model_id))
    return _model_obj(model_id, models[model_id])
