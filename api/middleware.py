"""One pure-ASGI middleware: request id, body size limit, last-resort 500, one access line per request.

Pure ASGI (not BaseHTTPMiddleware) so SSE responses pass through unbuffered. The
access line is written when the response ends (for a stream: when it closes).
Handlers add fields to it with :func:`api.runtime.note`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import INTERNAL_ERROR, error_body
from api.metrics import ApiMetrics

log = structlog.get_logger("api.access")
DRAIN_LIMIT = 16 * 1024 * 1024  # past this a refused upload is cut off instead of read
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class BodyTooLarge(Exception):
    pass


async def _json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class AccessMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: ApiMetrics, max_body_bytes: int, uploads: dict[str, int] | None = None
    ) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        # Upload paths (POST) -> their own body limit: streamed to the app, not buffered here.
        self.uploads = uploads or {}

    async def _buffer(self, receive: Receive, declared: int | None) -> list[Message]:
        """Read the whole body (bounded) before the app runs; JSON bodies are small."""
        messages, size = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                return messages
            size += len(msg.get("body", b""))
            if size > self.max_body_bytes or (declared or 0) > self.max_body_bytes:
                await self._discard(receive, msg, size)
                raise BodyTooLarge
            if not msg.get("more_body"):
                return messages

    async def _discard(self, receive: Receive, msg: Message, size: int) -> None:
        """Read the rest of a refused body (up to a bound) so the client can read our 413."""
        while msg.get("more_body") and size <= DRAIN_LIMIT:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            size += len(msg.get("body", b""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        rid_header = (b"x-request-id", rid.encode())
        fields: dict[str, Any] = scope.setdefault("genq.log", {})
        status, started = 0, time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                cl = headers.get(b"content-length")
                declared = int(cl) if cl and cl.isdigit() else None
                upload_limit = self.uploads.get(scope.get("path", "")) if scope.get("method") == "POST" else None
                limit = upload_limit or self.max_body_bytes
                try:
                    if upload_limit is None:
                        if (declared or 0) > self.max_body_bytes:  # answered before a byte of it is read
                            raise BodyTooLarge
                        pending = await self._buffer(receive, declared)
                    elif (declared or 0) > upload_limit:  # the app checks the real size as it copies
                        await self._discard(receive, {"more_body": True}, 0)
                        raise BodyTooLarge
                    else:
                        pending = []
                except BodyTooLarge:
                    self.metrics.rejected("body_too_large")
                    body = error_body(
                        f"Request body is larger than {limit} bytes.",
                        "invalid_request_error",
                        "request_too_large",
                    )
                    await _json(send, 413, body, [rid_header, (b"connection", b"close")])
                    status = 413
                    return

                async def replay() -> Message:
                    return pending.pop(0) if pending else await receive()

                await self.app(scope, replay, send_wrapper)
            except Exception:
                log.exception("unhandled error", path=scope.get("path"))
                if status == 0:
                    status = 500
                    await _json(send, 500, INTERNAL_ERROR, [rid_header])
            finally:
                self._access(scope, status, started, fields)

    def _access(self, scope: Scope, status: int, started: float, fields: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        route_path = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.requests.labels(method, route_path, str(status)).inc()
        self.metrics.latency.labels(method, route_path).observe(elapsed)
        level = log.debug if route_path in ("/healthz", "/metrics", "/readyz") and status < 400 else log.info
        level(
            "request",
            method=method,
            path=scope.get("path"),
            status=status,
            latency_ms=round(elapsed * 1000, 1),
            **fields,
        )
