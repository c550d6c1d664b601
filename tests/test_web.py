"""The chat page at / in headless Chromium (Debian's, driven by Playwright): send, stream, stop."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import CACHE, SERVE_KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("GARAGE_TEST_ARTIFACTS", CACHE / "artifacts"))


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(
            "Debian's chromium is needed for the web test: apt-get install chromium (tests/run.sh does)"
        )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1100, "height": 760})
        pg.goto(served[0] + "/")
        pg.fill("#key", SERVE_KEY)
        pg.dispatch_event("#key", "change")  # stores the key, lists the models
        _until(lambda: pg.locator("#model option[value='smollm2:135m']").count() > 0)
        pg.select_option("#model", "smollm2:135m")  # the store may hold base models without a chat template
        yield pg
        browser.close()


def _until(check, seconds: float = 120.0) -> None:
    """Poll from Python: the page's CSP (rightly) forbids the string eval wait_for_function uses."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            raise AssertionError("the page did not get there in time")
        time.sleep(0.05)


def _last_reply(pg):
    return pg.locator(".msg.assistant").last


def test_send_a_message_and_watch_it_stream(page, served):
    page.evaluate("""() => {
        window.__sizes = [];
        new MutationObserver(() => {
            const m = document.querySelectorAll('.msg.assistant');
            if (m.length) window.__sizes.push(m[m.length - 1].textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", "What is the capital of France? Answer in two sentences.")
    page.press("#input", "Enter")
    reply = _last_reply(page)
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
    text = reply.inner_text()
    assert text.strip() and "Error" not in text
    sizes = page.evaluate("window.__sizes")
    assert len(set(sizes)) > 2  # the reply grew piece by piece: it was streamed
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "web-chat.png"))
    assert (SHOTS / "web-chat.png").stat().st_size > 10_000
    saved = page.evaluate("JSON.parse(localStorage.getItem('garage.convs'))")
    assert saved[-1]["messages"][-1]["role"] == "assistant"  # kept in the browser
    assert page.inner_text("#status") == ""  # the key was accepted: no complaint left on screen


def test_stop_a_reply(page, served):
    pool = served[1]
    page.click("#new")
    page.fill("#input", "Write a very long story about a dragon who learns to cook.")
    page.press("#input", "Enter")
    _until(lambda: len(_last_reply(page).inner_text()) > 20)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=30_000)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    held = pool.held["smollm2:135m"]
    for _ in range(100):
        if held.scheduler.busy == 0:
            break
        time.sleep(0.05)
    assert held.scheduler.busy == 0  # the server dropped the request when the page stopped reading


def test_model_output_cannot_inject_html(page):
    html = page.evaluate(
        "renderMarkdown('<img src=x onerror=alert(1)> **bold** `code`\\n```\\n<b>x</b>\\n```')"
    )
    assert "<img" not in html and "&lt;img" in html and "<strong>bold</strong>" in html
    assert "<pre><code>&lt;b&gt;x&lt;/b&gt;" in html
