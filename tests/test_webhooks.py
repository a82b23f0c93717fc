"""Webhooks: signed (Standard Webhooks, checked with the `standardwebhooks` library), retried with
backoff by the batcher (arq), each attempt recorded on the job or batch; private addresses refused.

The receiver is a small HTTP server on 127.0.0.1 in the test, so the stacks here allow private
addresses (GENQ_WEBHOOKS_ALLOW_PRIVATE) except where the refusal itself is tested.
"""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from test_api_support import Stack, auth, make_stack  # noqa: F401 (fixture)
from test_batches import Batcher, chat_line, jsonl, lines_of, wait_for
from test_topologies import topo  # noqa: F401 (fixture: a broker on Redis Cluster, then Sentinel)

from batcher.settings import BatcherSettings
from batcher.webhook_urls import pinned
from batcher.webhooks import Deliverer
from broker import Broker
from broker.contract import JobErrorCode, JobSpec, JobStatus, WebhookKind, WebhookState
from broker.contract import Webhook as JobWebhook
from broker.errors import NotFound
from broker.models import TenantLimits
from broker.webhooks import new_secret

TIMEOUT_S = 30.0


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Records every POST; answers each path with its scripted status codes in turn, then 200
    (code 0: no answer until the test ends)."""

    server: ThreadingHTTPServer
    got: queue.Queue[Delivery] = field(default_factory=queue.Queue)
    script: dict[str, list[int]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def next(self, timeout_s: float = TIMEOUT_S) -> Delivery:
        return self.got.get(timeout=timeout_s)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            rec = holder[0]
            codes = rec.script.get(self.path) or []
            status = codes.pop(0) if codes else 200
            if status == 0:
                rec.got.put(Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                rec.release.wait(TIMEOUT_S)
                return
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()
            rec.got.put(Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, body))

        def log_message(self, *args: Any) -> None:  # http.server prints to stderr otherwise
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, name="test-webhook-receiver", daemon=True)
    thread.start()
    yield holder[0]
    holder[0].release.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def stack(make_stack, tmp_path: Path) -> Stack:  # noqa: F811
    return make_stack(files_url=str(tmp_path / "files"), webhooks_allow_private=True)


@pytest.fixture
def batcher(stack: Stack) -> Iterator[Batcher]:
    b = Batcher(stack, webhook_backoff_s=0.05, webhook_max_attempts=4)
    yield b
    b.stop()


def http(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers=auth(key), timeout=30)


def secret(stack: Stack, tenant: str, *, rotate: bool = False) -> str:
    with http(stack, stack.admin_key) as c:
        path = f"/v1/admin/tenants/{tenant}/webhook_secret"
        r = c.post(path + "/rotate") if rotate else c.get(path)
        assert r.status_code == 200, r.text
        value: str = r.json()["secret"]
        return value


def submit(c: httpx.Client, **extra: Any) -> dict[str, Any]:
    r = c.post("/v1/jobs", json={"model": "m", "prompt": "hello", "max_tokens": 3, **extra})
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    return body


def webhook_ended(c: httpx.Client, path: str) -> dict[str, Any]:
    """The object once its webhook's delivery ended (delivered or given up)."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (o := c.get(path).json())["webhook"]["status"] != "pending" and o, TIMEOUT_S, f"{path}'s webhook"
    )


def verified(d: Delivery, key: str) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(key).verify(d.body, d.headers)
    return payload


def without_webhook(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k != "webhook"}


# -- jobs ---------------------------------------------------------------------------------------
def test_a_job_webhook_is_signed_and_delivered_once(stack: Stack, batcher: Batcher, receiver: Receiver) -> None:
    c = http(stack, stack.key("acme"))
    job = submit(c, webhook_url=receiver.url("/job"))
    assert job["webhook"] == {"url": receiver.url("/job"), "status": "pending", "delivered": False, "attempts": []}
    d = receiver.next()
    key = secret(stack, "acme")
    assert key.startswith("whsec_")
    payload = verified(d, key)
    with pytest.raises(WebhookVerificationError):  # another tenant's secret does not verify it
        verified(d, secret(stack, "rival"))
    tampered = d.body.replace(b"succeeded", b"failed")
    assert tampered != d.body
    with pytest.raises(WebhookVerificationError):
        Webhook(key).verify(tampered, d.headers)
    assert d.path == "/job" and d.headers["webhook-id"] == f"msg_{job['id']}"
    assert payload["type"] == "job.succeeded" and payload["timestamp"].endswith("Z")
    view = webhook_ended(c, f"/v1/jobs/{job['id']}")
    assert payload["data"] == without_webhook(view)  # the job as GET shows it
    assert view["status"] == "succeeded" and view["output"]
    hook = view["webhook"]
    assert hook["status"] == "delivered" and hook["delivered"] is True
    assert [(a["status_code"], a["error"]) for a in hook["attempts"]] == [(200, None)]
    assert hook["attempts"][0]["at_ms"] > 0 and hook["attempts"][0]["duration_ms"] >= 0
    assert receiver.got.empty()
    # A replayed delivery (the webhook due handed out again) is a no-op: the record says delivered.
    assert stack.call(lambda b: _deliver(b, batcher, job["id"])) == "delivered"
    assert receiver.got.empty()
    assert c.get(f"/v1/jobs/{job['id']}").json()["webhook"]["attempts"] == hook["attempts"]


