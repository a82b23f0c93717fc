"""Every HTTP error status is chosen here, and every error body has the OpenAI shape.

``{"error": {"message": str, "type": str, "code": str | null, "param": str | null}}``

=========================  ======  =========================  ==============================
cause                      status  type                       code
=========================  ======  =========================  ==============================
invalid body / param       400     invalid_request_error      invalid_request / validation
prompt + max_tokens > ctx  400     invalid_request_error      context_length_exceeded
missing / bad / revoked    401     invalid_request_error      invalid_api_key
not an admin key           403     permission_error           insufficient_permissions
unknown job / other tenant 404     invalid_request_error      not_found
unknown model              404     invalid_request_error      model_not_found
unknown file / batch       404     invalid_request_error      not_found (another tenant's too)
uploaded file too large    413     invalid_request_error      file_too_large
batch already finished     409     invalid_request_error      batch_not_cancellable
job already finished       409     invalid_request_error      already_terminal
Idempotency-Key reused     422     invalid_request_error      idempotency_key_reused (another body)
body too large             413     invalid_request_error      request_too_large
tenant rate limits         429     requests / tokens          rate_limit_exceeded (+ Retry-After)
tenant queue / SSE limit   429     rate_limit_error           tenant_queue_full / too_many_streams
global queue full          503     overloaded_error           queue_full (+ Retry-After)
no live worker (OpenAI)    503     overloaded_error           no_worker (+ Retry-After)
Redis unreachable          503     overloaded_error           redis_unavailable (+ Retry-After)
sync OpenAI call too long  504     server_error               timeout (the job is cancelled)
job still queued at its    408     invalid_request_error      deadline_exceeded (its own
deadline                                                      max_time_in_queue_s)
job failed on its worker   500     server_error               the job's error code (OpenAI routes)
client went away           499     invalid_request_error      client_closed (nobody reads it)
anything else              500     server_error               internal_error (no details)
=========================  ======  =========================  ==============================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker import errors as be
from broker.contract import CLIENT_ERRORS, EventType, JobErrorCode

log = structlog.get_logger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error shape (listed in /openapi.json)."""

    error: ErrorDetail


