"""A TCP proxy in front of the test API that breaks connections on cue, for the client's tests.

It forwards bytes both ways and, when its ``cut`` rule says so, forwards only part of a chunk
from the server and then aborts both sides (a reset, as when a network path dies): the client
sees a real broken connection mid-answer, not a mock. It runs on the stack's loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from test_api_support import Stack

LAST_EVENT_ID = re.compile(rb"(?im)^last-event-id: *([0-9-]+)\r$")


@dataclass
class Conn:
    """What one proxied connection has carried so far."""

    sent: bytearray = field(default_factory=bytearray)  # client -> server
    received: bytearray = field(default_factory=bytearray)  # server -> client, before this chunk


# (connection, the next chunk from the server) -> how many of its bytes to forward before the cut,
# or None to forward it all and keep going.
CutRule = Callable[[Conn, bytes], int | None]


class CutProxy:
    def __init__(self, stack: Stack, rule: CutRule) -> None:
        self.stack, self.rule = stack, rule
        self.upstream_port = stack.server.port
        self.cuts = 0
        self.conns: list[Conn] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def __enter__(self) -> CutProxy:
        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

        self.stack.portal.run(start())
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()

        self.stack.portal.run(stop())

    def resumed_from(self) -> list[str]:
        """The Last-Event-ID of every request that carried one, in order."""
        return [m.decode() for c in self.conns for m in LAST_EVENT_ID.findall(bytes(c.sent))]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        conn = Conn()
        self.conns.append(conn)
        self._writers |= {writer, up_writer}

        def abort() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        async def to_server() -> None:
            while data := await reader.read(65536):
                conn.sent += data
                up_writer.write(data)
                await up_writer.drain()
            abort()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                keep = self.rule(conn, data)
                if keep is not None:
                    self.cuts += 1
                    writer.write(data[:keep])
                    await writer.drain()
                    abort()
                    return
                conn.received += data
                writer.write(data)
                await writer.drain()
            abort()

        try:
            await asyncio.gather(to_server(), to_client())
        except (ConnectionError, OSError):
            abort()
        finally:
            self._writers -= {writer, up_writer}
            with contextlib.suppress(Exception):
                writer.close()
                up_writer.close()


def cut_streams(times: int, after_tokens: int) -> CutRule:
    """Cut the first ``times`` event streams once ``after_tokens`` token events have gone through
    on their connection, in the middle of the next token event (so a half event is left over)."""
    left = [times]

    def rule(conn: Conn, chunk: bytes) -> int | None:
        if not left[0] or b"text/event-stream" not in conn.received + chunk:
            return None
        seen = conn.received.count(b"event: token")
        at = -1
        for _ in range(max(0, after_tokens - seen) + 1):  # the token event to cut through
            at = chunk.find(b"event: token", at + 1)
            if at < 0:
                return None
        left[0] -= 1
        return at + len(b"event: to")

    return rule


def lose_first_answer(method_path: bytes) -> CutRule:
    """Drop the connection carrying the server's first answer to ``method_path`` (say
    ``b"POST /v1/jobs "``) before a byte of it reaches the client: the request was served, its
    answer lost."""
    left = [1]

    def rule(conn: Conn, chunk: bytes) -> int | None:
        if left[0] and method_path in conn.sent and not conn.received:
            left[0] -= 1
            return 0
        return None

    return rule
