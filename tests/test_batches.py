"""OpenAI Files and Batches through the official `openai` client, with the batcher (arq) driving.

The simulated engine answers deterministically, so output bodies are checked token for
token. The batcher runs in the test's loop thread, or as a `genq batcher` subprocess where
the test kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from test_api_openai import expected, job_delivery
from test_api_support import HandWorker, Stack, make_stack  # noqa: F401 (fixture)

from batcher.settings import BatcherSettings
from batcher.worker import make_worker

ROOT = Path(__file__).resolve().parent.parent


def wait_for(check: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll a condition read over HTTP (no event to wait on from a sync test) until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Batcher:
    """The real arq batcher, in the stack's loop thread."""

    def __init__(self, stack: Stack, **overrides: Any) -> None:
        values = {**stack.settings.model_dump(), "batch_lease_ms": 1000, "batch_flush_s": 0.05, **overrides}
        self.settings = BatcherSettings(**values)
        self.portal = stack.portal

        async def start() -> None:
            self.worker = make_worker(self.settings, handle_signals=False)
            self.task = asyncio.get_running_loop().create_task(self.worker.async_run())

        self.portal.run(start())

    def stop(self) -> None:
        async def halt() -> None:
            # arq's close() cancels the jobs still running (a drive or a sweep just started) and
            # gathers them without return_exceptions, so their CancelledError would end this
            # coroutine before the pool is closed: end them first, then close.
            w = self.worker
            for t in w.tasks.values():
                t.cancel()
            await asyncio.gather(*w.tasks.values(), return_exceptions=True)
            w.tasks.clear()
            await w.close()
            self.task.cancel()

        self.portal.run(halt())


@pytest.fixture
def stack(make_stack, tmp_path: Path) -> Stack:  # noqa: F811
    return make_stack(files_url=str(tmp_path / "files"))


@pytest.fixture
def batcher(stack: Stack) -> Iterator[Batcher]:
    b = Batcher(stack)
    yield b
    b.stop()


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)


def chat_line(i: int, n_tokens: int = 4, model: str = "m") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"line {i}"}], "max_tokens": n_tokens}
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def upload(c: openai.OpenAI, data: bytes, name: str = "in.jsonl") -> str:
    return c.files.create(file=(name, io.BytesIO(data)), purpose="batch").id


def finished(c: openai.OpenAI, batch_id: str, timeout_s: float = 60.0) -> Any:
    done = {"completed", "failed", "expired", "cancelled"}
    return wait_for(
        lambda: (b := c.batches.retrieve(batch_id)).status in done and b, timeout_s, f"batch {batch_id} to finish"
    )


def lines_of(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines()]


