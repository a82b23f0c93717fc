"""The client's error tree: every failure it raises is a :class:`GenqError`.

An HTTP error answer becomes an :class:`APIError` subclass chosen by status, carrying the
OpenAI error fields the server wrote (``message``, ``type``, ``code``, ``param``) and, on
429 and 503, ``retry_after_s``. httpx's transport errors are translated at the boundary into
:class:`APIConnectionError` (after the client's retries).
"""

from __future__ import annotations

from typing import Any


class GenqError(Exception):
    """Anything the genq client raises."""


class APIConnectionError(GenqError):
    """The API could not be reached, or the connection broke, and retrying did not help."""


class WaitTimeout(GenqError, TimeoutError):
    """``wait`` (or ``run_many``) gave up before the job finished; the job keeps running."""

    def __init__(self, job_id: str, timeout_s: float) -> None:
        super().__init__(f"job {job_id} did not finish within {timeout_s:g} s")
        self.job_id, self.timeout_s = job_id, timeout_s


class APIError(GenqError):
    """The API answered with an error (the OpenAI error shape)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{status} {code or type or 'error'}: {message}")
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        self.body = body


class BadRequestError(APIError):
    """400: the request was refused as it is (``param`` names the field when the server knows it)."""


class AuthenticationError(APIError):
    """401: missing, unknown or revoked API key."""


class PermissionDeniedError(APIError):
    """403: the key may not do this (an admin endpoint)."""


class NotFoundError(APIError):
    """404: no such job (or another tenant's), or an unknown model."""


class ConflictError(APIError):
    """409: e.g. cancelling a job that already finished (``code`` ``already_terminal``)."""


class UnprocessableEntityError(APIError):
    """422: e.g. an Idempotency-Key reused with a different request."""


class RateLimitError(APIError):
    """429: a tenant limit (rate, queued jobs, open streams); ``retry_after_s`` says when to retry."""


class InternalServerError(APIError):
    """5xx other than 503."""


class OverloadedError(APIError):
    """503: the queue is full, no worker, or Redis is unreachable; ``retry_after_s`` says when to retry."""


BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: OverloadedError,
}


def error_class(status: int) -> type[APIError]:
    return BY_STATUS.get(status, InternalServerError if status >= 500 else APIError)
