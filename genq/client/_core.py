"""What the sync and async clients share, with no I/O: options, the requests each call makes,
how answers are parsed into models or typed errors, when to retry, and the state of a followed
event stream across reconnections. Each client only sends and sleeps."""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent

from genq.client.errors import APIConnectionError, APIError, NotFoundError, WaitTimeout, error_class
from genq.client.models import STORED_EVENTS, Event, EventType, Job, JobPage, JobRequest, JobStatus

URL_ENV = "GENQ_URL"  # what `genq submit` has always read
KEY_ENV = "GENQ_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
# Reads wait longer than the server's keep-alive comment (15 s) on a silent stream.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
RETRY_STATUSES = frozenset({429, 503})
USER_AGENT = "genq-python"


@dataclass(frozen=True, slots=True)
class Options:
    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    max_retries: int  # per call, on 429/503 and connection errors; 0: never retry
    max_retry_delay_s: float  # a Retry-After longer than this is not waited for: the error is raised
    max_reconnects: int  # a stream's reconnections in a row that bring no event

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        max_retry_delay_s: float,
        max_reconnects: int,
    ) -> Options:
        url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/").removesuffix("/v1")
        if max_retries < 0 or max_reconnects < 0:
            raise ValueError("max_retries and max_reconnects must be >= 0")
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        elif not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout)
        key = api_key if api_key is not None else os.environ.get(KEY_ENV)
        return cls(url, key or None, timeout, max_retries, max_retry_delay_s, max_reconnects)

    def http_kwargs(self, headers: Mapping[str, str] | None) -> dict[str, Any]:
        """Arguments for an ``httpx.Client`` / ``httpx.AsyncClient`` of these options."""
        h = {"User-Agent": USER_AGENT, **(headers or {})}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return {"base_url": self.base_url, "headers": h, "timeout": self.timeout}


# -- the calls -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def new_idempotency_key() -> str:
    return "genq-py-" + uuid.uuid4().hex


def as_request(
    request: JobRequest | Mapping[str, Any] | None, idempotency_key: str | None = None, **fields: Any
) -> JobRequest:
    """A request with an idempotency key, always: the caller's, else a fresh one, so that a
    retried submit (after a lost answer) finds the job it made instead of making another."""
    if isinstance(request, JobRequest):
        base = {**request.model_dump(), "idempotency_key": request.idempotency_key}
    else:
        base = dict(request or {})
    data = {**base, **fields}
    data["idempotency_key"] = idempotency_key or data.get("idempotency_key") or new_idempotency_key()
    return JobRequest.model_validate(data)


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}"


def submit_call(req: JobRequest) -> Call:
    return Call("POST", "/v1/jobs", json=req.body(), headers={"Idempotency-Key": req.idempotency_key or ""})


def get_call(job_id: str) -> Call:
    return Call("GET", _job_path(job_id))


def cancel_call(job_id: str) -> Call:
    return Call("DELETE", _job_path(job_id))


def list_call(status: JobStatus | str | None, limit: int, after: str | None) -> Call:
    params: dict[str, Any] = {"limit": limit}
    if status is not None:
        params["status"] = JobStatus(status).value
    if after is not None:
        params["after"] = after
    return Call("GET", "/v1/jobs", params=params)


def events_path(job_id: str) -> str:
    return _job_path(job_id) + "/events"


# -- answers -------------------------------------------------------------------------------
def retry_after_s(headers: httpx.Headers) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        value = when.timestamp() - time.time()
    return max(0.0, value) if math.isfinite(value) else None


