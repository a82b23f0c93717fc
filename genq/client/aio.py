"""``genq.AsyncClient``: ``genq.Client`` for asyncio, call for call. The request and parsing
logic is ``genq.client._core``'s; this module only sends and sleeps."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
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


class AsyncClient:
    """See :class:`genq.Client`; every method is a coroutine (``stream`` and ``iter_jobs`` are
    async iterators)."""

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
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.options = _core.Options.resolve(base_url, api_key, timeout, max_retries, max_retry_delay_s, max_reconnects)
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(**self.options.http_kwargs(headers))

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def _send(self, call: _core.Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
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
            await asyncio.sleep(delay)

    async def submit(
        self, request: RequestLike | None = None, /, *, idempotency_key: str | None = None, **fields: Any
    ) -> Job:
        req = _core.as_request(request, idempotency_key, **fields)
        return _core.parse_job(await self._send(_core.submit_call(req)))

    async def get(self, job_id: str) -> Job:
        return _core.parse_job(await self._send(_core.get_call(job_id)))

    async def cancel(self, job_id: str) -> Job:
        return _core.parse_job(await self._send(_core.cancel_call(job_id)))

    async def list(
        self, *, status: JobStatus | str | None = None, limit: int = 100, after: str | None = None
    ) -> JobPage:
        return _core.parse_page(await self._send(_core.list_call(status, limit, after)))

    async def iter_jobs(self, *, status: JobStatus | str | None = None, page_size: int = 100) -> AsyncIterator[Job]:
        after = None
        while True:
            page = await self.list(status=status, limit=page_size, after=after)
            for job in page.data:
                yield job
            if not page.has_more:
                return
            after = page.next_after

    def stream(self, job_id: str, *, last_event_id: str | None = None) -> AsyncGenerator[Event, None]:
        """``async for event in client.stream(job_id)``; ``aclose()`` it to stop early."""
        return self._follow(_core.EventCursor(self.options, job_id, last_event_id))

    async def _follow(self, cursor: _core.EventCursor) -> AsyncGenerator[Event, None]:
        while not cursor.done:
            path, headers, timeout = cursor.connect()
            try:
                async with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code != 200:
                        await response.aread()
                        delay = cursor.refused(response)
                    else:
                        async for sse in EventSource(response).aiter_sse():
                            event = cursor.accept(sse)
                            if event is not None:
                                yield event
                            if cursor.done:
                                return
                        delay = cursor.lost(None)
            except httpx.TransportError as e:
                delay = cursor.lost(e)
            except SSEError as e:
                raise APIConnectionError(f"events of {cursor.job_id}: {e}") from e
            await asyncio.sleep(delay)

    async def wait(self, job_id: str, *, timeout_s: float | None = None) -> Job:
        cursor = _core.EventCursor(self.options, job_id, timeout_s=timeout_s)
        job = await self.get(job_id)
        if job.terminal:
            return job
        try:
            async for _ in self._follow(cursor):
                pass
        except RateLimitError:
            for delay in _core.poll_delays():
                job = await self.get(job_id)
                if job.terminal:
                    return job
                cursor.check_deadline()
                await asyncio.sleep(min(delay, cursor.remaining_s() or delay))
        return await self.get(job_id)

    async def run(self, request: RequestLike | None = None, /, *, timeout_s: float | None = None, **fields: Any) -> Job:
        job = await self.submit(_core.as_request(request, **fields))
        return await self.wait(job.id, timeout_s=timeout_s)

    @overload
    async def run_many(
        self,
        requests: Iterable[RequestLike],
        *,
        concurrency: int = ...,
        on_progress: Callable[[Progress[Job]], object] | None = ...,
        timeout_s: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> Jobs: ...

    @overload
    async def run_many(
        self,
        requests: Iterable[RequestLike],
        *,
        concurrency: int = ...,
        on_progress: Callable[[Progress[Job | GenqError]], object] | None = ...,
        timeout_s: float | None = ...,
        return_exceptions: Literal[True],
    ) -> Outcomes: ...

    async def run_many(
        self,
        requests: Iterable[RequestLike],
        *,
        concurrency: int = 8,
        on_progress: Callable[[Any], object] | None = None,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> Jobs | Outcomes:
        """As :meth:`genq.Client.run_many`; ``on_progress`` may also be a coroutine function.
        A failure cancels the other runs (their jobs keep running on the server)."""
        reqs = [_core.as_request(r) for r in requests]
        results: list[Any] = [None] * len(reqs)
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        pending = iter(enumerate(reqs))
        done = 0

        async def runner() -> None:
            nonlocal done
            for index, req in pending:  # shared: each runner takes the next request
                try:
                    results[index] = await self.run(req, timeout_s=timeout_s)
                except GenqError as e:
                    if not return_exceptions:
                        raise
                    results[index] = e
                done += 1
                if on_progress is not None:
                    told = on_progress(Progress(done, len(reqs), index, results[index]))
                    if inspect.isawaitable(told):
                        await told

        tasks = [asyncio.create_task(runner(), name=f"genq-run-{i}") for i in range(min(concurrency, len(reqs)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return results
