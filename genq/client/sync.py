"""``genq.Client``: the native jobs API over httpx, blocking. The request and parsing logic is
``genq.client._core``'s (shared with ``genq.AsyncClient``); this module only sends and sleeps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any, Literal, overload

import httpx
from httpx_sse import EventSource, SSEError

from genq.client import _core
from genq.client.errors import APIConnectionError, GenqError, RateLimitError
from genq.client.models import Event, Job, JobPage, JobRequest, JobStatus, Progress

RequestLike = JobRequest | Mapping[str, Any]
# Aliases: inside the class, `list` is the method.
Jobs = list[Job]
Outcomes = list[Job | GenqError]


class Client:
    """A client of one genq API.

    ``base_url`` defaults to ``$GENQ_URL`` or ``http://127.0.0.1:8000``, ``api_key`` to
    ``$GENQ_API_KEY``. Each call retries 429 and 503 answers (waiting their ``Retry-After``, at
    most ``max_retry_delay_s``) and connection errors, up to ``max_retries`` times (0: never).
    ``http_client`` replaces the client's own ``httpx.Client`` (its base URL and headers are
    then the caller's to set).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 2,
        max_retry_delay_s: float = 60.0,
        max_reconnects: int = 5,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.options = _core.Options.resolve(base_url, api_key, timeout, max_retries, max_retry_delay_s, max_reconnects)
        self._own_http = http_client is None
        self._http = http_client or httpx.Client(**self.options.http_kwargs(headers))

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # -- one call, with retries -----------------------------------------------------------
    def _send(self, call: _core.Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, json=call.json, params=call.params, headers=call.headers
                )
            except httpx.TransportError as e:
                delay = _core.retry_delay(self.options, attempt, exc=e)
                if delay is None:
                    raise _core.connection_error(e, f"{call.method} {call.path}") from e
            else:
                delay = _core.retry_delay(self.options, attempt, response=response)
                if delay is None:
                    return response
            attempt += 1
            time.sleep(delay)

    # -- the API --------------------------------------------------------------------------
    def submit(
        self, request: RequestLike | None = None, /, *, idempotency_key: str | None = None, **fields: Any
    ) -> Job:
        """Queue one job: ``submit(model=..., messages=[...], max_tokens=...)`` or
        ``submit(JobRequest(...))``. It always carries an Idempotency-Key (``idempotency_key``,
        else a fresh one), so the client's own retries never make a second job."""
        req = _core.as_request(request, idempotency_key, **fields)
        return _core.parse_job(self._send(_core.submit_call(req)))

    def get(self, job_id: str) -> Job:
        return _core.parse_job(self._send(_core.get_call(job_id)))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job (it ends at once) or a running one (``cancel_requested``; its
        worker aborts it within a second). A finished job raises ``ConflictError``."""
        return _core.parse_job(self._send(_core.cancel_call(job_id)))

    def list(self, *, status: JobStatus | str | None = None, limit: int = 100, after: str | None = None) -> JobPage:
        """One page of your jobs, newest first; the next page is ``after=page.next_after``."""
        return _core.parse_page(self._send(_core.list_call(status, limit, after)))

    def iter_jobs(self, *, status: JobStatus | str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job of yours (with ``status``), newest first, page after page."""
        after = None
        while True:
            page = self.list(status=status, limit=page_size, after=after)
            yield from page.data
            if not page.has_more:
                return
            after = page.next_after

    def stream(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events up to its last (``done``, ``failed``, ``cancelled``, ``expired``).
        A dropped connection is resumed with ``Last-Event-ID``: no event, no text, twice."""
        yield from self._follow(_core.EventCursor(self.options, job_id, last_event_id))

    def _follow(self, cursor: _core.EventCursor) -> Iterator[Event]:
        while not cursor.done:
            path, headers, timeout = cursor.connect()
            try:
                with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code != 200:
                        response.read()
                        delay = cursor.refused(response)
                    else:
                        for sse in EventSource(response).iter_sse():
                            event = cursor.accept(sse)
                            if event is not None:
                                yield event
                            if cursor.done or cursor.stopped():
                                return
                        delay = cursor.lost(None)
            except httpx.TransportError as e:
                delay = cursor.lost(e)
            except SSEError as e:
                raise APIConnectionError(f"events of {cursor.job_id}: {e}") from e
            time.sleep(delay)

    def wait(self, job_id: str, *, timeout_s: float | None = None) -> Job:
        """The job once finished. Follows its events (no polling); when no stream can be opened
        (the tenant's stream limit), polls with back-off. ``WaitTimeout`` after ``timeout_s``."""
        return self._wait(job_id, timeout_s)

    def _wait(self, job_id: str, timeout_s: float | None, stopped: Callable[[], bool] | None = None) -> Job:
        cursor = _core.EventCursor(self.options, job_id, timeout_s=timeout_s, stopped=stopped)
        job = self.get(job_id)
        if job.terminal:
            return job
        try:
            for _ in self._follow(cursor):
                pass
        except RateLimitError:
            for delay in _core.poll_delays():
                job = self.get(job_id)
                if job.terminal or cursor.stopped():
                    return job
                cursor.check_deadline()
                time.sleep(min(delay, cursor.remaining_s() or delay))
        return self.get(job_id)

    def run(self, request: RequestLike | None = None, /, *, timeout_s: float | None = None, **fields: Any) -> Job:
        """Submit and wait."""
        return self._run(_core.as_request(request, **fields), timeout_s)

    def _run(self, req: JobRequest, timeout_s: float | None, stopped: Callable[[], bool] | None = None) -> Job:
        return self._wait(self.submit(req).id, timeout_s, stopped)

    @overload
    def run_many(
        self,
        requests: Iterable[RequestLike],
        *,
        concurrency: int = ...,
        on_progress: Callable[[Progress[Job]], object] | None = ...,
        timeout_s: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> Jobs: ...

    @overload
    def run_many(
        self,
        requests: Iterable[RequestLike],
        *,
        concurrency: int = ...,
        on_progress: Callable[[Progress[Job | GenqError]], object] | None = ...,
        timeout_s: float | None = ...,
        return_exceptions: Literal[True],
    ) -> Outcomes: ...

    def run_many(
        self,
        requests: Iterable[RequestLike],
        *,
        concurrency: int = 8,
        on_progress: Callable[[Any], object] | None = None,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> Jobs | Outcomes:
        """Run every request, at most ``concurrency`` at a time, and return the finished jobs in
        input order. ``on_progress(Progress)`` is called (in this thread) as each one finishes.
        Each request gets its idempotency key up front, so a retried submit never makes a second
        job. A failure raises at once (requests not yet started are not submitted; jobs already
        queued keep running); with ``return_exceptions`` its error takes the request's place.
        ``timeout_s`` bounds each job's wait (``WaitTimeout``)."""
        reqs = [_core.as_request(r) for r in requests]
        results: list[Any] = [None] * len(reqs)
        if not reqs:
            return results
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        stop = threading.Event()  # set on a failure: the other runs stop following their jobs
        pending = iter(enumerate(reqs))
        running: dict[Future[Job], int] = {}
        done = 0
        pool = ThreadPoolExecutor(max_workers=min(concurrency, len(reqs)), thread_name_prefix="genq-run")
        try:
            while True:
                while len(running) < concurrency and (item := next(pending, None)) is not None:
                    running[pool.submit(self._run, item[1], timeout_s, stop.is_set)] = item[0]
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = running.pop(future)
                    try:
                        results[index] = future.result()
                    except GenqError as e:
                        if not return_exceptions:
                            raise
                        results[index] = e
                    done += 1
                    if on_progress is not None:
                        on_progress(Progress(done, len(reqs), index, results[index]))
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
        return results
