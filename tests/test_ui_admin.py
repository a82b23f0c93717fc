"""The console's Batches, Tenants and Workers pages in headless Chromium, against a stack with the
simulated engine (and, for batches, a running batcher): what they show is checked against the
API, and no request leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from test_api_openai import expected
from test_api_support import ADMIN_KEY, HandWorker, Stack, auth, make_stack  # noqa: F401 (fixture)
from test_batches import Batcher, chat_line, jsonl, wait_for
from test_ui_support import browser, console, get_job, submit  # noqa: F401 (fixtures)

from broker.models import TenantLimits

log = structlog.get_logger(__name__)

pytestmark = pytest.mark.timeout(120)

WATCH_BATCHES = """() => {
  window.genqBatches = {};
  const root = document.querySelector("section[data-page=batches]");
  const note = () => {
    for (const row of root.querySelectorAll("tr[data-batch]")) {
      const v = [row.querySelector("[data-testid=batch-status] .badge").textContent,
        Number(row.querySelector("[data-testid=batch-completed]").textContent)];
      const seen = (window.genqBatches[row.dataset.batch] ??= []);
      if (String(seen.at(-1)) !== String(v)) seen.push(v);
    }
  };
  note();
  new MutationObserver(note).observe(root, { childList: true, subtree: true });
}"""


def create_batch(stack: Stack, key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """files.create + batches.create over HTTP, as a client would."""
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=10) as c:
        f = c.post("/v1/files", files={"file": ("in.jsonl", jsonl(rows))}, data={"purpose": "batch"})
        body = {"input_file_id": f.raise_for_status().json()["id"], "endpoint": "/v1/chat/completions"}
        return c.post("/v1/batches", json={**body, "completion_window": "24h"}).raise_for_status().json()


def test_batches_page_follows_a_batch_downloads_its_output_and_cancels(
    make_stack: Any,  # noqa: F811
    console: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    stack = make_stack(worker=False, files_url=str(tmp_path / "files"))
    hand = HandWorker(stack, "m")  # plays the first lines, so the page is seen part-way for sure
    batcher = Batcher(stack)
    try:
        acme = stack.key("acme")
        rows = [chat_line(i, 6) for i in range(8)]
        first = create_batch(stack, acme, rows)
        c = console(stack)
        c.login(acme, "acme")
        c.go("#/batches")
        row = c.page.locator(f"tr[data-batch={first['id']}]")
        expect(row).to_have_count(1)
        c.page.evaluate(WATCH_BATCHES)
        expect(row.get_by_test_id("batch-total")).to_have_text("8")  # validated: its lines are counted
        expect(row.locator("[data-testid=batch-status] .badge")).to_have_text("in_progress")
        leases = wait_for(lambda: hand.claim(3), what="claimable lines")
        for lease in leases:
            hand.token(lease, " hi")
            hand.finish(lease)
        expect(row.get_by_test_id("batch-completed")).to_have_text("3")
        expect(row.get_by_test_id("bar-completed")).to_have_attribute("style", re.compile(r"width: 37\.5%"))
        c.shot("batch-progress")
        # the rest by the simulated engine, slow enough that the second batch is still running when cancelled
        stack.add_worker("m", sim_step_ms=20.0, max_num_seqs=2)
        expect(row.locator("[data-testid=batch-status] .badge")).to_have_text("completed")
        expect(row.get_by_test_id("batch-completed")).to_have_text("8")
        expect(row.get_by_test_id("bar-completed")).to_have_attribute("style", re.compile(r"width: 100%"))
        expect(row.get_by_test_id("batch-cancel")).to_have_count(0)
        seen = c.page.evaluate(f"window.genqBatches[{first['id']!r}]")
        log.info("batch rows the page showed", values=seen)
        counts = [n for _, n in seen]
        assert counts == sorted(counts) and 3 in counts and counts[-1] == 8, seen
        assert [s for s, _ in seen][-1] == "completed" and "in_progress" in [s for s, _ in seen], seen

        # the output file, downloaded by the page (key in a header, handed over as a blob)
        with c.page.expect_download() as dl:
            row.get_by_test_id("download-output").click()
        got = Path(dl.value.path()).read_text()
        done = httpx.get(f"{stack.url}/v1/batches/{first['id']}", headers=auth(acme)).json()
        stored = httpx.get(f"{stack.url}/v1/files/{done['output_file_id']}/content", headers=auth(acme)).text
        assert got == stored
        lines = {x["custom_id"]: x for x in map(json.loads, got.splitlines())}
        assert sorted(lines) == sorted(r["custom_id"] for r in rows)
        ran_by_hand = {"req-" + lease.job.request.messages[0]["content"].split()[1] for lease in leases}
        for r in rows:
            text = lines[r["custom_id"]]["response"]["body"]["choices"][0]["message"]["content"]
            assert text == (" hi" if r["custom_id"] in ran_by_hand else expected(6, messages=r["body"]["messages"])[0])
        assert row.get_by_test_id("download-errors").count() == 0  # no line failed: no error file

        # a second, larger batch (64 tokens a line at 2 sequences x 20 ms a step: minutes), cancelled from the page
        second = create_batch(stack, acme, [chat_line(i, 64) for i in range(200)])
        row2 = c.page.locator(f"tr[data-batch={second['id']}]")
        expect(row2.locator("[data-testid=batch-status] .badge")).to_have_text("in_progress")
        expect(row2.get_by_test_id("batch-total")).to_have_text("200")
        expect(row2.get_by_test_id("batch-completed")).to_have_text(re.compile(r"^[1-9]"))  # part-way
        row2.get_by_test_id("batch-cancel").click()
        expect(row2.locator("[data-testid=batch-status] .badge")).to_have_text("cancelled")
        c.shot("batch-cancelled")
        statuses = [s for s, _ in c.page.evaluate(f"window.genqBatches[{second['id']!r}]")]
        assert statuses.index("in_progress") < statuses.index("cancelling") < statuses.index("cancelled"), statuses
        b = httpx.get(f"{stack.url}/v1/batches/{second['id']}", headers=auth(acme)).json()
        assert b["status"] == "cancelled"
        n = b["request_counts"]
        assert n["completed"] + n["failed"] == n["total"] == 200 and n["failed"] > 0, n
        expect(row2.get_by_test_id("batch-completed")).to_have_text(str(n["completed"]))
        expect(row2.get_by_test_id("batch-failed")).to_have_text(str(n["failed"]))
        width = re.fullmatch(r"width: ([0-9.]+)%;", row2.get_by_test_id("bar-failed").get_attribute("style") or "")
        assert width and abs(float(width[1]) - 100 * n["failed"] / 200) < 0.1, width
        with c.page.expect_download() as dl:
            row2.get_by_test_id("download-errors").click()
        errs = [json.loads(x) for x in Path(dl.value.path()).read_text().splitlines()]
        assert len(errs) == n["failed"] and {x["error"]["code"] for x in errs} == {"batch_cancelled"}
        expect(row2.get_by_test_id("download-output")).to_have_count(1)  # the lines done before the cancel
        expect(row2.get_by_test_id("batch-cancel")).to_have_count(0)
        c.assert_local()
    finally:
        batcher.stop()


def test_tenants_page_shows_usage_against_limits(make_stack: Any, console: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    stack = make_stack(worker=False)
    alice = stack.key("alice", TenantLimits(rpm=6, tpm=10_000, tpm_burst=20_000, max_queued=20))
    c = console(stack)
    c.login(ADMIN_KEY, "admin (admin)")
    c.go("#/tenants")
    card = c.page.locator("[data-tenant=alice]")
    use = {k: card.get_by_test_id(f"use-{k}") for k in ("requests", "tokens", "queued", "running")}
    expect(use["requests"]).to_have_text("0 / 6")
    expect(use["queued"]).to_have_text("0 / 20")
    ids = submit(stack, alice, 6)
    with httpx.Client(base_url=stack.url, headers=auth(alice), timeout=10) as http:  # the 7th: over the rpm
        assert http.post("/v1/jobs", json={"model": "m", "prompt": "Hello", "max_tokens": 8}).status_code == 429
    [row] = [
        t
        for t in httpx.get(f"{stack.url}/v1/ui/tenants", headers=auth(ADMIN_KEY)).json()["data"]
        if t["tenant"] == "alice"
    ]
    assert row["usage"]["rpm_left"] == 0 and row["usage"]["tpm_left"] is not None  # the bucket that refused it
    jobs = [get_job(stack, alice, j) for j in ids]
    reserved = sum(j["usage"]["prompt_tokens"] + 8 for j in jobs)  # charged until they finish
    expect(use["requests"]).to_have_text("6 / 6")
    expect(use["tokens"]).to_have_text(f"{reserved} / 10000")
    expect(use["queued"]).to_have_text("6 / 20")
    expect(card.locator("[data-testid=usage] tr").nth(1).locator(".bar.hot")).to_have_count(1)  # at the limit
    hand = HandWorker(stack, "m")
    leases = hand.claim(2)
    expect(use["running"]).to_have_text("2")
    expect(use["queued"]).to_have_text("4 / 20")
    hand.token(leases[0], "hi")
    hand.finish(leases[0])  # 1 token of 8 used: the other 7 are handed back to the limiter
    expect(use["tokens"]).to_have_text(f"{reserved - 7} / 10000")
    expect(use["running"]).to_have_text("1")
    expect(c.page.locator("[data-tenant=admin] [data-testid=use-requests]")).to_have_text("0 / ∞")
    c.shot("tenants-usage")
    card.get_by_test_id("edit-limits").click()  # raise the rpm from the page: the bar is no longer at the limit
    card.locator("input[name=rpm]").fill("10")
    card.get_by_test_id("save-limits").click()
    expect(use["requests"]).to_have_text("6 / 10")
    expect(card.locator("[data-testid=usage] tr").nth(1).locator(".bar.hot")).to_have_count(0)
    saved = httpx.get(f"{stack.url}/v1/admin/tenants/alice", headers=auth(ADMIN_KEY)).json()["limits"]
    assert (saved["rpm"], saved["tpm"], saved["tpm_burst"], saved["max_queued"]) == (10, 10_000, 20_000, 20)
    c.go("#/overview")  # the 7th request's refusal, by reason
    expect(c.page.locator("tr[data-reason=requests] td.num")).to_have_text("1")
    c.assert_local()


def test_workers_page_marks_draining_and_dead_workers(make_stack: Any, console: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    stack = make_stack(worker=False, worker_max_age_ms=8000)
    beat = {"model": "m", "capacity": 2, "running": 1, "host": "box-1", "tokens_per_s": 12.5}
    stack.call(lambda b: b.heartbeat("w-gone", {**beat, "state": "running"}))  # then silent
    c = console(stack)
    c.login(ADMIN_KEY, "admin (admin)")
    c.go("#/workers")
    stack.call(lambda b: b.heartbeat("w-drain", {**beat, "state": "draining"}))
    drain, gone = (c.page.locator(f"tr[data-worker={w}]") for w in ("w-drain", "w-gone"))
    expect(drain.get_by_test_id("status")).to_have_text("draining")
    expect(drain).to_contain_text("box-1")
    expect(drain).to_contain_text("12.5")
    expect(gone.get_by_test_id("status")).to_have_text("dead")  # silent past the API's worker age limit
    stack.call(lambda b: b.heartbeat("w-drain", {**beat, "state": "draining"}))
    expect(drain.get_by_test_id("status")).to_have_text("draining")  # alive again, next to the dead one
    c.shot("workers-states")
    c.assert_local()