class ApiError(Exception):
    """An error the API answers with; raise it anywhere in a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def retry_after_s(ms: int) -> int:
    """``Retry-After`` is whole seconds: round up, and never tell a client to retry at once."""
    return max(1, math.ceil(ms / 1000))


def unauthorized(message: str = "Incorrect API key provided.") -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str = "This endpoint needs an admin key.") -> ApiError:
    return ApiError(403, message, type="permission_error", code="insufficient_permissions")


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def bad_webhook_url(reason: str, url: str, detail: str) -> ApiError:
    """A webhook URL genq will not POST to; ``reason`` is its batcher.webhook_urls.Refusal."""
    if reason == "private":
        message = (
            f"webhook_url points at a non-public address ({detail[:80]}: private, loopback, link-local, "
            "multicast or reserved); set GENQ_WEBHOOKS_ALLOW_PRIVATE=true to allow such addresses."
        )
    elif reason == "unresolvable":
        message = f"webhook_url names a host that does not resolve: {detail[:200]!r}."
    else:
        message = f"webhook_url must be an absolute http:// or https:// URL with a host, got {url[:200]!r}."
    return bad_request(message, "webhook_url")


def too_many_streams(limit: int) -> ApiError:
    return ApiError(
        429,
        f"Too many open event streams for this key (limit {limit}).",
        type="rate_limit_error",
        code="too_many_streams",
        headers={"Retry-After": "1"},
    )


def from_job_end(event_type: EventType, data: dict[str, Any]) -> ApiError:
    """A job that ended without output (``failed`` / ``cancelled`` / ``expired``), for the OpenAI routes."""
    # The job already had its attempts: the openai client must not resubmit it as a new job.
    final = {"x-should-retry": "false"}
    if event_type is EventType.CANCELLED:
        return ApiError(409, "The job was cancelled before it finished.", code="job_cancelled", headers=final)
    code = str(data.get("code") or "job_failed")
    message = str(data.get("message") or "The job failed.")
    if event_type is EventType.EXPIRED:
        # The client's own deadline passed (408, like a request timeout it set): not a server
        # error, and not retried by the openai client (the same deadline would pass again).
        return ApiError(408, f"The job expired: {message}.", code=JobErrorCode.DEADLINE_EXCEEDED.value, headers=final)
    if code in CLIENT_ERRORS:
        return ApiError(400, message, code=code, headers=final)
    return ApiError(500, f"The job failed: {message}", type="server_error", code=code, headers=final)


def sync_timeout(timeout_s: float) -> ApiError:
    return ApiError(
        504,
        f"The job did not finish within {timeout_s:g} s; it was cancelled. Use streaming or "
        "background mode for long jobs.",
        type="server_error",
        code="timeout",
    )


def no_worker(model: str, retry_after: int, kept_s: float | None) -> ApiError:
    """A synchronous or streamed OpenAI call for a model no live worker serves, after the grace."""
    fate = (
        f"its job stays queued {kept_s:g} s for a retry with the same Idempotency-Key"
        if kept_s
        else "its job was cancelled"
    )
    return ApiError(
        503,
        f"No live worker serves the model `{model[:128]}` yet; {fate}. Retry later, or use background mode.",
        type="overloaded_error",
        code="no_worker",
        headers={"Retry-After": str(max(1, retry_after))},
    )


def no_such(kind: str, object_id: str, param: str) -> ApiError:
    """An unknown file or batch (or another tenant's: it does not exist for this key)."""
    return ApiError(404, f"No such {kind} object: '{object_id[:80]}'.", code="not_found", param=param)


def file_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The file is larger than the limit of {limit} bytes.", code="file_too_large", param="file")


def batch_not_cancellable(batch_id: str, status: str) -> ApiError:
    return ApiError(
        409,
        f"Batch '{batch_id}' is {status}: only a validating or in-progress batch can be cancelled.",
        code="batch_not_cancellable",
    )


def client_closed() -> ApiError:
    return ApiError(499, "Client closed the request.", code="client_closed")


def _field_param(e: be.BrokerError, kind: str = "chat") -> str | None:
    """The OpenAI request field a broker error's JobSpec field corresponds to."""
    if e.field == "input":
        return "messages" if kind == "chat" else "prompt"
    if e.field in ("tokens", "request_bytes"):
        return "max_tokens" if e.field == "tokens" else ("messages" if kind == "chat" else "prompt")
    if e.field == "idempotency_key":
        return "Idempotency-Key"
    return e.field


def from_broker(e: be.BrokerError, kind: str = "chat") -> ApiError:
    """Translate a broker error at the boundary: every word a client reads is written here."""
    if isinstance(e, be.AdmissionRefused):
        headers = {"Retry-After": str(retry_after_s(e.retry_after_ms)), **ratelimit_headers(e.limits)}
        if isinstance(e, be.QueueFull):
            return ApiError(
                503, "The queue is full; try again later.", type="overloaded_error", code="queue_full", headers=headers
            )
        if e.reason in ("requests", "tokens"):
            message = f"Rate limit reached for {e.reason} per minute."
            return ApiError(429, message, type=e.reason, code="rate_limit_exceeded", headers=headers)
        return ApiError(
            429, "Too many queued jobs for this tenant.", type="rate_limit_error", code=e.reason, headers=headers
        )
    if isinstance(e, be.Unavailable):
        log.error("redis unavailable", error=e.message)
        return ApiError(
            503,
            "The queue is temporarily unavailable.",
            type="overloaded_error",
            code="redis_unavailable",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, be.UnknownModel):
        return ApiError(404, f"The model `{e.model[:128]}` does not exist.", code="model_not_found", param="model")
    if isinstance(e, be.ContextTooLong):
        message = (
            f"This model's maximum context length is {e.max_model_len} tokens. However, you requested "
            f"{e.prompt_tokens + e.max_tokens} tokens ({e.prompt_tokens} in the "
            f"{'messages' if kind == 'chat' else 'prompt'}, {e.max_tokens} in the completion)."
        )
        if e.max_tokens == 0:
            message = (
                f"This model's maximum context length is {e.max_model_len} tokens. However, your prompt has "
                f"{e.prompt_tokens} tokens, which leaves no room for a completion."
            )
        return ApiError(400, message, code="context_length_exceeded", param=_field_param(e, kind))
    if isinstance(e, be.LimitExceeded):
        if e.field == "tokens":
            message = f"Request needs {e.value} tokens, more than this tenant's token burst of {e.limit}."
        elif e.field == "request_bytes":
            message = f"The request is {e.value} bytes; the limit is {e.limit}."
        else:
            message = f"{e.field} must be at most {e.limit}, got {e.value}."
        return ApiError(400, message, code="invalid_request", param=_field_param(e, kind))
    if isinstance(e, be.PriorityNotAllowed):
        return ApiError(
            400, f"Priority {e.priority} is not allowed for this key.", code="invalid_request", param="priority"
        )
    if isinstance(e, be.IdempotencyConflict):
        return ApiError(
            422,
            f"This Idempotency-Key was already used for a different request (job {e.job_id}); "
            "use a new key for a new request.",
            code="idempotency_key_reused",
            param="Idempotency-Key",
        )
    if isinstance(e, be.InvalidRequest):
        return ApiError(400, e.message, code="invalid_request", param=_field_param(e, kind))
    if isinstance(e, be.NotFound):
        return ApiError(404, f"No job found with id '{e.job_id[:80]}'.", code="not_found", param="job_id")
    if isinstance(e, be.AlreadyTerminal):
        return ApiError(409, f"Job '{e.job_id}' is already {e.status}.", code="already_terminal")
    log.error("unmapped broker error", error=repr(e))
    return ApiError(
        500, "The server had an error while processing your request.", type="server_error", code="internal_error"
    )


def _duration(ms: int) -> str:
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"


def ratelimit_headers(limits: dict[str, int]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for each limited dimension (unlimited ones are left out)."""
    out: dict[str, str] = {}
    for short, name in (("rq", "requests"), ("tk", "tokens")):
        limit = limits.get(f"{short}_limit", 0)
        if limit > 0:
            out[f"x-ratelimit-limit-{name}"] = str(limit)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, limits.get(f"{short}_remaining", 0)))
            out[f"x-ratelimit-reset-{name}"] = _duration(max(0, limits.get(f"{short}_reset_ms", 0)))
    return out


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``messages.0.role``; headers keep their name."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) or None


def validation_error(errs: Sequence[Mapping[str, Any]]) -> ApiError:
    first: Mapping[str, Any] = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    param = _param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return bad_request("We could not parse the JSON body of your request.", None, "invalid_json")
    message = f"{msg} (at '{param}')" if param else msg
    if len(errs) > 1:
        message += f"; and {len(errs) - 1} more problem(s)"
    return bad_request(message, param, "invalid_request")


def install(app: FastAPI) -> None:
    """Register the handlers; unhandled exceptions are caught by the access-log middleware."""

    async def api_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, ApiError)
        return e.response()

    async def broker_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, be.BrokerError)
        return from_broker(e).response()

    async def request_validation(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, (RequestValidationError, ValidationError))
        return validation_error(list(e.errors())).response()

    async def http_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, StarletteHTTPException)
        if e.status_code == 404:
            err = ApiError(404, "Unknown request URL.", code="unknown_url")
        elif e.status_code == 405:
            err = ApiError(405, "Method not allowed for this URL.", code="method_not_allowed")
        elif e.status_code >= 500:
            err = ApiError(e.status_code, "The server had an error.", type="server_error", code="internal_error")
        else:
            err = ApiError(e.status_code, str(e.detail), code="http_error")
        err.headers.update(e.headers or {})
        return err.response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(be.BrokerError, broker_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(ValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)


INTERNAL_ERROR = error_body("The server had an error while processing your request.", "server_error", "internal_error")


def openapi_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for route decorators, so the schema lists the error answers."""
    return {s: {"model": ErrorResponse, "description": "error"} for s in statuses}