def api_error(response: httpx.Response) -> APIError:
    """The typed error of an error answer (its body must have been read)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    status = response.status_code
    message = str(err.get("message") or response.text[:500] or response.reason_phrase or "error")

    def opt(name: str) -> str | None:
        value = err.get(name)
        return None if value is None else str(value)

    return error_class(status)(
        status,
        message,
        type=opt("type"),
        code=opt("code"),
        param=opt("param"),
        retry_after_s=retry_after_s(response.headers),
        headers=dict(response.headers),
        body=body,
    )


def checked(response: httpx.Response) -> Any:
    """The JSON of a successful answer; an error answer raises its typed error."""
    if not response.is_success:
        raise api_error(response)
    return response.json()


def parse_job(response: httpx.Response) -> Job:
    return Job.model_validate(checked(response))


def parse_page(response: httpx.Response) -> JobPage:
    return JobPage.model_validate(checked(response))


def backoff_s(attempt: int, base_s: float = 0.5, cap_s: float = 8.0) -> float:
    """Exponential, with jitter (so many clients refused together do not come back together)."""
    return min(cap_s, base_s * 2.0**attempt) * random.uniform(0.5, 1.0)


def retry_delay(
    opts: Options, attempt: int, *, response: httpx.Response | None = None, exc: Exception | None = None
) -> float | None:
    """How long to wait before retry number ``attempt + 1``, or None: do not retry.

    429 and 503 (never admitted, so always safe) wait the answer's ``Retry-After``. A connection
    error is retried too: every call is idempotent (a submit carries an Idempotency-Key)."""
    if attempt >= opts.max_retries:
        return None
    if response is not None:
        if response.status_code not in RETRY_STATUSES:
            return None
        after = retry_after_s(response.headers)
        delay = backoff_s(attempt) if after is None else after
    elif isinstance(exc, httpx.TransportError):
        delay = backoff_s(attempt)
    else:
        return None
    return delay if delay <= opts.max_retry_delay_s else None


def connection_error(exc: Exception, what: str) -> APIConnectionError:
    return APIConnectionError(f"{what}: {type(exc).__name__}: {exc}")


def poll_delays(first_s: float = 0.05, cap_s: float = 2.0) -> Iterator[float]:
    """Back-off between polls when a job cannot be followed by its events."""
    delay = first_s
    while True:
        yield delay
        delay = min(cap_s, delay * 1.5)


# -- a followed stream ---------------------------------------------------------------------
def _never() -> bool:
    return False


def _order(event_id: str) -> tuple[int, ...]:
    """An event id's place: ``<ms>-<n>`` (a stored event), ``<ms>-<n>-<seq>`` (a token event after it)."""
    return tuple(int(p) for p in event_id.split("-"))


class EventCursor:
    """Where a follower of one job's events stands, across connections.

    Each connection asks for the events after ``last_id`` (``Last-Event-ID``); an event at or
    before it is dropped, so a resumed stream never repeats text. A broken connection is
    reconnected at once (after a short back-off, or the server's ``retry:``); after
    ``max_reconnects`` reconnections in a row that bring no event, the next break ends it with
    :class:`APIConnectionError`.
    """

    def __init__(
        self,
        opts: Options,
        job_id: str,
        last_event_id: str | None = None,
        timeout_s: float | None = None,
        stopped: Callable[[], bool] | None = None,
    ) -> None:
        self.opts, self.job_id, self.last_id = opts, job_id, last_event_id
        self.stopped = stopped or _never
        self.done = False
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._failures = 0
        self._retry_s: float | None = None

    def connect(self) -> tuple[str, dict[str, str], httpx.Timeout]:
        """Path, headers and timeout of the next connection."""
        self.check_deadline()
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        timeout = self.opts.timeout
        left = self.remaining_s()
        if left is not None:
            read = min(timeout.read or left, left)
            timeout = httpx.Timeout(timeout.connect, read=read, write=timeout.write, pool=timeout.pool)
        return events_path(self.job_id), headers, timeout

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else max(0.001, self.deadline - time.monotonic())

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeout(self.job_id, self.timeout_s or 0.0)

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The event to hand on, or None (a repeat, or a name this client does not know)."""
        self.check_deadline()
        if sse.retry is not None:
            self._retry_s = sse.retry / 1000
        try:
            etype = EventType(sse.event)
        except ValueError:
            return None
        eid = None
        if etype in STORED_EVENTS and sse.id:
            # httpx-sse keeps the last id for events that carry none, as the SSE spec says
            if self.last_id and _order(sse.id) <= _order(self.last_id):
                return None
            eid = self.last_id = sse.id
        try:
            data = json.loads(sse.data) if sse.data else {}
        except ValueError as e:
            raise APIConnectionError(f"events of {self.job_id}: a {etype} event whose data is not JSON") from e
        if etype is EventType.ERROR:
            raise NotFoundError(404, str(data.get("message", "the job expired")), code=data.get("code"))
        self._failures = 0
        event = Event(type=etype, id=eid, data=data if isinstance(data, dict) else {"value": data})
        self.done = event.terminal
        return event

    def lost(self, exc: Exception | None) -> float:
        """The connection broke (``exc``) or ended before the job's last event: the delay
        before reconnecting, or the error that ends the stream."""
        self.check_deadline()
        self._failures += 1
        if self._failures > self.opts.max_reconnects:
            why = f"{type(exc).__name__}: {exc}" if exc else "the stream kept ending before the job did"
            raise APIConnectionError(f"events of {self.job_id}: {why}")
        delay = self._retry_s if self._retry_s is not None else backoff_s(self._failures - 1, 0.1, 2.0)
        return self._capped(delay)

    def refused(self, response: httpx.Response) -> float:
        """An error answer to a (re)connection (its body read): the delay before trying again
        (429/503 within the retry budget), else its typed error is raised."""
        self.check_deadline()
        delay = retry_delay(self.opts, self._failures, response=response)
        if delay is None:
            raise api_error(response)
        self._failures += 1
        return self._capped(delay)

    def _capped(self, delay: float) -> float:
        left = self.remaining_s()
        return delay if left is None else min(delay, left)
