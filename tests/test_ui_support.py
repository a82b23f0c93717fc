"""The console's browser fixtures: Debian's Chromium driven by Playwright, one fresh context per
``console(stack)``, each recording every URL it asks for; and the HTTP calls the tests make.

Screenshots go to ``$GENQ_SCREENSHOTS`` (default ``.genq/screenshots``). Chromium is Debian's
(``scripts/test.sh`` installs it): Playwright's own download needs its CDN. Without a browser
the tests skip on a workstation and fail in CI (``CI`` set).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from test_api_support import Stack, auth

CHROMIUM = os.environ.get("GENQ_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("GENQ_SCREENSHOTS", Path(__file__).resolve().parents[1] / ".genq" / "screenshots"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARGS += ["--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]
WAIT_MS = 20_000


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