# -- files --------------------------------------------------------------------------------
def test_files_api(stack: Stack) -> None:
    c, other = client(stack, stack.key("acme")), client(stack, stack.key("rival"))
    data = jsonl([chat_line(i) for i in range(3)])
    f = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.object == "file" and f.purpose == "batch" and f.bytes == len(data) and f.filename == "in.jsonl"
    assert f.id.startswith("file-") and f.status == "processed"
    assert c.files.retrieve(f.id).bytes == len(data)
    assert c.files.content(f.id).content == data
    second = upload(c, b"{}\n", "b.jsonl")
    assert [x.id for x in c.files.list()] == [second, f.id]  # newest first
    assert [x.id for x in c.files.list(limit=1, after=second)] == [f.id]
    for call in (
        lambda: other.files.retrieve(f.id),
        lambda: other.files.content(f.id),
        lambda: other.files.delete(f.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert list(other.files.list()) == []
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    deleted = c.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_file_size_limit(make_stack, tmp_path: Path) -> None:  # noqa: F811
    stack = make_stack(worker=False, files_url=str(tmp_path / "files"), max_file_bytes=1000)
    c = client(stack, stack.key("acme"))
    upload(c, b"x" * 1000)
    with pytest.raises(openai.APIStatusError) as e:
        upload(c, b"x" * 1001)
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
    with pytest.raises(openai.APIStatusError) as e:  # refused from its Content-Length, before any copy
        upload(c, b"x" * 200_000)
    assert e.value.status_code == 413
    assert len(list(c.files.list())) == 1


# -- batches --------------------------------------------------------------------------------
def test_batch_round_trip(stack: Stack, batcher: Batcher) -> None:
    key = stack.key("acme")
    c = client(stack, key)
    rows = [chat_line(i, 3 + i % 4) for i in range(30)]
    fid = upload(c, jsonl(rows))
    b = c.batches.create(
        input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "t1"}
    )
    assert b.status == "validating" and b.object == "batch" and b.metadata == {"run": "t1"}
    b = finished(c, b.id)
    assert b.status == "completed", b
    assert b.request_counts.total == 30 and b.request_counts.completed == 30 and b.request_counts.failed == 0
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.error_file_id is None
    out = lines_of(c, b.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(r["custom_id"] for r in rows)
    for x in out:
        i = int(x["custom_id"].split("-")[1])
        body = x["response"]["body"]
        assert x["response"]["status_code"] == 200 and x["error"] is None
        assert body["object"] == "chat.completion"
        text, reason = expected(3 + i % 4, messages=rows[i]["body"]["messages"])
        assert body["choices"][0]["message"]["content"] == text
        assert body["choices"][0]["finish_reason"] == reason
        assert body["usage"]["completion_tokens"] == 3 + i % 4
    # nobody follows a batch line: each job's output was written once, as one token event
    delivery = job_delivery(stack, key)
    assert len(delivery) == 30
    assert all(not streamed and len(n) == 1 for streamed, n in delivery.values()), delivery
    assert [x.id for x in c.batches.list()] == [b.id]
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(b.id)
    with pytest.raises(openai.BadRequestError):  # an output file is not a batch input
        c.batches.create(input_file_id=b.output_file_id, endpoint="/v1/chat/completions", completion_window="24h")


def test_batch_list_pages_and_other_tenant(make_stack, tmp_path: Path) -> None:  # noqa: F811
    stack = make_stack(worker=False, files_url=str(tmp_path / "files"))
    c, other = client(stack, stack.key("acme")), client(stack, stack.key("rival"))
    fid = upload(c, jsonl([chat_line(0)]))
    create = lambda: c.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")  # noqa: E731
    ids = [create().id for _ in range(3)]
    page = c.batches.list(limit=2)
    assert [x.id for x in page.data] == ids[::-1][:2] and page.has_more
    assert [x.id for x in c.batches.list(limit=2, after=ids[1])] == [ids[0]]
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(ids[0])
    with pytest.raises(openai.NotFoundError):  # another tenant's file
        other.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    assert e.value.body["param"] == "completion_window"


BAD_FILES = {
    "malformed_json": (b'{"custom_id": "a", "method": "POST"\n', "invalid_json_line", 1),
    "duplicate_custom_id": (jsonl([chat_line(1), chat_line(2), chat_line(1)]), "duplicate_custom_id", 3),
    "unsupported_url": (jsonl([chat_line(1), {**chat_line(2), "url": "/v1/embeddings"}]), "invalid_url", 2),
    "missing_model": (
        jsonl([{**chat_line(1), "body": {"messages": [{"role": "user", "content": "x"}]}}]),
        "missing_required_parameter",
        1,
    ),
    "unknown_model": (jsonl([chat_line(1, model="nope")]), "model_not_found", 1),
    "unsupported_field": (jsonl([{**chat_line(1), "body": {**chat_line(1)["body"], "n": 2}}]), "unsupported_value", 1),
    "empty_file": (b"\n\n", "empty_file", None),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_fails_the_batch_before_anything_runs(stack: Stack, batcher: Batcher, case: str) -> None:
    data, code, line = BAD_FILES[case]
    c = client(stack, stack.key("acme"))
    b = c.batches.create(input_file_id=upload(c, data), endpoint="/v1/chat/completions", completion_window="24h")
    b = finished(c, b.id)
    assert b.status == "failed" and b.failed_at
    err = b.errors.data[0]
    assert (err.code, err.line) == (code, line), err
    assert err.message
    assert b.output_file_id is None and b.request_counts.completed == 0
    assert stack.call(lambda br: br.list_jobs("acme")) == []  # nothing was admitted


# -- cancel and expiry (a hand-played worker finishes exactly the lines the test chooses) -----
def _hand_stack(make_stack, tmp_path: Path, **overrides: Any) -> tuple[Stack, HandWorker]:  # noqa: F811
    stack = make_stack(worker=False, files_url=str(tmp_path / "files"), **overrides)
    return stack, HandWorker(stack, "m")


def test_cancel_halfway(make_stack, tmp_path: Path) -> None:  # noqa: F811
    stack, hand = _hand_stack(make_stack, tmp_path)
    batcher = Batcher(stack, batch_max_in_flight=6)
    try:
        c = client(stack, stack.key("acme"))
        b = c.batches.create(
            input_file_id=upload(c, jsonl([chat_line(i) for i in range(10)])),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        wait_for(lambda: len(stack.call(lambda br: br.list_jobs("acme"))) == 6, what="6 lines fed (backpressure)")
        leases = wait_for(lambda: hand.claim(3), what="claimable lines")
        for lease in leases:
            hand.token(lease, " hi")
            hand.finish(lease)
        wait_for(lambda: c.batches.retrieve(b.id).request_counts.completed == 3, what="3 lines collected")
        cancelling = c.batches.cancel(b.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        b = finished(c, b.id)
        assert b.status == "cancelled" and b.cancelled_at
        assert (b.request_counts.completed, b.request_counts.failed, b.request_counts.total) == (3, 7, 10)
        out, errs = lines_of(c, b.output_file_id), lines_of(c, b.error_file_id)
        ran = {"req-" + lease.job.request.messages[0]["content"].split()[1] for lease in leases}
        assert {x["custom_id"] for x in out} == ran
        assert len(errs) == 7 and {x["error"]["code"] for x in errs} == {"batch_cancelled"}
        assert {x["custom_id"] for x in out} | {x["custom_id"] for x in errs} == {f"req-{i}" for i in range(10)}
        jobs = stack.call(lambda br: br.list_jobs("acme"))
        # at most 6 in flight: the 3 collected made room for up to 3 more before the cancel
        assert len(jobs) <= 9 and sorted(j.status.value for j in jobs)[-3:] == ["succeeded"] * 3
        assert {j.status.value for j in jobs} == {"succeeded", "cancelled"}
        assert c.batches.cancel(b.id).status == "cancelled"  # cancelling twice is not an error
    finally:
        batcher.stop()


def test_window_expires(make_stack, tmp_path: Path) -> None:  # noqa: F811
    stack, hand = _hand_stack(make_stack, tmp_path, batch_window_s=3.0)
    batcher = Batcher(stack, batch_max_in_flight=4)
    try:
        c = client(stack, stack.key("acme"))
        b = c.batches.create(
            input_file_id=upload(c, jsonl([chat_line(i) for i in range(8)])),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        leases = wait_for(lambda: hand.claim(2), what="claimable lines")
        for lease in leases:
            hand.finish(lease)
        b = finished(c, b.id, timeout_s=30)
        assert b.status == "expired" and b.expired_at
        out, errs = lines_of(c, b.output_file_id), lines_of(c, b.error_file_id)
        assert len(out) == 2 and len(errs) == 6
        assert {x["error"]["code"] for x in errs} == {"batch_expired"}
        assert (b.request_counts.completed, b.request_counts.failed) == (2, 6)
    finally:
        batcher.stop()


# -- a batcher killed mid-run ------------------------------------------------------------------
def spawn_batcher(stack: Stack, log_path: Path) -> subprocess.Popen:
    s = stack.settings
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GENQ_REDIS_URL": s.redis_url,
        "GENQ_QUEUE": s.queue,
        "GENQ_FILES_URL": s.files_root,
        "GENQ_MODELS": json.dumps(s.models),
        "GENQ_BATCH_LEASE_MS": "1000",
        "GENQ_BATCH_FLUSH_S": "0.05",
        "GENQ_JSON_LOGS": "true",
    }
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "genq.cli", "batcher"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def test_batcher_killed_mid_run_resumes_exactly_once(make_stack, tmp_path: Path) -> None:  # noqa: F811
    stack = make_stack(worker=False, files_url=str(tmp_path / "files"))
    # 16 slots x 7 steps x 20 ms: the 1,000 lines take >= 8.7 s, so the kill, ~2 s in, lands mid-run even
    # when this process is slow to act on what it saw (under load, 4 ms steps finished all before the kill)
    stack.add_worker("m", sim_step_ms=20.0, max_num_seqs=16)
    c = client(stack, stack.key("acme"))
    rows = [chat_line(i, 6) for i in range(1000)]
    b = c.batches.create(input_file_id=upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h")
    log_path = tmp_path / "batcher.log"
    first = spawn_batcher(stack, log_path)
    try:
        wait_for(lambda: c.batches.retrieve(b.id).request_counts.completed >= 250, 90, "a quarter of the lines")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    at_kill = c.batches.retrieve(b.id)
    assert at_kill.status == "in_progress" and at_kill.request_counts.completed < 1000
    second = spawn_batcher(stack, log_path)
    try:
        done = finished(c, b.id, timeout_s=120)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(20)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (1000, 0)
    out = lines_of(c, done.output_file_id)
    ids = [x["custom_id"] for x in out]
    assert len(ids) == 1000 and len(set(ids)) == 1000 and set(ids) == {r["custom_id"] for r in rows}
    # one job per line: a replayed admission returned the line's job, it made no new one
    jobs = stack.call(lambda br: br.list_jobs("acme", limit=2000))
    assert len(jobs) == 1000 and all(j.status.value == "succeeded" for j in jobs)
    assert {x["response"]["request_id"] for x in out} == {j.id for j in jobs}
    record = stack.call(lambda br: br.batches.get_batch(b.id))
    assert int(record["epoch"]) >= 2  # the second batcher took the batch over


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_e2e_vllm_batch_of_50(make_stack, tmp_path: Path) -> None:  # noqa: F811
    import fcntl

    from test_api_openai import VLLM_LOCK

    from broker.settings import DEFAULT_MODEL

    stack = make_stack(worker=False, models=[DEFAULT_MODEL], files_url=str(tmp_path / "files"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GENQ_REDIS_URL": stack.settings.redis_url,
        "GENQ_QUEUE": stack.settings.queue,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "HF_HUB_OFFLINE": "1",
    }
    with open(VLLM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one real engine per machine at a time
        worker = subprocess.Popen([sys.executable, "-m", "genq.cli", "worker", "--max-model-len", "2048"], env=env)
        batcher = Batcher(stack)
        try:
            c = client(stack, stack.key("acme"))
            rows = [chat_line(i, 16, DEFAULT_MODEL) for i in range(50)]
            b = c.batches.create(
                input_file_id=upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h"
            )
            b = finished(c, b.id, timeout_s=600)
        finally:
            batcher.stop()
            worker.send_signal(signal.SIGTERM)
            worker.wait(90)
    assert b.status == "completed" and b.request_counts.completed == 50, b
    out = lines_of(c, b.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(r["custom_id"] for r in rows)
    for x in out:
        body = x["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert 0 < body["usage"]["completion_tokens"] <= 16 and body["usage"]["prompt_tokens"] > 0


# -- tokenizers: loaded when the batcher starts, not at its first batch -------------------------
class CountingTokenizer:
    """Stands in for a transformers tokenizer: 7 tokens per chat prompt (the estimate says 13)."""

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        return [1] * 7


def test_tokenizers_load_at_start_not_at_the_first_batch(make_stack, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    import threading

    import api.tokens

    loads: list[str] = []
    loaded = threading.Event()

    def load(folder: str) -> CountingTokenizer:
        loads.append(folder)
        loaded.set()
        return CountingTokenizer()

    monkeypatch.setattr(api.tokens, "_load", load)
    stack = make_stack(worker=False, files_url=str(tmp_path / "files"))
    folder = str(tmp_path / "tokenizer")
    stack.call(lambda b: b.register_model("m", 4096, tokenizer=folder))
    batcher = Batcher(stack)
    try:
        assert loaded.wait(30), "the batcher did not load the tokenizer at start-up"
        preload = batcher.worker.ctx["preload"]
        done = stack.portal.run(asyncio.wait_for(asyncio.shield(preload), 30))
        assert (done["folders"], done["loaded"], done["skipped"]) == (1, 1, 0)
        assert batcher.worker.ctx["driver"].tokens.cached([folder])
        # The first batch's lines are counted with the tokenizer loaded at start: no load now.
        c = client(stack, stack.key("acme"))
        b = c.batches.create(
            input_file_id=upload(c, jsonl([chat_line(0), chat_line(1)])),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        fed = wait_for(lambda: len(got := stack.call(lambda br: br.batches.fed_lines(b.id))) == 2 and got)
        jobs = [stack.call(lambda br, j=j: br.get_job(j)) for j in fed.values()]
        assert [j.prompt_tokens for j in jobs] == [7, 7]  # the tokenizer's count, not the estimate
        assert loads == [folder]
        c.batches.cancel(b.id)
    finally:
        batcher.stop()


async def test_preload_is_bounded_and_never_raises(monkeypatch) -> None:
    import api.tokens

    def load(folder: str) -> CountingTokenizer:
        if folder == "/bad":
            raise OSError("no such folder")
        return CountingTokenizer()

    monkeypatch.setattr(api.tokens, "_load", load)
    models = {"a": {"tokenizer": "/bad"}, "b": {"tokenizer": "/good"}, "c": {"max_model_len": 8}}
    counter = api.tokens.TokenCounter()
    assert (await counter.preload(models, budget_s=0))["skipped"] == 2  # over budget: no load starts
    assert not counter.cached(["/bad"]) and not counter.cached(["/good"])
    done = await counter.preload(models, budget_s=60)
    assert (done["folders"], done["loaded"], done["skipped"]) == (2, 1, 0)
    assert counter.cached(["/bad", "/good"])  # the bad one is known unusable: estimated, not retried
