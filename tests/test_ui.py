"""The web console in a real headless Chromium (Playwright), against a stack with the simulated engine:
log-in, the overview, job pages, the playground, what a tenant's key may see, and the assets.

Every test records each request the browser makes and asserts none leaves 127.0.0.1;
screenshots of each page are saved (see test_ui_support). The Batches, Tenants and Workers
pages are in test_ui_admin.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from test_api_support import ADMIN_KEY, HandWorker, auth, make_stack  # noqa: F401 (fixture)
from test_ui_support import browser, console, get_job, submit  # noqa: F401 (fixtures)

from broker.contract import JobErrorCode
from broker.models import JobStatus

log = structlog.get_logger(__name__)
STATIC = Path(__file__).resolve().parents[1] / "api" / "ui" / "static"

pytestmark = pytest.mark.timeout(120)

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