async def _deliver(b: Broker, batcher: Batcher, job_id: str) -> str:
    async with httpx.AsyncClient() as h:
        return await Deliverer(b, batcher.settings, h).deliver(WebhookKind.JOB, job_id)


def test_a_receiver_failing_twice_gets_the_third_attempt(stack: Stack, batcher: Batcher, receiver: Receiver) -> None:
    c = http(stack, stack.key("acme"))
    receiver.script["/flaky"] = [500, 503]
    job = submit(c, webhook_url=receiver.url("/flaky"))
    got = [receiver.next() for _ in range(3)]
    key = secret(stack, "acme")
    payloads = [verified(d, key) for d in got]  # each attempt is signed afresh
    assert {d.headers["webhook-id"] for d in got} == {f"msg_{job['id']}"}  # one message, retried
    assert payloads[0] == payloads[1] == payloads[2]
    view = webhook_ended(c, f"/v1/jobs/{job['id']}")
    hook = view["webhook"]
    assert hook["delivered"] is True
    assert [a["status_code"] for a in hook["attempts"]] == [500, 503, 200]
    assert [a["error"] for a in hook["attempts"]] == ["HTTP 500", "HTTP 503", None]
    at = [a["at_ms"] for a in hook["attempts"]]
    assert at == sorted(at) and at[2] - at[0] >= 1000 * 0.05 * (1 + 2)  # backed off: 0.05 s, then 0.1 s
    assert receiver.got.empty()


def test_a_webhook_that_never_succeeds_is_given_up_and_the_result_stays(
    stack: Stack, batcher: Batcher, receiver: Receiver
) -> None:
    c = http(stack, stack.key("acme"))
    receiver.script["/down"] = [500] * 10
    job = submit(c, webhook_url=receiver.url("/down"))
    for _ in range(4):  # webhook_max_attempts
        receiver.next()
    view = webhook_ended(c, f"/v1/jobs/{job['id']}")
    assert view["webhook"]["status"] == "failed" and view["webhook"]["delivered"] is False
    assert [a["status_code"] for a in view["webhook"]["attempts"]] == [500] * 4
    assert view["status"] == "succeeded" and view["output"]  # the result is readable all the same
    assert receiver.got.empty()


def test_the_tenant_default_applies_when_a_job_names_none(stack: Stack, batcher: Batcher, receiver: Receiver) -> None:
    c = http(stack, stack.key("acme"))
    with http(stack, stack.admin_key) as admin:
        r = admin.put("/v1/admin/tenants/acme", json={"webhook_url": receiver.url("/default")})
        assert r.status_code == 200 and r.json()["limits"]["webhook_url"] == receiver.url("/default")
    first = submit(c)
    d = receiver.next()
    assert d.path == "/default" and verified(d, secret(stack, "acme"))["data"]["id"] == first["id"]
    assert first["webhook"]["url"] == receiver.url("/default")
    rotated = secret(stack, "acme", rotate=True)
    own = submit(c, webhook_url=receiver.url("/own"))  # its own URL wins over the default
    d = receiver.next()
    assert d.path == "/own" and verified(d, rotated)["data"]["id"] == own["id"]
    other = submit(http(stack, stack.key("rival")))  # another tenant: no default, no webhook
    assert other["webhook"] is None


def test_the_address_is_checked_again_at_delivery(make_stack, tmp_path: Path, receiver: Receiver) -> None:  # noqa: F811
    stack = make_stack(files_url=str(tmp_path / "files"), webhooks_allow_private=True)
    batcher = Batcher(stack, webhook_backoff_s=0.05, webhooks_allow_private=False)
    try:
        c = http(stack, stack.key("acme"))
        job = submit(c, webhook_url=receiver.url("/inside"))
        view = webhook_ended(c, f"/v1/jobs/{job['id']}")
    finally:
        batcher.stop()
    hook = view["webhook"]
    assert hook["status"] == "failed" and len(hook["attempts"]) == 1  # refused for good, not retried
    assert hook["attempts"][0]["status_code"] is None and "private" in hook["attempts"][0]["error"]
    assert receiver.got.empty()


