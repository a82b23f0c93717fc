"""Oversized request heads against a real `genq api` process: 431 before auth, memory flat."""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHARED_REDIS, free_port

pytestmark = pytest.mark.timeout(120)
HEADER_MB = 32
CLIENTS = 8


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = {
        **os.environ,
        "GENQ_REDIS_URL": SHARED_REDIS,
        "GENQ_QUEUE": "t" + secrets.token_hex(6),
        "GENQ_MODELS": '["m"]',
    }
    log = open(tmp_path / "api.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "genq.cli", "api", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "genq api did not come up"
        time.sleep(0.1)  # a child process coming up: no event to wait on but its port
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def send_huge_header(port: int, size: int, results: list[bytes]) -> None:
    """Send a request whose one header is ``size`` bytes, stopping when the server answers."""
    piece = b"a" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < size:
                if select.select([s], [], [], 0)[0]:
                    break  # the server has answered: stop sending
                s.sendall(piece)
                sent += len(piece)
            s.sendall(b"\r\n\r\n")
        except OSError:  # the server closed after its answer
            pass
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except OSError:
            pass
    results.append(reply)


def test_oversized_headers_get_431_and_memory_stays_flat(api: tuple[str, subprocess.Popen]) -> None:
    url, proc = api
    port = int(url.rsplit(":", 1)[1])
    before = rss_mb(proc.pid)
    results: list[bytes] = []
    threads = [threading.Thread(target=send_huge_header, args=(port, HEADER_MB << 20, results)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = rss_mb(proc.pid)
    assert len(results) == CLIENTS
    for reply in results:
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
        assert b"request_header_fields_too_large" in reply
    assert after - before < 40, f"API memory {before:.0f} -> {after:.0f} MB"
    # the server still serves, and ordinary (even large-ish) heads pass
    r = httpx.get(f"{url}/v1/jobs", headers={"X-Pad": "p" * 16_000}, timeout=10)
    assert r.status_code == 401  # reached auth


def test_declared_oversized_body_refused_before_auth(api: tuple[str, subprocess.Popen]) -> None:
    url, _ = api
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        s.sendall(b"Content-Length: 1000000000\r\n\r\n")  # no key, and a body it never sends
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


def test_a_whole_large_request_in_one_chunk_is_not_a_large_head(api: tuple[str, subprocess.Popen]) -> None:
    """A request whose head and (large) body arrive in one read is a small head: it reaches auth,
    not 431 (seen: a 77 KB batch file upload answered 431 on a reused connection)."""
    url, _ = api
    body = json.dumps({"model": "m", "prompt": "x" * 150_000}).encode()
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
        for _ in range(3):  # kept alive: each whole request one send
            s.sendall(head.encode() + body)
            reply = read_response(s)
            assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]


def read_response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body) from ``s``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
    )
    while len(rest) < length:
        rest += s.recv(65536)
    return head + b"\r\n\r\n" + rest
