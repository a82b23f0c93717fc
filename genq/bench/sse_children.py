"""The child processes of ``genq bench sse``: SSE clients and the SIMULATED PRODUCER.

Each runs its own event loop (uvloop where installed) and talks to the benchmark over a
pipe: ``(tag, value)`` messages, see :mod:`genq.bench.common`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from array import array
from multiprocessing.connection import Connection
from typing import Any

from broker import Broker, BrokerSettings
from broker.client import OutputWrite as Delta
from broker.logs import configure_logging
from genq.bench.common import expect, recv

SSE_MODEL = "bench-sse"  # the queue the fan-out jobs live in


def _child(conn: Connection, serve: Any, *args: Any) -> None:
    configure_logging(level="WARNING")
    try:  # the clients and the producer are measuring tools: the cheaper their loop, the less they disturb
        import uvloop
    except ImportError:
        asyncio.run(serve(conn, *args))
    else:
        uvloop.run(serve(conn, *args))


def client_main(conn: Connection, url: str, key: str) -> None:
    _child(conn, _client, url, key)


def producer_main(conn: Connection, redis_url: str, queue: str) -> None:
    _child(conn, _producer, redis_url, queue)


# -- SSE clients (child processes) ------------------------------------------------------
async def _client(conn: Connection, url: str, key: str) -> None:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(30.0, read=120.0)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, headers=headers) as client:
        while True:
            cmd, arg = await recv(conn, 3600)
            if cmd == "stop":
                return
            if cmd == "follow":
                conn.send(("followed", await _follow_all(conn, client, arg)))
            elif cmd == "submit":
                conn.send(("submitted", await _submit(conn, client, *arg)))


async def _follow_all(conn: Connection, client: Any, job_ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": 0, "events": 0, "lat": array("d"), "last_ns": 0, "errors": []}
    subscribed, all_subscribed = 0, asyncio.Event()

    def on_first_event() -> None:
        nonlocal subscribed
        subscribed += 1
        if subscribed == len(job_ids):
            all_subscribed.set()

    async def one(job_id: str) -> None:
        # The first event (``queued``, read from the stream backlog) proves the API has
        # already subscribed this follower to the job's channel: nothing live is missed.
        first, buf = True, b""
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{job_id}: HTTP {resp.status_code} {(await resp.aread())[:200]!r}")
            async for chunk in resp.aiter_raw():
                now = time.time_ns()
                *blocks, buf = (buf + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
                for block in blocks:
                    etype, data = b"", b""
                    for line in block.split(b"\n"):
                        if line.startswith(b"event: "):
                            etype = line[7:]
                        elif line.startswith(b"data: "):
                            data = line[6:]
                    if not etype:
                        continue  # a keep-alive comment
                    if first:
                        first = False
                        on_first_event()
                    if etype == b"token":
                        d = json.loads(data)
                        out["tokens"] += d["n"]
                        out["events"] += 1
                        out["lat"].append((now - int(d["text"].partition("|")[0])) / 1e6)
                        out["last_ns"] = now
                    elif etype in (b"done", b"failed", b"cancelled", b"error"):
                        if etype != b"done":
                            out["errors"].append(f"{job_id}: {etype.decode()} {data[:200]!r}")
                        return
        out["errors"].append(f"{job_id}: the stream ended without a terminal event")

    tasks = [asyncio.create_task(one(j)) for j in job_ids]
    waiter = asyncio.create_task(all_subscribed.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED, timeout=120)
    if not all_subscribed.is_set():
        for t in [waiter, *tasks]:
            t.cancel()
        raise RuntimeError(
            f"only {subscribed} of {len(job_ids)} followers got their first event: "
            f"{[repr(t.exception()) for t in tasks if t.done() and not t.cancelled()][:3]}"
        )
    conn.send(("subscribed", len(job_ids)))
    for t in asyncio.as_completed(tasks):
        try:
            await t
        except Exception as e:  # noqa: BLE001
            out["errors"].append(repr(e)[:300])
    return out


async def _submit(conn: Connection, client: Any, model: str, concurrency: int) -> dict[str, Any]:
    """Warm up one request per connection, say so; on ``go``, POST /v1/jobs back to back through the window."""
    body = {"model": model, "prompt": "Say hello to the benchmark.", "max_tokens": 16}
    for r in await asyncio.gather(*(client.post("/v1/jobs", json=body) for _ in range(concurrency))):
        if r.status_code != 202:
            raise RuntimeError(f"warm-up submit answered {r.status_code}: {r.text[:300]}")
    conn.send(("warm", concurrency))
    start_ns, duration_s = await expect(conn, "go", 120)
    end_ns = start_ns + int(duration_s * 1e9)
    ok, other, lat = 0, 0, []

    async def loop() -> None:
        nonlocal ok, other
        while (t0 := time.time_ns()) < end_ns:
            r = await client.post("/v1/jobs", json=body)
            t1 = time.time_ns()
            if t1 <= end_ns and t0 >= start_ns:
                if r.status_code == 202:
                    ok += 1
                    lat.append((t1 - t0) / 1e6)
                else:
                    other += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return {"ok": ok, "other": other, "lat": lat}


# -- the simulated producer (child process) ----------------------------------------------
async def _producer(conn: Connection, redis_url: str, queue: str) -> None:
    """``claim n`` takes the jobs; ``go (rate, duration_s, flush_ms)`` streams into them, then completes them."""
    async with Broker.from_settings(BrokerSettings(redis_url=redis_url, queue=queue, models=[SSE_MODEL])) as broker:
        await broker.renew(SSE_MODEL, [])  # connect before "ready"
        conn.send(("ready", os.getpid()))
        leases: list[Any] = []
        while True:
            cmd, arg = await recv(conn, 3600)
            if cmd == "stop":
                return
            if cmd == "claim":
                leases = []
                while len(leases) < arg:
                    got = await broker.claim(SSE_MODEL, "bench-producer", arg - len(leases))
                    if not got:
                        raise RuntimeError(f"claimed {len(leases)} of {arg} jobs, then nothing was queued")
                    leases += got
                conn.send(("claimed", len(leases)))
            elif cmd == "go":
                conn.send(("produced", await _produce(broker, leases, *arg)))


async def _produce(broker: Broker, leases: list[Any], rate: int, duration_s: float, flush_ms: int) -> dict[str, Any]:
    """Tokens appear at ``rate`` in total, like an engine's; every ``flush_ms`` (or as soon as the
    previous flush returns, if it took longer) each job gets what it has accumulated, as the worker does."""
    flush_s, per_job_s = flush_ms / 1000, rate / len(leases)
    total = int(per_job_s * duration_s)  # tokens per job
    written, flush_times = 0, []
    renew_every_s = broker.settings.lease_ms / 3000
    start = renewed = time.monotonic()
    first_ns = last_ns = 0
    due = start
    while written < total:
        now = time.monotonic()
        if now < due:
            await asyncio.sleep(due - now)  # pacing: the schedule is the point, no event to wait for
        due = max(due + flush_s, time.monotonic())
        k = min(total, int((time.monotonic() - start) * per_job_s)) - written
        if k <= 0:
            continue
        t0 = time.perf_counter()
        last_ns = time.time_ns()
        first_ns = first_ns or last_ns
        text, ids = f"{last_ns}|", list(range(k))
        ok = await broker.append_many([Delta(x.id, x.fence, text, ids, offset=written) for x in leases])
        if not all(ok.values()):
            raise RuntimeError(f"stale leases while producing: {[j for j, good in ok.items() if not good][:3]}")
        written += k
        flush_times.append((time.perf_counter() - t0) * 1000)
        if time.monotonic() - renewed > renew_every_s:
            await broker.renew(SSE_MODEL, [(x.id, x.fence) for x in leases])
            renewed = time.monotonic()
    done = await broker.complete_many(leases, "length")
    if not all(done.values()):
        raise RuntimeError("stale leases at completion")
    return {"published": written * len(leases), "first_ns": first_ns, "last_ns": last_ns, "flush_ms": flush_times}
