"""The web console in a real headless Chromium (Playwright), against a stack with the simulated engine.

Every test records each request the browser makes and asserts none leaves 127.0.0.1;
screenshots of each page go to ``$GENQ_SCREENSHOTS`` (default ``.genq/screenshots``).
Chromium is Debian's (``scripts/test.sh`` installs it): Playwright's own download needs
its CDN. Without a browser the tests skip on a workstation and fail in CI (``CI`` set).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import structlog
from test_api_openai import expected
from test_api_support import ADMIN_KEY, HandWorker, Stack, auth, make_stack  # noqa: F401 (fixture)
from test_batches import Batcher, chat_line, jsonl, wait_for

from broker.contract import JobErrorCode
from broker.models import JobStatus, TenantLimits

log = structlog.get_logger(__name__)
CHROMIUM = os.environ.get("GENQ_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("GENQ_SCREENSHOTS", Path(__file__).resolve().parents[1] / ".genq" / "screenshots"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARGS += ["--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]
WAIT_MS = 20_000
STATIC = Path(__file__).resolve().parents[1] / "api" / "ui" / "static"

pytestmark = pytest.mark.timeout(120)

# Records each value the overview's queued count shows (the page redraws it on every poll).
WATCH_QUEUED = """() => {
  window.genqQueued = [];
  const root = document.querySelector("section[data-page=overview]");
  const note = () => {
    const el = root.querySelector("[data-testid=queued-total]");
    const v = el && Number(el.textContent);
    if (el && window.genqQueued.at(-1) !== v) window.genqQueued.push(v);
  };
  note();
  new MutationObserver(note).observe(root, { childList: true, subtree: true });
}"""

# Records each (status, completed) a batch's row shows, per batch id (rows redraw every poll).
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


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the console tests need a browser in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (the dev extra has it)")
    if not os.path.exists(CHROMIUM):
        _unavailable(f"no Chromium at {CHROMIUM} (scripts/test.sh installs Debian's)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@dataclass
class Console:
    """One browser context on a stack: its page, and every URL it asked for."""

    stack: Stack
    page: Any
    requests: list[str] = field(default_factory=list)

    def login(self, key: str, who: str) -> None:
        from playwright.sync_api import expect

        self.page.goto(f"{self.stack.url}/ui/")
        self.page.fill("#key", key)
        self.page.click("button[type=submit]")
        expect(self.page.get_by_test_id("whoami")).to_have_text(who)

    def go(self, hash_path: str) -> None:
        self.page.evaluate("h => { location.hash = h }", hash_path)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def assert_local(self) -> None:
        assert self.requests, "the browser made no request at all"
        parts = [urlsplit(u) for u in self.requests]
        far = [p.geturl() for p in parts if p.scheme not in ("data", "blob") and p.hostname != "127.0.0.1"]
        assert not far, f"requests left 127.0.0.1: {far}"


@pytest.fixture
def console(browser: Any) -> Iterator[Any]:
    """``console(stack)``: a fresh browser context (own sessionStorage) on the stack."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    contexts = []

    def make(stack: Stack) -> Console:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(ctx)
        c = Console(stack, ctx.new_page())
        ctx.on("request", lambda r: c.requests.append(r.url))
        return c

    yield make
    for ctx in contexts:
        ctx.close()


def submit(stack: Stack, key: str, n: int = 1, model: str = "m", max_tokens: int = 8) -> list[str]:
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens}
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=10) as c:
        return [c.post("/v1/jobs", json=body).raise_for_status().json()["id"] for _ in range(n)]


def get_job(stack: Stack, key: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=auth(key), timeout=10).raise_for_status().json()


