"""The broker's error tree and the integer codes its Lua scripts return.

Errors carry structured fields (what was asked, what the limit is); the API alone turns
them into words and HTTP answers (``api/errors.py``). Each has a plain default message
for logs and for callers that are not the API. redis-py's connection and timeout errors
never leave the broker: they become :class:`Unavailable`, and so do the errors that mean
"the topology is changing" (a demoted master, a failover or reshard in a Sentinel or Cluster).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import ParamSpec, TypeVar

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


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
    IDEMPOTENCY_CONFLICT = 18  # admit: idempotency key already used for another request
    NOT_FOUND = 20
    STALE_LEASE = 21  # fencing token no longer current
    ALREADY_TERMINAL = 22
    CANCEL_REQUESTED = 23  # cancel: job is running; the owning worker was told


class BrokerError(Exception):
    """Base of every error the broker raises. ``field`` names the JobSpec field at fault."""

    code: str = "broker_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Unavailable(BrokerError):
    """Redis could not be reached (or answered too late); retrying later may work."""

    code = "unavailable"


class InvalidRequest(BrokerError):
    code = "invalid_request"


class LimitExceeded(InvalidRequest):
    """A number in the request is above a limit: ``value`` > ``limit`` (``field`` says which)."""

    code = "limit_exceeded"

    def __init__(self, field: str, value: int, limit: int) -> None:
        super().__init__(f"{field} is {value}; the limit is {limit}", field=field)
        self.value, self.limit = value, limit


class PriorityNotAllowed(InvalidRequest):
    code = "priority_not_allowed"

    def __init__(self, priority: int) -> None:
        super().__init__(f"priority {priority} is not allowed for this tenant", field="priority")
        self.priority = priority


class UnknownModel(InvalidRequest):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"unknown model {model!r}", field="model")
        self.model = model


class ContextTooLong(InvalidRequest):
    """``prompt_tokens`` + ``max_tokens`` do not fit in ``max_model_len``."""

    code = "context_length_exceeded"

    def __init__(self, max_model_len: int, prompt_tokens: int, max_tokens: int) -> None:
        super().__init__(f"{prompt_tokens} + {max_tokens} tokens > max_model_len {max_model_len}", field="input")
        self.max_model_len, self.prompt_tokens, self.max_tokens = max_model_len, prompt_tokens, max_tokens


class IdempotencyConflict(BrokerError):
    """The idempotency key was already used for a different request (``job_id``)."""

    code = "idempotency_conflict"

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was used for another request ({job_id})", field="idempotency_key")
        self.key, self.job_id = key, job_id


class NotFound(BrokerError):
    code = "not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}", field="job_id")
        self.job_id = job_id


class StaleLease(BrokerError):
    """A worker wrote with a fencing token that is no longer the job's."""

    code = "stale_lease"

    def __init__(self, job_id: str, fence: int) -> None:
        super().__init__(f"lease on {job_id} (fence {fence}) is no longer held")
        self.job_id, self.fence = job_id, fence


class AlreadyTerminal(BrokerError):
    code = "already_terminal"

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} is already {status}")
        self.job_id, self.status = job_id, status


class AdmissionRefused(BrokerError):
    """Admission said no; ``retry_after_ms`` says when trying again makes sense."""

    code = "rejected"

    def __init__(self, reason: str, retry_after_ms: int, limits: dict[str, int] | None = None) -> None:
        super().__init__(f"admission refused: {reason}")
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        self.limits = limits or {}


class RateLimited(AdmissionRefused):
    code = "rate_limit_exceeded"


class QueueFull(AdmissionRefused):
    code = "queue_full"


class RedisMisconfigured(BrokerError):
    code = "redis_misconfigured"


class BadRedisUrl(BrokerError, ValueError):
    """``GENQ_REDIS_URL`` names nothing genq can connect to (a ValueError for settings validation)."""

    code = "bad_redis_url"

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"GENQ_REDIS_URL {_redact(url)!r}: {problem}", field="redis_url")
        self.problem = problem


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    head, sep, tail = url.partition("://")
    userinfo, at, hosts = tail.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{head}://{userinfo.partition(':')[0]}:***@{hosts}"


# Refusal codes -> (exception class, reason).
REFUSALS: dict[Code, tuple[type[AdmissionRefused], str]] = {
    Code.RATE_REQUESTS: (RateLimited, "requests"),
    Code.RATE_TOKENS: (RateLimited, "tokens"),
    Code.TENANT_QUEUE_FULL: (RateLimited, "tenant_queue_full"),
    Code.QUEUE_FULL: (QueueFull, "queue_full"),
}


# redis-py errors that mean "Redis is not reachable right now" (after its own retries), or
# "the topology is changing": a demoted master (READONLY; MASTERDOWN is a ClusterDownError),
# a cluster failover or reshard (CLUSTERDOWN, TRYAGAIN, MOVED/ASK left after redirections,
# "TTL exhausted"). Sentinel's MasterNotFoundError and SlaveNotFoundError are ConnectionErrors.
REDIS_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    ClusterDownError,
    ClusterError,
    TryAgainError,
    AskError,  # MovedError too
    SlotNotCoveredError,
)
# Replies without a class of their own: writes refused for lack of in-sync replicas
# (min-replicas-to-write), a blocked call released because the server changed role, a WAIT
# that reached a master demoted meanwhile.
_DOWN_REPLIES = ("NOREPLICAS", "UNBLOCKED", "WAIT cannot be used with replica", "ERR WAIT cannot be used with replica")


def topology_changing(e: BaseException) -> bool:
    """Whether a redis-py error means Redis is away or switching (retrying later may work)."""
    if isinstance(e, REDIS_DOWN):
        return True
    if not isinstance(e, ResponseError):
        return False
    reply = str(e)
    marker = "of pipeline caused error: "  # redis-py prefixes a pipelined reply: Command # 2 (WAIT 1 500) ...
    if marker in reply:
        reply = reply.split(marker, 1)[1].lstrip("('\"")
    return reply.startswith(_DOWN_REPLIES)


P = ParamSpec("P")
R = TypeVar("R")


def translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn redis-py's connection, timeout and failover errors into :class:`errors.Unavailable`."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (*REDIS_DOWN, ResponseError) as e:
            if not topology_changing(e):
                raise
            raise Unavailable(f"Redis unavailable: {type(e).__name__}: {e}") from e

    return wrapper


def translate_public(cls: type) -> None:
    """Wrap every public coroutine method of ``cls``, its own and inherited, in :func:`translated`:
    callers see :class:`Unavailable`, never a redis-py error."""
    for name, fn in inspect.getmembers(cls, inspect.iscoroutinefunction):
        if not name.startswith("_"):
            setattr(cls, name, translated(fn))
