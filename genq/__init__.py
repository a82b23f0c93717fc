"""genq: the command line, the tools that span packages (``genq up``), and the Python client.

``from genq import Client, AsyncClient`` (and the client's models and errors) loads
``genq.client`` on first use, so ``import genq`` itself stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genq.client import (
        APIConnectionError,
        APIError,
        AsyncClient,
        AuthenticationError,
        BadRequestError,
        Client,
        ConflictError,
        Event,
        EventType,
        GenqError,
        InternalServerError,
        Job,
        JobPage,
        JobRequest,
        JobStatus,
        NotFoundError,
        OverloadedError,
        PermissionDeniedError,
        Progress,
        RateLimitError,
        UnprocessableEntityError,
        WaitTimeout,
    )

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
_CLIENT_NAMES = frozenset(__all__)


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        import genq.client

        return getattr(genq.client, name)
    raise AttributeError(f"module 'genq' has no attribute {name!r}")