def test_overview_follows_the_queue_and_admin_pages(make_stack: Any, console: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    stack = make_stack(worker=False)
    alice = stack.key("alice")
    c = console(stack)
    c.login(ADMIN_KEY, "admin (admin)")
    queued = c.page.get_by_test_id("queued-total")
    expect(queued).to_have_text("0")
    submit(stack, alice, 25)
    expect(queued).to_have_text("25")  # rising, as seen by the page's polls
    submit(stack, alice, 25)
    expect(queued).to_have_text("50")
    expect(c.page.locator("tr[data-model=m] [data-testid=queued]")).to_have_text("50")
    expect(c.page.locator("polyline[data-series=queued]")).to_have_count(1)
    c.shot("overview-queued")
    c.page.evaluate(WATCH_QUEUED)
    # a worker slow enough (4 sequences, 20 ms a step, 8 tokens a job: ~2 s) for polls to see the fall
    stack.add_worker("m", sim_step_ms=20.0, max_num_seqs=4)
    expect(queued).to_have_text("0")
    seen = c.page.evaluate("window.genqQueued")
    log.info("queued counts the overview showed", values=seen)
    assert seen[0] == 50 and seen[-1] == 0 and any(0 < v < 50 for v in seen), seen
    assert seen == sorted(seen, reverse=True), seen  # only falling once the worker runs
    expect(c.page.get_by_test_id("workers-total")).to_have_text("1")
    c.shot("overview")

    c.go("#/workers")
    expect(c.page.locator("table[data-testid=workers] tr[data-worker]")).to_have_count(1)
    c.shot("workers")

    c.go("#/jobs?tenant=alice&status=succeeded")
    expect(c.page.locator("table[data-testid=jobs] tr[data-job]")).to_have_count(50)
    c.shot("jobs")

    c.go("#/tenants")
    c.page.fill("form[data-testid=create-key] input[name=tenant]", "carol")
    c.page.fill("form[data-testid=create-key] input[name=name]", "from-the-console")
    c.page.click("form[data-testid=create-key] button[type=submit]")
    new_key = c.page.get_by_test_id("new-key-value")
    expect(new_key).to_have_text(re.compile(r"^gq-"))
    carol = new_key.inner_text()
    me = httpx.get(f"{stack.url}/v1/ui/me", headers=auth(carol)).json()
    assert me["tenant"] == "carol" and me["admin"] is False
    c.shot("tenants")
    c.page.on("dialog", lambda d: d.accept())
    card = c.page.locator("[data-tenant=carol]")
    expect(card.locator("tr[data-key]")).to_have_count(1)
    card.get_by_test_id("revoke").click()
    expect(card.locator("tr[data-key]")).to_have_count(0)
    assert httpx.get(f"{stack.url}/v1/ui/me", headers=auth(carol)).status_code == 401

    c.go("#/batches")
    batches = c.page.locator("[data-testid=batches], [data-testid=no-batches-api], [data-page=batches] p")
    expect(batches).not_to_have_count(0)
    c.shot("batches")
    c.assert_local()


def test_job_page_streams_the_output_and_cancels(make_stack: Any, console: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    stack = make_stack(worker=False)
    stack.call(lambda b: b.register_model("h", 4096))
    hand = HandWorker(stack, "h")
    alice = stack.key("alice")
    c = console(stack)
    c.login(alice, "alice")

    [job_id] = submit(stack, alice, model="h", max_tokens=16)
    c.go(f"#/job/{job_id}")
    status, output = c.page.get_by_test_id("job-status"), c.page.get_by_test_id("job-output")
    expect(status).to_have_text("queued")
    [lease] = hand.claim()
    expect(status).to_have_text("running")
    text = ""
    for i, piece in enumerate(["Hello", ", ", "wörld", " <b>!</b>"]):  # markup must show as text
        hand.token(lease, piece, i + 1)
        text += piece
        expect(output).to_have_text(text)  # each token shows as it streams, before the job ends
    hand.finish(lease)
    expect(status).to_have_text("succeeded")
    expect(output).to_have_attribute("data-complete", "true")
    assert output.inner_text() == get_job(stack, alice, job_id)["output"] == text
    expect(c.page.get_by_test_id("attempts")).to_contain_text("w-hand")
    expect(c.page.get_by_test_id("job-usage")).to_contain_text("4 completion tokens")
    c.shot("job")

    [retried_id] = submit(stack, alice, model="h")  # two attempts, each with its worker
    c.go(f"#/job/{retried_id}")
    expect(status).to_have_text("queued")
    [lease] = hand.claim()
    hand.token(lease, "par")
    expect(output).to_have_text("par")
    stack.call(lambda b: b.fail(lease, JobErrorCode.ENGINE_DEAD, "engine died", retry=True))
    expect(status).to_have_text("queued")
    other = HandWorker(stack, "h", "w-other")
    [lease] = other.claim()
    other.token(lease, "tial", 2)
    other.finish(lease)
    expect(status).to_have_text("succeeded")
    rows = c.page.locator("[data-testid=attempts] tr")
    expect(rows).to_have_count(3)  # a header and one row per attempt
    expect(rows.nth(1)).to_contain_text("w-hand")
    expect(rows.nth(1)).to_contain_text("retry: engine_dead")
    expect(rows.nth(2)).to_contain_text("w-other")
    expect(rows.nth(2)).to_contain_text("done")
    expect(output).to_have_attribute("data-complete", "true")
    assert output.inner_text() == get_job(stack, alice, retried_id)["output"] == "partial"
    c.shot("job-retried")

    *ahead_ids, queued_id = submit(stack, alice, 3, model="h")  # cancel a queued job
    c.go(f"#/job/{queued_id}")
    expect(status).to_have_text("queued")
    position = c.page.get_by_test_id("job-position")
    expect(position).to_contain_text("2 ahead")
    # the jobs ahead start: the position follows with no event of its own job (the first change
    # may be the page's first read of its stream; the second can only come from position updates)
    ahead = hand.claim()
    expect(position).to_contain_text("1 ahead")
    ahead += hand.claim()
    expect(position).to_contain_text("0 ahead")
    assert [a.id for a in ahead] == ahead_ids
    c.page.get_by_test_id("cancel").click()
    expect(status).to_have_text("cancelled")
    expect(position).to_have_count(0)
    assert get_job(stack, alice, queued_id)["status"] == "cancelled"
    for lease in ahead:
        hand.finish(lease)

    [running_id] = submit(stack, alice, model="h")  # cancel a running one: its worker aborts it
    c.go(f"#/job/{running_id}")
    [lease] = hand.claim()
    expect(status).to_have_text("running")
    c.page.get_by_test_id("cancel").click()
    expect(c.page.get_by_test_id("cancel")).to_have_text("Cancel requested")
    assert stack.call(lambda b: b.get_job(running_id)).cancel_requested
    stack.call(lambda b: b.complete(lease, "abort", status=JobStatus.CANCELLED))
    expect(status).to_have_text("cancelled")
    c.shot("job-cancelled")
    c.assert_local()


def test_playground_streams_an_answer(make_stack: Any, console: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    stack = make_stack()
    alice = stack.key("alice")
    c = console(stack)
    c.login(alice, "alice")
    c.go("#/playground")
    c.page.select_option("[data-testid=pg-model]", "m")
    c.page.fill("input[name=max_tokens]", "24")
    c.page.select_option("select[name=priority]", "2")
    c.page.fill("[data-testid=pg-message]", "What is the capital of France?")
    c.page.get_by_test_id("pg-send").click()
    answer = c.page.locator("[data-testid=pg-answer][data-done=true]")
    expect(answer).to_have_count(1)
    expect(c.page.get_by_test_id("pg-state")).to_contain_text("done")
    expect(c.page.get_by_test_id("pg-tokens")).to_have_text("24")
    stats = c.page.get_by_test_id("pg-stats")
    expect(stats).to_contain_text(re.compile(r"TTFT \d"))
    job_id = stats.locator("a").inner_text()
    job = get_job(stack, alice, job_id)
    assert job["priority"] == 2 and job["output"] and answer.inner_text() == job["output"]
    c.shot("playground")

    stack.call(lambda b: b.register_model("h", 4096))  # no worker yet: the playground shows the wait
    hand = HandWorker(stack, "h")
    c.go("#/jobs")  # away and back: the page reads the models again, the conversation stays
    expect(c.page.locator("section[data-page=jobs]")).to_have_count(1)
    c.go("#/playground")
    expect(c.page.locator("[data-testid=pg-transcript] .msg")).to_have_count(2)
    c.page.select_option("[data-testid=pg-model]", "h")
    c.page.fill("[data-testid=pg-message]", "And of Italy?")
    c.page.get_by_test_id("pg-send").click()
    expect(c.page.get_by_test_id("pg-state")).to_contain_text(re.compile(r"queued \(0 ahead"))
    [lease] = hand.claim()
    assert [m["content"] for m in lease.job.request.messages or []][-1] == "And of Italy?"
    assert len(lease.job.request.messages or []) == 3  # the conversation so far goes with it
    hand.token(lease, "Rome.")
    hand.finish(lease)
    expect(c.page.locator("[data-testid=pg-answer][data-done=true]")).to_have_count(2)
    expect(c.page.locator("[data-testid=pg-answer]").last).to_have_text("Rome.")
    c.assert_local()


def test_a_tenant_key_sees_only_its_own_jobs_and_no_admin_page(make_stack: Any, console: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    stack = make_stack(worker=False)
    alice, bob = stack.key("alice"), stack.key("bob")
    [mine], [theirs] = submit(stack, alice), submit(stack, bob)
    c = console(stack)
    c.page.goto(f"{stack.url}/ui/")
    c.page.fill("#key", "gq-not-a-key")
    c.page.click("button[type=submit]")
    expect(c.page.get_by_test_id("login-error")).to_have_text("That key is not valid.")
    c.shot("login")
    c.login(alice, "alice")
    expect(c.page.locator("table[data-testid=jobs] tr[data-job]")).to_have_count(1)
    expect(c.page.locator(f"tr[data-job={mine}]")).to_have_count(1)
    expect(c.page.locator(f"tr[data-job={theirs}]")).to_have_count(0)
    for admin_page in ("overview", "workers", "tenants"):
        expect(c.page.locator(f"nav a[data-nav={admin_page}]")).to_have_count(0)
        c.go(f"#/{admin_page}")
        expect(c.page.locator(f"section[data-page={admin_page}] [data-testid=forbidden]")).to_be_visible()
    c.shot("forbidden")
    c.go(f"#/job/{theirs}")
    expect(c.page.locator("section[data-page=job] [data-testid=error]")).to_contain_text("404")
    # and the JSON behind the pages says the same to a key used by hand
    urls = ["/v1/ui/tenants", "/v1/ui/workers", "/v1/ui/overview", "/v1/ui/jobs?tenant=bob"]
    urls += [f"/v1/ui/jobs/{theirs}", f"/v1/ui/jobs/{theirs}/events"]
    answers = c.page.evaluate(
        """async ([key, urls]) => Promise.all(urls.map(async (u) =>
            (await fetch(u, {headers: {Authorization: `Bearer ${key}`}})).status))""",
        [alice, urls],
    )
    assert answers == [403, 403, 403, 403, 404, 404]
    c.assert_local()


def test_the_console_is_served_whole_by_genq(make_stack: Any) -> None:  # noqa: F811
    """No external URL in any asset (only SVG's XML namespace, which is never fetched); a strict CSP."""
    for f in STATIC.iterdir():
        urls = set(re.findall(r"https?://[^\s\"'`)]+", f.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (f.name, urls)
    stack = make_stack(worker=False)
    page = httpx.get(f"{stack.url}/ui", follow_redirects=True)
    assert page.url.path == "/ui/"
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "lib.js", "app.css", "logo.svg"):
        assert httpx.get(f"{stack.url}/ui/static/{name}").status_code == 200
    for bad in ("..%2Fapp.py", "index.html", ".hidden.js", "nope.js"):
        assert httpx.get(f"{stack.url}/ui/static/{bad}").status_code == 404


def test_console_events_resume_and_admin_follows_any_tenant(make_stack: Any) -> None:  # noqa: F811
    stack = make_stack()
    alice = stack.key("alice")
    [job_id] = submit(stack, alice, max_tokens=6)

    def events(key: str, after: str | None = None) -> list[tuple[str, str]]:
        headers = {**auth(key), **({"Last-Event-ID": after} if after else {})}
        with httpx.stream("GET", f"{stack.url}/v1/ui/jobs/{job_id}/events", headers=headers, timeout=20) as r:
            assert r.status_code == 200, r.read()
            out, fields = [], {}
            for line in r.iter_lines():
                if not line and "id" in fields:  # the end of an event
                    out.append((fields.get("event", "message"), fields["id"]))
                if not line:
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields[name] = value.strip()
            return out

    everything = events(stack.admin_key)  # an admin follows another tenant's job to its end
    assert everything[0][0] == "queued" and everything[-1][0] == "done"
    assert events(alice) == everything
    assert events(alice, everything[2][1]) == everything[3:]  # Last-Event-ID: only what came after
    bad = httpx.get(f"{stack.url}/v1/ui/jobs/{job_id}/events", headers={**auth(alice), "Last-Event-ID": "x"})
    assert bad.status_code == 400


def create_batch(stack: Stack, key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """files.create + batches.create over HTTP, as a client would."""
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=10) as c:
        f = c.post("/v1/files", files={"file": ("in.jsonl", jsonl(rows))}, data={"purpose": "batch"})
        body = {"input_file_id": f.raise_for_status().json()["id"], "endpoint": "/v1/chat/completions"}
        return c.post("/v1/batches", json={**body, "completion_window": "24h"}).raise_for_status().json()


def test_batches_page_follows_a_batch_downloads_its_output_and_cancels(
    make_stack: Any,  # noqa: F811
    console: Any,
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
