"""The broker's error tree and the integer codes its Lua scripts return."""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """Return codes shared by every Lua script (first element of the reply)."""

    OK = 0
    DUPLICATE = 1  # admit: idempotency key already used -> same job
    RATE_REQUESTS = 10
    RATE_TOKENS = 11
    TENANT_QUEUE_FULL = 12
    QUEUE_FULL = 13
    TOO_LARGE_FOR_LIMIT = 14
    UNKNOWN_MODEL = 15
    CONTEXT_TOO_LONG = 16
    PRIORITY_NOT_ALLOWED = 17
    NOT_FOUND = 20
    STALE_LEASE = 21  # fencing token no longer current
    ALREADY_TERMINAL = 22
    CANCEL_REQUESTED = 23  # cancel: job is running; the owning worker was told


class BrokerError(Exception):
    """Base of every error the broker raises."""

    code: str = "broker_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(BrokerError):
    code = "invalid_request"


class UnknownModel(InvalidRequest):
    code = "model_not_found"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class NotFound(BrokerError):
    code = "not_found"


class StaleLease(BrokerError):
    """A worker wrote with a fencing token that is no longer the job's."""

    code = "stale_lease"


class AlreadyTerminal(BrokerError):
    code = "already_terminal"


class AdmissionRefused(BrokerError):
    """Admission said no; ``retry_after_ms`` says when trying again makes sense."""

    code = "rejected"

    def __init__(self, reason: str, message: str, retry_after_ms: int, limits: dict | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        self.limits = limits or {}


class RateLimited(AdmissionRefused):
    code = "rate_limit_exceeded"


class QueueFull(AdmissionRefused):
    code = "queue_full"


class RedisMisconfigured(BrokerError):
    code = "redis_misconfigured"


REFUSALS: dict[Code, tuple[type[AdmissionRefused], str, str]] = {
    Code.RATE_REQUESTS: (RateLimited, "requests", "Rate limit reached for requests per minute."),
    Code.RATE_TOKENS: (RateLimited, "tokens", "Rate limit reached for tokens per minute."),
    Code.TENANT_QUEUE_FULL: (RateLimited, "tenant_queue_full", "Too many queued jobs for this tenant."),
    Code.QUEUE_FULL: (QueueFull, "queue_full", "The queue is full; try again later."),
}
