"""SSE: drop a stream mid-generation, reconnect with Last-Event-ID, lose and repeat nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)

MESSAGES = [{"role": "user", "content": "tell me a long story"}]
TERMINAL = ("done", "failed", "cancelled")


@dataclass
class Sse:
    id: str | None = None
    event: str | None = None
    data: str = ""


@dataclass
class Reader:
    """Parses an SSE byte stream line by line (httpx streaming)."""

    events: list[Sse] = field(default_factory=list)
    comments: int = 0

    def read(self, r: httpx.Response, stop_after_tokens: int | None = None) -> None:
        cur, tokens = Sse(), 0
        for line in r.iter_lines():
            if line.startswith(":"):
                self.comments += 1
            elif line.startswith("id: "):
                cur.id = line[4:]
            elif line.startswith("event: "):
                cur.event = line[7:]
            elif line.startswith("data: "):
                cur.data += line[6:]
            elif line == "" and (cur.event or cur.data):
                self.events.append(cur)
                tokens += cur.event == "token"
                if cur.event in TERMINAL or (stop_after_tokens is not None and tokens >= stop_after_tokens):
                    return  # leaving the `with` block closes the TCP connection mid-stream
                cur = Sse()


@pytest.fixture
def stack(make_stack) -> Stack:  # noqa: F811
    stack = make_stack(worker=False, keepalive_s=0.3)
    stack.add_worker("m", sim_step_ms=15.0)  # ~65 tokens/s: a 120-token job streams for ~2 s
    return stack


def text_of(events: list[Sse]) -> str:
    return "".join(json.loads(e.data)["text"] for e in events if e.event == "token")


@pytest.mark.parametrize("how", ["header", "query"])
def test_reconnect_with_last_event_id(stack: Stack, how: str) -> None:
    key = stack.key("acme")
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        job = h.post("/v1/jobs", json={"model": "m", "messages": MESSAGES, "max_tokens": 120}).json()
        url = f"/v1/jobs/{job['id']}/events"
        seen = Reader()
        drops = 0
        while not seen.events or seen.events[-1].event not in TERMINAL:
            last = seen.events[-1].id if seen.events else None
            kw: dict = {}
            if last and how == "header":
                kw["headers"] = {"Last-Event-ID": last}
            elif last:
                kw["params"] = {"last_event_id": last}
            with h.stream("GET", url, **kw) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                seen.read(r, stop_after_tokens=2)  # drop the connection after two token events
            drops += 1
        assert drops >= 3, "the job finished before the stream could be dropped mid-generation"

        ids = [e.id for e in seen.events if e.id]
        assert len(ids) == len(set(ids)), "duplicate event ids after reconnecting"
        order = [tuple(map(int, i.split("-"))) for i in ids]
        assert order == sorted(order)
        assert [e.event for e in seen.events][:2] == ["queued", "started"] and seen.events[-1].event == "done"

        final = h.get(f"/v1/jobs/{job['id']}").json()
        assert final["status"] == "succeeded" and final["usage"]["completion_tokens"] == 120
        assert text_of(seen.events) == final["output"]
        # ... and identical to the same request answered in one piece (the engine is deterministic)
        whole = h.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "max_tokens": 120}).json()
        assert whole["choices"][0]["message"]["content"] == text_of(seen.events)

        # resuming after the terminal event answers at once with nothing more
        with h.stream("GET", url, headers={"Last-Event-ID": ids[-1]}) as r:
            tail = Reader()
            tail.read(r)
        assert tail.events == []


def test_queued_job_gets_positions_and_keepalives(make_stack) -> None:  # noqa: F811
    # a keep-alive comment goes out after 0.3 s of silence: between position events 0.5 s apart
    stack = make_stack(worker=False, keepalive_s=0.3, position_interval_s=0.5)
    key = stack.key("acme")
    stack.call(lambda b: b.register_model("idle", 4096))  # a model no worker serves: jobs stay queued
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        first = h.post("/v1/jobs", json={"model": "idle", "prompt": "a", "max_tokens": 5}).json()
        second = h.post("/v1/jobs", json={"model": "idle", "prompt": "b", "max_tokens": 5}).json()
        assert (first["queue_position"], second["queue_position"]) == (0, 1)
        reader = Reader()
        with h.stream("GET", f"/v1/jobs/{second['id']}/events") as r:
            cur, positions = Sse(), []
            for line in r.iter_lines():
                if line.startswith(":"):
                    reader.comments += 1
                elif line.startswith(("id: ", "event: ", "data: ")):
                    name, _, value = line.partition(": ")
                    setattr(cur, name, value)
                elif line == "" and cur.event:
                    reader.events.append(cur)
                    if cur.event == "position":
                        positions.append(cur)
                        if len(positions) == 3:
                            h.delete(f"/v1/jobs/{first['id']}")  # the job ahead leaves the queue
                        if len(positions) >= 4 and json.loads(cur.data)["queue_position"] == 0:
                            h.delete(f"/v1/jobs/{second['id']}")
                    if cur.event in TERMINAL:
                        break
                    cur = Sse()
        assert reader.events[0].event == "queued" and reader.events[-1].event == "cancelled"
        assert all(p.id is None for p in positions), "position events must not be resumable"
        assert json.loads(positions[0].data)["queue_position"] == 1
        assert json.loads(positions[-1].data)["queue_position"] == 0
        # no worker serves "idle": no ETA, and a warning that says why
        assert all(json.loads(p.data)["eta_s"] is None for p in positions)
        assert json.loads(positions[0].data)["warning"]["code"] == "no_worker"
        first_place = json.loads(positions[0].data)
        assert first_place["queue_position_range"] == {"min": 1, "max": 1}  # its own tenant's job is ahead
        assert first_place["queue_position_kind"] == "exact"
        assert reader.comments >= 1, "no keep-alive comment while queued"


def test_events_errors(stack: Stack) -> None:
    key = stack.key("acme")
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        job = h.post("/v1/jobs", json={"model": "m", "prompt": "x", "max_tokens": 2}).json()
        r = h.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "not-an-id"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "last_event_id"
        # the format's digits, but past a Redis stream id's 64-bit halves (was 200, then a cut stream)
        for too_big in ("99999999999999999999-0", "0-99999999999999999999", "18446744073709551616-0"):
            r = h.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": too_big})
            assert r.status_code == 400 and r.json()["error"]["param"] == "last_event_id", too_big
            r = h.get(f"/v1/jobs/{job['id']}/events", params={"last_event_id": too_big})
            assert r.status_code == 400, too_big
        with h.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "18446744073709551615-0"}) as r:
            assert r.status_code == 200  # the largest id is still an id
        r = h.get("/v1/jobs/job_" + "0" * 32 + "/events")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_unstreamed_job_follower_gets_the_whole_text_in_one_event(stack: Stack) -> None:
    key = stack.key("acme")
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 120}
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=30) as h:
        job = h.post("/v1/jobs", json={**body, "stream": False}).json()
        assert job["stream"] is False
        seen, mid = Reader(), None
        with h.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            cur = Sse()
            for line in r.iter_lines():
                if line.startswith("event: "):
                    cur.event = line[7:]
                elif line.startswith("data: "):
                    cur.data += line[6:]
                elif line == "" and cur.event:
                    seen.events.append(cur)
                    if cur.event == "started":  # running: look at the job before its completion
                        mid = h.get(f"/v1/jobs/{job['id']}").json()
                    if cur.event in TERMINAL:
                        break
                    cur = Sse()
        final = h.get(f"/v1/jobs/{job['id']}").json()
        streamed = h.post("/v1/jobs", json=body).json()
        assert streamed["stream"] is True  # the default, as before
    assert [e.event for e in seen.events if e.event != "position"] == ["queued", "started", "token", "done"]
    assert final["status"] == "succeeded" and final["usage"]["completion_tokens"] == 120
    assert text_of(seen.events) == final["output"] and [
        json.loads(e.data)["n"] for e in seen.events if e.event == "token"
    ] == [120]
    assert mid is not None and mid["output"] in ("", final["output"])  # never a part of it