def test_a_receiver_that_never_answers_times_out(make_stack, tmp_path: Path, receiver: Receiver) -> None:  # noqa: F811
    stack = make_stack(files_url=str(tmp_path / "files"), webhooks_allow_private=True)
    batcher = Batcher(stack, webhook_backoff_s=0.05, webhook_max_attempts=2, webhook_timeout_s=0.3)
    try:
        receiver.script["/slow"] = [0, 0]
        c = http(stack, stack.key("acme"))
        job = submit(c, webhook_url=receiver.url("/slow"))
        view = webhook_ended(c, f"/v1/jobs/{job['id']}")
    finally:
        batcher.stop()
    hook = view["webhook"]
    assert hook["status"] == "failed"
    assert [(a["status_code"], a["error"]) for a in hook["attempts"]] == [(None, "no answer within 0.3 s")] * 2
    assert all(a["duration_ms"] < 0.3 * 1000 + 2000 for a in hook["attempts"])
    assert receiver.got.qsize() == 2


# -- refusals ---------------------------------------------------------------------------------
REFUSED = [
    "http://127.0.0.1:9/hook",  # loopback
    "http://localhost/hook",  # a name that resolves to loopback
    "http://10.1.2.3/hook",  # private
    "http://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
    "http://[::1]/hook",
    "http://[::ffff:192.168.0.1]/hook",  # IPv4-mapped private
    "http://224.0.0.1/hook",  # multicast
    "ftp://example.com/hook",
    "not a url",
]


@pytest.mark.parametrize("url", REFUSED)
def test_private_addresses_are_refused_by_default(make_stack, url: str) -> None:  # noqa: F811
    stack = make_stack(worker=False)
    c = http(stack, stack.key("acme"))
    r = c.post("/v1/jobs", json={"model": "m", "prompt": "x", "max_tokens": 2, "webhook_url": url})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "webhook_url" and err["type"] == "invalid_request_error" and err["message"]
    with http(stack, stack.admin_key) as admin:
        r = admin.put("/v1/admin/tenants/acme", json={"webhook_url": url})
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url"
    assert c.get("/v1/jobs").json()["data"] == []


def test_a_private_address_is_accepted_with_the_setting(make_stack) -> None:  # noqa: F811
    body = {"model": "m", "prompt": "x", "max_tokens": 2, "webhook_url": "http://127.0.0.1:9/hook"}
    for allowed, status in ((False, 400), (True, 202)):
        stack = make_stack(worker=False, fresh_queue=True, webhooks_allow_private=allowed)
        c = http(stack, stack.key("acme"))
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == status, r.text
        if allowed:
            assert r.json()["webhook"]["url"] == body["webhook_url"]
        else:  # the OpenAI endpoints take it too (the openai client's extra_body), checked the same way
            chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "webhook_url": "http://10.0.0.1/"}
            r = c.post("/v1/chat/completions", json=chat)
            assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url"


# -- batches ------------------------------------------------------------------------------------
def test_a_batch_webhook_is_delivered_when_it_completes(stack: Stack, batcher: Batcher, receiver: Receiver) -> None:
    key = stack.key("acme")
    oc = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)
    with http(stack, stack.admin_key) as admin:  # a tenant default must not reach the batch's lines
        assert admin.put("/v1/admin/tenants/acme", json={"webhook_url": receiver.url("/default")}).status_code == 200
    fid = oc.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line(i) for i in range(3)]))), purpose="batch").id
    with pytest.raises(openai.BadRequestError) as e:
        oc.batches.create(
            input_file_id=fid,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"webhook_url": "gopher://x"},
        )
    assert e.value.body["param"] == "webhook_url"
    b = oc.batches.create(
        input_file_id=fid,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"webhook_url": receiver.url("/batch")},
    )
    d = receiver.next()
    payload = verified(d, secret(stack, "acme"))
    assert d.path == "/batch" and payload["type"] == "batch.completed"
    assert d.headers["webhook-id"] == f"msg_{b.id}"
    c = http(stack, key)
    view = webhook_ended(c, f"/v1/batches/{b.id}")
    assert payload["data"] == without_webhook(view) and view["request_counts"]["completed"] == 3
    assert view["webhook"]["delivered"] is True and len(view["webhook"]["attempts"]) == 1
    for line in lines_of(oc, view["output_file_id"]):  # the lines' jobs carry no webhook of their own
        assert c.get(f"/v1/jobs/{line['response']['request_id']}").json()["webhook"] is None
    assert receiver.got.empty()


