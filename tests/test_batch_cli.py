"""``genq batch`` as a user runs it: real ``genq batch …`` processes against a stack with the
simulated engine and the arq batcher, interrupted by SIGINT and by SIGKILL, then run again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_api_support
from test_api_support import LiveServer, Stack, make_stack  # noqa: F401 (fixture)
from test_batches import Batcher, chat_line, jsonl, wait_for

from genq import batch_api as ba

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stack(make_stack, tmp_path: Path) -> Stack:  # noqa: F811
    s = make_stack(worker=False, files_url=str(tmp_path / "files"))
    s.add_worker("m", sim_step_ms=25.0, max_num_seqs=8)  # ~2-4 s for a batch of 150 lines
    return s


@pytest.fixture
def batcher(stack: Stack) -> Iterator[Batcher]:
    b = Batcher(stack, batch_max_in_flight=16)
    yield b
    b.stop()


@pytest.fixture
def key(stack: Stack) -> str:
    return stack.key("acme")


def env(stack: Stack, key: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "GENQ_URL": stack.url, "GENQ_API_KEY": key, "COLUMNS": "200"}


def genq(stack: Stack, key: str, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "genq.cli", "batch", *args],
        env=env(stack, key),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def spawn(stack: Stack, key: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "genq.cli", "batch", *args],
        env=env(stack, key),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def api(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def write_input(path: Path, n: int, tokens: int = 4) -> list[dict[str, Any]]:
    rows = [chat_line(i, tokens) for i in range(n)]
    path.write_bytes(jsonl(rows))
    return rows


def batches(stack: Stack, key: str) -> list[dict[str, Any]]:
    with api(stack, key) as c:
        return list(c.get("/v1/batches", params={"limit": 100}).json()["data"])


# -- to completion --------------------------------------------------------------------------
def test_run_to_completion_with_failed_lines(stack: Stack, batcher: Batcher, key: str, tmp_path: Path) -> None:
    rows = write_input(tmp_path / "in.jsonl", 60)
    too_long = {**chat_line(60), "custom_id": "too-long"}
    too_long["body"]["messages"][0]["content"] = "word " * 5000  # longer than the model's context
    rows.append(too_long)
    (tmp_path / "in.jsonl").write_bytes(jsonl(rows))
    out = tmp_path / "out.jsonl"
    r = genq(stack, key, "run", str(tmp_path / "in.jsonl"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    got = read_jsonl(out)
    errs = read_jsonl(tmp_path / "out.errors.jsonl")
    assert sorted(x["custom_id"] for x in got) == sorted(x["custom_id"] for x in rows[:60])
    assert [x["custom_id"] for x in errs] == ["too-long"] and errs[0]["response"]["status_code"] == 400
    assert all(x["response"]["status_code"] == 200 for x in got)
    (b,) = batches(stack, key)
    assert b["status"] == "completed" and b["id"] in r.stderr and "60 lines" in r.stderr
    state = json.loads((tmp_path / "out.jsonl.genq-batch.json").read_text())
    assert state["batch_id"] == b["id"] and state["input_sha256"] == ba.sha256(tmp_path / "in.jsonl")
    assert state["api_url"] == stack.url and state["file_id"] == b["input_file_id"]

    again = genq(stack, key, "run", str(tmp_path / "in.jsonl"), "-o", str(out))  # done already: downloads only
    assert again.returncode == 0 and f"resuming batch {b['id']}" in again.stderr, again.stderr
    assert len(batches(stack, key)) == 1 and len(read_jsonl(out)) == 60

    (tmp_path / "in.jsonl").write_bytes(jsonl(rows[:10]))  # a changed input is a new batch
    changed = genq(stack, key, "run", str(tmp_path / "in.jsonl"), "-o", str(out))
    assert changed.returncode == 0 and "input changed" in changed.stderr, changed.stderr
    assert len(batches(stack, key)) == 2 and len(read_jsonl(out)) == 10
    assert not (tmp_path / "out.errors.jsonl").exists()  # the earlier batch's errors are not this one's

    fresh = genq(stack, key, "run", str(tmp_path / "in.jsonl"), "-o", str(out), "--new")
    assert fresh.returncode == 0 and "created" in fresh.stderr and len(batches(stack, key)) == 3, fresh.stderr


def test_prompts_file(stack: Stack, batcher: Batcher, key: str, tmp_path: Path) -> None:
    prompts = [f"prompt number {i}" for i in range(80)]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:40]) + "\n\n" + "\n".join(prompts[40:]) + "\n")
    out = tmp_path / "answers.jsonl"
    r = genq(
        stack, key, "run", "--prompts", str(tmp_path / "p.txt"), "--model", "m", "--max-tokens", "3", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    got = read_jsonl(out)
    # custom_id is the prompt's line number; the blank line 41 is skipped
    assert sorted(int(x["custom_id"]) for x in got) == [*range(1, 41), *range(42, 82)]
    for x in got:
        body = x["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
    with api(stack, key) as c:
        (b,) = batches(stack, key)
        sent = [json.loads(x) for x in c.get(f"/v1/files/{b['input_file_id']}/content").text.splitlines()]
    assert sent[40] == {
        "custom_id": "42",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": prompts[40]}], "max_tokens": 3},
    }


def test_refused_input_exits_non_zero_with_line_numbers(
    stack: Stack, batcher: Batcher, key: str, tmp_path: Path
) -> None:
    rows = [chat_line(1), chat_line(2), chat_line(1)]
    (tmp_path / "in.jsonl").write_bytes(jsonl(rows))
    r = genq(stack, key, "run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"))
    assert r.returncode == 1, r.stderr
    assert "failed" in r.stderr and "Line 3" in r.stderr and "duplicate_custom_id" in r.stderr
    assert not (tmp_path / "out.jsonl").exists()
    bad_key = genq(stack, "sk-nope", "list")
    assert bad_key.returncode == 3 and "HTTP 401" in bad_key.stderr, bad_key.stderr
    missing = genq(stack, key, "status", "batch_" + "0" * 32)
    assert missing.returncode == 3 and "No such Batch" in missing.stderr, missing.stderr


# -- interrupted, then run again -----------------------------------------------------------
def _interrupted_then_resumed(stack: Stack, key: str, tmp_path: Path, sig: signal.Signals) -> None:
    rows = write_input(tmp_path / "in.jsonl", 150, tokens=6)
    out = tmp_path / "out.jsonl"
    args = ("run", str(tmp_path / "in.jsonl"), "-o", str(out), "--poll-s", "0.2")
    first = spawn(stack, key, *args)
    try:
        state_file = ba.state_path(out)
        wait_for(lambda: state_file.exists() and json.loads(state_file.read_text())["batch_id"], 60, "the batch id")
        batch_id = json.loads(state_file.read_text())["batch_id"]
        with api(stack, key) as c:
            wait_for(
                lambda: c.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] >= 20, 60, "20 lines"
            )
        first.send_signal(sig)
        _, stderr = first.communicate(timeout=20)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    with api(stack, key) as c:
        at_stop = c.get(f"/v1/batches/{batch_id}").json()
    assert at_stop["status"] == "in_progress" and at_stop["request_counts"]["completed"] < 150, at_stop
    assert not out.exists()
    if sig == signal.SIGINT:
        assert first.returncode == 130 and f"genq batch cancel {batch_id}" in stderr, stderr
    else:
        assert first.returncode == -signal.SIGKILL

    second = genq(stack, key, *args)
    assert second.returncode == 0, second.stderr
    assert f"resuming batch {batch_id}" in second.stderr and "created" not in second.stderr
    assert [b["id"] for b in batches(stack, key)] == [batch_id]
    ids = [x["custom_id"] for x in read_jsonl(out)]
    assert len(ids) == 150 and set(ids) == {r["custom_id"] for r in rows}
    assert not ba.errors_path(out).exists()


def test_sigint_then_rerun_resumes_the_same_batch(stack: Stack, batcher: Batcher, key: str, tmp_path: Path) -> None:
    _interrupted_then_resumed(stack, key, tmp_path, signal.SIGINT)


def test_kill_9_then_rerun_resumes_the_same_batch(stack: Stack, batcher: Batcher, key: str, tmp_path: Path) -> None:
    _interrupted_then_resumed(stack, key, tmp_path, signal.SIGKILL)


def test_run_rides_out_an_api_restart(
    stack: Stack, batcher: Batcher, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API goes away mid-run and comes back on the same port: the run keeps following."""
    rows = write_input(tmp_path / "in.jsonl", 150, tokens=6)
    out = tmp_path / "out.jsonl"
    first = spawn(stack, key, "run", str(tmp_path / "in.jsonl"), "-o", str(out), "--poll-s", "0.2")
    try:
        state_file = ba.state_path(out)
        wait_for(lambda: state_file.exists() and json.loads(state_file.read_text())["batch_id"], 60, "the batch id")
        batch_id = json.loads(state_file.read_text())["batch_id"]
        stack.server.stop()
        completed = lambda: int(stack.call(lambda br: br.batches.get_batch(batch_id))["completed"])  # noqa: E731
        at_stop = completed()
        wait_for(lambda: completed() >= at_stop + 30, 60, "30 more lines while the API is away")
        assert first.poll() is None  # still following
        monkeypatch.setattr(test_api_support, "_free_port", lambda: stack.server.port)
        stack.server = LiveServer(stack.settings)
        stack.server.start()
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert first.returncode == 0, stderr
    assert [b["id"] for b in batches(stack, key)] == [batch_id]
    assert sorted(x["custom_id"] for x in read_jsonl(out)) == sorted(r["custom_id"] for r in rows)


