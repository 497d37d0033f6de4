"""A training job belongs to the browser that started it (issue 20 item 7), in a real headless
Chromium: a second browser (its own local storage) sees the job read-only, with Stop and Resume
disabled, and cannot stop it; the first browser keeps the job after a reload and stops it. The
training run is a stand-in that reports a step every 20 ms until stopped (the job machinery, the
pages and the ownership are real)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from browser_util import CHROMIUM_ARGS, chromium_or_skip, screenshot, serve, wait_text
from test_app_sessions import endless_train, good_folder

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from app.controller import AppController, Engine
    from app.main import build_app

    root = tmp_path_factory.mktemp("data")
    good_folder(root)
    ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), samples_dir=None,
                        demo_dir=None, engine=Engine(train=endless_train))
    demo = build_app(ctl)
    with serve(demo) as url:
        yield {"url": url, "ctl": ctl, "root": Path(root)}


def _open_train(page: Any, url: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-start").wait_for(state="visible")
    page.wait_for_function("() => !!localStorage.getItem('ccad-browser-id')", timeout=30_000)


def _disabled(page: Any, elem_id: str) -> bool:
    return bool(page.evaluate("id => { const b = document.getElementById(id); "
                              "return !!(b && (b.disabled || b.querySelector('button')?.disabled)); }", elem_id))


def _wait_disabled(page: Any, elem_id: str, want: bool, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while _disabled(page, elem_id) != want:
        if time.time() > deadline:
            raise AssertionError(f"#{elem_id} disabled={not want}, expected {want}")
        page.wait_for_timeout(200)


def test_another_browser_sees_the_job_read_only_and_cannot_stop_it(env: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    ctl = env["ctl"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            a = browser.new_context(viewport={"width": 1400, "height": 1400}).new_page()
            b = browser.new_context(viewport={"width": 1400, "height": 1400}).new_page()
            for page in (a, b):
                page.set_default_timeout(60_000)
                _open_train(page, env["url"])
            a.locator("#train-folder textarea, #train-folder input").first.fill("good")
            a.locator("#train-start").click()
            wait_text(a, "train-message", "Started training job")
            wait_text(a, "train-progress", "step ")
            # the other browser: the same job, read-only, Stop and Resume disabled
            wait_text(b, "train-status", "read-only here")
            _wait_disabled(b, "train-stop", True)
            _wait_disabled(b, "train-resume", True)
            screenshot(b, "sessions-other-browser-read-only")
            b.evaluate("() => { for (const id of ['train-stop', 'train-resume']) { const el = "
                       "document.getElementById(id); const btn = el.tagName === 'BUTTON' ? el : "
                       "el.querySelector('button'); btn.disabled = false; } }")
            b.locator("#train-stop").click()  # forced: the server still refuses
            wait_text(b, "train-message", "another browser session")
            assert ctl.jobs.busy()
            # the owner reloads: the job is still its own; it stops it
            a.reload()
            _open_train(a, env["url"])
            _wait_disabled(a, "train-stop", False)
            assert "read-only" not in (a.locator("#train-status").inner_text() or "")
            a.locator("#train-stop").click()
            wait_text(a, "train-message", "Stop requested")
            ctl.jobs.join(30)
            assert ctl.jobs.snapshot()["state"] == "stopped"
            wait_text(b, "train-status", "stopped")
            # a stopped job has no time left: no ETA (issue 21 item 3)
            wait_text(a, "train-status", "stopped")
            assert "ETA" not in a.locator("#train-progress").inner_text()
        finally:
            browser.close()