def test_webhooks_due_survive_a_batcher_that_was_not_running(stack: Stack, receiver: Receiver, tmp_path: Path) -> None:
    """Jobs finished while no batcher ran are delivered once one starts (the stream keeps them)."""
    c = http(stack, stack.key("acme"))
    job = submit(c, webhook_url=receiver.url("/later"))
    wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", TIMEOUT_S, "the job")
    assert stack.call(lambda b: b.webhooks.pending()) == 1
    batcher = Batcher(stack, webhook_backoff_s=0.05)
    try:
        d = receiver.next()
        assert json.loads(d.body)["data"]["id"] == job["id"]
        webhook_ended(c, f"/v1/jobs/{job['id']}")
        wait_for(lambda: stack.call(lambda b: b.webhooks.pending()) == 0, TIMEOUT_S, "the entry to go")
    finally:
        batcher.stop()


def test_genq_keys_create_sets_a_checked_tenant_default(make_stack) -> None:  # noqa: F811
    stack = make_stack(worker=False)
    env = {**os.environ, "GENQ_REDIS_URL": stack.settings.redis_url, "GENQ_QUEUE": stack.settings.queue}
    genq = [sys.executable, "-m", "genq.cli", "keys", "create", "--tenant", "cli-t", "--webhook-url"]
    url = "http://127.0.0.1:9/hook"
    refused = subprocess.run([*genq, url], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "private" in refused.stderr
    assert stack.call(lambda b: b.get_tenant("cli-t")) is None
    env["GENQ_WEBHOOKS_ALLOW_PRIVATE"] = "true"
    made = subprocess.run([*genq, url], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert stack.call(lambda b: b.get_tenant("cli-t")).webhook_url == url


# -- connecting to the checked address ----------------------------------------------------------
def test_a_delivery_connects_to_the_address_it_checked() -> None:
    url, headers, ext = pinned("https://hooks.example.com:8443/p?q=1", ["93.184.216.34"])
    assert str(url) == "https://93.184.216.34:8443/p?q=1"
    assert headers == {"host": "hooks.example.com:8443"} and ext == {"sni_hostname": "hooks.example.com"}
    url, headers, ext = pinned("http://hooks.example.com/p", ["2606:2800:220:1::1"])
    assert (str(url), headers, ext) == ("http://[2606:2800:220:1::1]/p", {"host": "hooks.example.com"}, {})
    assert pinned("http://hooks.example.com/p", []) == (httpx.URL("http://hooks.example.com/p"), {}, {})


def test_a_pinned_post_reaches_the_address_with_the_name_as_host(make_stack, receiver: Receiver) -> None:  # noqa: F811
    stack = make_stack(worker=False)
    port = receiver.server.server_port
    key = new_secret()

    async def post(b: Broker) -> tuple[int | None, str | None]:
        async with httpx.AsyncClient() as h:
            d = Deliverer(b, BatcherSettings(**stack.settings.model_dump()), h)
            # .invalid never resolves: only the pinned address can be what was reached
            return await d._post(f"http://hooks.invalid:{port}/pin", ["127.0.0.1"], "msg_x", '{"a":1}', key)

    assert stack.call(post) == (200, None)
    d = receiver.next()
    assert d.path == "/pin" and d.headers["host"] == f"hooks.invalid:{port}"
    assert verified(d, key) == {"a": 1}


# -- the webhooks due (broker level) ------------------------------------------------------------
async def test_every_terminal_transition_makes_a_webhook_due_until_acknowledged(broker: Broker) -> None:
    """Each way a job ends adds it (only one with a webhook, once); an entry read by a batcher that
    never acknowledged it is handed to another; an acknowledged one is gone."""

    def spec(url: str | None = "http://hooks.example/x", **kw: Any) -> JobSpec:
        return JobSpec(tenant="acme", model="m", kind="completion", prompt="x", max_tokens=2, webhook_url=url, **kw)

    done, failed, aborted, running = [(await broker.admit(spec())).job_id for _ in range(4)]
    plain = (await broker.admit(spec(""))).job_id  # no webhook at all: never due
    leases = {lease.id: lease for lease in await broker.claim("m", "w1", 10)}
    assert set(leases) == {done, failed, aborted, running, plain}
    cancelled = (await broker.admit(spec())).job_id
    expired = (await broker.admit(spec(deadline_ms=1))).job_id
    await broker.complete(leases[done], "stop")  # complete.lua
    await broker.fail(leases[failed], JobErrorCode.INVALID_REQUEST, "bad", retry=False)  # fail.lua (settle)
    await broker.complete(leases[aborted], "abort", status=JobStatus.CANCELLED)
    await broker.complete(leases[plain], "stop")
    assert await broker.cancel(cancelled) is JobStatus.CANCELLED  # cancel.lua, while queued
    assert (expired, JobStatus.EXPIRED) in await broker.reap("m")  # reap.lua (expire_queued)
    ended = [done, failed, aborted, cancelled, expired]
    wh = broker.webhooks
    await wh.ensure_group()
    first = await wh.due("batcher-a", block_ms=100)
    assert [(d.kind, d.object_id) for d in first] == [(WebhookKind.JOB, j) for j in ended]
    assert await wh.due("batcher-b", block_ms=50) == []  # handed out once
    assert await wh.reclaim("batcher-b", min_idle_ms=60_000) == []  # not idle long enough
    taken = await wh.reclaim("batcher-b", min_idle_ms=0)  # batcher-a died: b takes them over
    assert [d.object_id for d in taken] == ended
    await wh.done([d.entry_id for d in taken])
    assert await wh.pending() == 0 and await wh.reclaim("batcher-b", min_idle_ms=0) == []
    assert (await broker.get_job(running)).webhook is not None  # due only once it ends
    assert (await broker.get_job(plain)).webhook is None
    # A job of a tenant with a default webhook gets it; the note is kept only while the job exists.
    await broker.set_tenant("acme", TenantLimits(webhook_url="http://hooks.example/default"))
    job = await broker.get_job((await broker.admit(spec(None))).job_id)
    assert job.webhook is not None and job.webhook.url == "http://hooks.example/default"
    assert await wh.note(WebhookKind.JOB, job.id, [{"at_ms": 1}], WebhookState.PENDING)
    assert (await broker.get_job(job.id)).webhook.attempts == ({"at_ms": 1},)  # type: ignore[union-attr]
    assert not await wh.note(WebhookKind.JOB, "job_" + "0" * 32, [], WebhookState.FAILED)
    with pytest.raises(NotFound):  # not brought back to life without its TTL
        await broker.get_job("job_" + "0" * 32)


async def test_a_tenant_secret_is_made_once_and_rotated(broker: Broker) -> None:
    wh = broker.webhooks
    first = await wh.secret("acme")
    assert first.startswith("whsec_") and await wh.secret("acme") == first
    Webhook(first)  # a secret the standardwebhooks library accepts
    rotated = await wh.secret("acme", rotate=True)
    assert rotated != first and await wh.secret("acme") == rotated
    assert await wh.secret("rival") not in (first, rotated)


async def test_webhooks_on_cluster_and_sentinel(topo: Broker) -> None:  # noqa: F811
    """The Lua that makes a webhook due builds its key itself (same hash tag: same Cluster slot)."""
    b = topo
    spec = JobSpec(tenant="acme", model="m", kind="completion", prompt="x", max_tokens=2, webhook_url="http://h.x/")
    job_id = (await b.admit(spec)).job_id
    [lease] = await b.claim("m", "w1", 1)
    await b.complete(lease, "stop")
    bid = "batch_" + "1" * 32  # written directly: BatchStore.create_batch's MULTI has no Cluster form
    record = {"id": bid, "tenant": "acme", "status": "finalizing", "webhook": "u"}
    await b._redis.hset(b._keys.batch(bid), mapping=record)
    await b.batches.update(bid, set={"status": "completed"}, done=True)
    await b.webhooks.ensure_group()
    due = await b.webhooks.due("c1", block_ms=100)
    assert [(d.kind, d.object_id) for d in due] == [(WebhookKind.JOB, job_id), (WebhookKind.BATCH, bid)]
    await b.webhooks.done([d.entry_id for d in due])
    assert await b.webhooks.pending() == 0
    assert await b.webhooks.note(WebhookKind.JOB, job_id, [{"at_ms": 1}], WebhookState.DELIVERED)
    assert (await b.get_job(job_id)).webhook == JobWebhook("http://h.x/", WebhookState.DELIVERED, ({"at_ms": 1},))
    assert (await b.webhooks.secret("acme")).startswith("whsec_")
