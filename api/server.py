"""Serving the app with uvicorn: bounded request heads, and the one place uvicorn is configured.

uvicorn's default HTTP parser (httptools) buffers a request head of any size: eight 32 MB
headers took the API from 76 to 333 MB before any auth ran. :class:`BoundedHttpTools`
counts the bytes of a head as they arrive and answers 431 past ``max_header_bytes``,
then discards the rest for a moment before closing (a lingering close, so the client
reads the 431 instead of a reset). The body limit (413) is the access middleware's,
also before auth. Without httptools, h11's own buffer limit applies (it answers 400).
"""

from __future__ import annotations

import json
from typing import Any

import structlog
import uvicorn

from api.errors import error_body
from api.settings import ApiSettings

log = structlog.get_logger(__name__)

LINGER_S = 2.0  # after a 431, read and drop what the client still sends, then close

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: h11 it is
    HttpToolsProtocol = None  # type: ignore[misc,assignment]  # the optional-import idiom


def _response_431(limit: int) -> bytes:
    body = json.dumps(
        error_body(
            f"Request headers are larger than {limit} bytes.",
            "invalid_request_error",
            "request_header_fields_too_large",
        )
    ).encode()
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


if HttpToolsProtocol is not None:

    class BoundedHttpTools(HttpToolsProtocol):
        """httptools with a bound on each request head (request line + headers)."""

        max_head_bytes = 64 * 1024

        def connection_made(self, transport: Any) -> None:
            self._head_bytes = 0
            self._in_head = True  # between requests too: the next bytes start a head
            self._heads = 0  # heads completed on this connection
            self._refused = False
            super().connection_made(transport)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            self._heads += 1
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering after a 431: drop it
            was_in_head, heads = self._in_head, self._heads
            super().data_received(data)
            # Every byte of a chunk that began and ended inside one head belongs to it; a chunk in
            # which a head completed (a whole request, or a body's end and the next head's start)
            # is not counted: its tail, if any, is counted with the chunks that follow.
            if was_in_head and self._in_head and self._heads == heads and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head_bytes:
                    self._refuse()

        def _refuse(self) -> None:
            self._refused = True
            self.transport.write(_response_431(self.max_head_bytes))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
            log.warning("request headers too large", client=self.client, limit=self.max_head_bytes)


def http_protocol(max_header_bytes: int) -> Any:
    """The ``http`` argument for uvicorn: a bounded httptools protocol, else ``"h11"``."""
    if HttpToolsProtocol is None:
        return "h11"
    return type("BoundedHttpTools", (BoundedHttpTools,), {"max_head_bytes": max_header_bytes})


def uvicorn_options(settings: ApiSettings) -> dict[str, Any]:
    """uvicorn settings every genq API server uses (``genq api``, tests' live servers)."""
    return {
        "http": http_protocol(settings.max_header_bytes),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "access_log": False,
        "log_config": None,
        "timeout_graceful_shutdown": settings.drain_grace_s + 2,
    }


class DrainingServer(uvicorn.Server):
    """uvicorn, telling the app it drains before uvicorn starts closing anything."""

    def __init__(self, config: uvicorn.Config, on_exit: Any) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()  # act first
        super().handle_exit(sig, frame)


def serve(settings: ApiSettings) -> None:
    from api.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, **uvicorn_options(settings))
    DrainingServer(config, app.state.drain.start).run()
