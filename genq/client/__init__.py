"""The genq Python client: ``Client`` (blocking) and ``AsyncClient`` (asyncio) for the native
jobs API, over httpx. It talks HTTP only (no Redis, no server code), so it is all a program
needs to submit, follow and collect jobs.

- ``models``: the HTTP shapes (``Job``, ``Event``, ``JobPage``, ``JobRequest``, ``Progress``).
- ``errors``: ``GenqError`` and, for error answers, ``APIError`` subclasses by status.
- ``_core``: what both clients share (requests, parsing, retries, stream resumption).
"""

from genq.client.aio import AsyncClient
from genq.client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GenqError,
    InternalServerError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
    WaitTimeout,
)
from genq.client.models import Event, EventType, Job, JobPage, JobRequest, JobStatus, Progress
from genq.client.sync import Client

__all__ = [
    "APIConnectionError",
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Event",
    "EventType",
    "GenqError",
    "InternalServerError",
    "Job",
    "JobPage",
    "JobRequest",
    "JobStatus",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "Progress",
    "RateLimitError",
    "UnprocessableEntityError",
    "WaitTimeout",
]