@pytest.mark.parametrize("created", [False, True], ids=["before-create", "before-saving-the-batch-id"])
def test_killed_after_upload_reuses_the_file(
    stack: Stack, batcher: Batcher, key: str, tmp_path: Path, created: bool
) -> None:
    """A run that died after the upload (its state has the file, no batch) does not upload again,
    and finds the batch it created if it died before saving the batch's id."""
    write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.jsonl"
    with api(stack, key) as c:
        fid = c.post(
            "/v1/files", files={"file": ("in.jsonl", (tmp_path / "in.jsonl").read_bytes())}, data={"purpose": "batch"}
        ).json()["id"]
        other = c.post("/v1/files", files={"file": ("x.jsonl", jsonl([chat_line(0)]))}, data={"purpose": "batch"})
        c.post("/v1/batches", json={"input_file_id": other.json()["id"], "endpoint": "/v1/chat/completions"})
        if created:
            made = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/chat/completions"}).json()
        c.post("/v1/batches", json={"input_file_id": other.json()["id"], "endpoint": "/v1/chat/completions"})
    state = ba.RunState(stack.url, ba.sha256(tmp_path / "in.jsonl"), "in.jsonl", "/v1/chat/completions", fid)
    ba.save_state(out, state)
    r = genq(stack, key, "run", str(tmp_path / "in.jsonl"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    mine = [b for b in batches(stack, key) if b["input_file_id"] == fid]
    assert len(mine) == 1 and len(read_jsonl(out)) == 20
    if created:
        assert mine[0]["id"] == made["id"] and f"resuming batch {made['id']}" in r.stderr
    assert json.loads(ba.state_path(out).read_text())["batch_id"] == mine[0]["id"]
    with api(stack, key) as c:
        names = sorted(f["filename"] for f in c.get("/v1/files").json()["data"])
    assert names.count("in.jsonl") == 1  # no second upload


# -- the single calls -------------------------------------------------------------------------
def test_submit_status_list_cancel_download(stack: Stack, batcher: Batcher, key: str, tmp_path: Path) -> None:
    write_input(tmp_path / "small.jsonl", 30)
    write_input(tmp_path / "big.jsonl", 200, tokens=8)
    r = genq(stack, key, "submit", str(tmp_path / "small.jsonl"))
    assert r.returncode == 0, r.stderr
    small = r.stdout.strip()
    assert small.startswith("batch_") and len(r.stdout.splitlines()) == 1
    big = genq(stack, key, "submit", str(tmp_path / "big.jsonl")).stdout.strip()

    cancelled = genq(stack, key, "cancel", big)
    assert cancelled.returncode == 0 and cancelled.stdout.split() in ([big, "cancelling"], [big, "cancelled"])
    with api(stack, key) as c:
        wait_for(lambda: c.get(f"/v1/batches/{small}").json()["status"] == "completed", 60, "the small batch")
        wait_for(lambda: c.get(f"/v1/batches/{big}").json()["status"] == "cancelled", 60, "the big batch's cancel")

    status = genq(stack, key, "status", small)
    assert (
        status.returncode == 0 and "completed" in status.stdout and "30 completed, 0 failed, 30 total" in status.stdout
    )
    as_json = json.loads(genq(stack, key, "status", big, "--json").stdout)
    assert as_json["id"] == big and as_json["status"] == "cancelled"

    listed = genq(stack, key, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.index(big) < listed.stdout.index(small)  # newest first
    page = json.loads(genq(stack, key, "list", "--limit", "1", "--json").stdout)
    assert [b["id"] for b in page["data"]] == [big] and page["has_more"]

    d = genq(stack, key, "download", small, "-o", str(tmp_path / "small.out.jsonl"))
    assert d.returncode == 0, d.stderr
    assert len(read_jsonl(tmp_path / "small.out.jsonl")) == 30
    d = genq(stack, key, "download", big, "-o", str(tmp_path / "big.out.jsonl"))
    assert d.returncode == 0, d.stderr
    done, never = read_jsonl(tmp_path / "big.out.jsonl"), read_jsonl(tmp_path / "big.out.errors.jsonl")
    assert len(done) + len(never) == 200 and len(never) > 0
    assert {x["error"]["code"] for x in never} == {"batch_cancelled"}
    again = genq(stack, key, "cancel", small)
    assert again.returncode == 3 and "batch_not_cancellable" in again.stderr, again.stderr


def test_run_of_a_cancelled_batch_downloads_what_ran_and_exits_1(
    stack: Stack, batcher: Batcher, key: str, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", 200, tokens=8)
    out = tmp_path / "out.jsonl"
    args = ("run", str(tmp_path / "in.jsonl"), "-o", str(out), "--poll-s", "0.2")
    first = spawn(stack, key, *args)
    try:
        state_file = ba.state_path(out)
        wait_for(lambda: state_file.exists() and json.loads(state_file.read_text())["batch_id"], 60, "the batch id")
        batch_id = json.loads(state_file.read_text())["batch_id"]
        assert genq(stack, key, "cancel", batch_id).returncode == 0
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert first.returncode == 1 and "cancelled" in stderr and "--new" in stderr, stderr
    assert len(read_jsonl(out)) + len(read_jsonl(ba.errors_path(out))) == 200
