"""A bank build is listed after a page reload (issue 21 item 3), in a real headless Chromium: the
reloaded page shows the running build with its progress and cancels it; another browser sees that a
build of another session runs. The build is a stand-in that reports a batch every 50 ms until
cancelled (the events, the page, the reload and the cancel are real)."""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from browser_util import CHROMIUM_ARGS, chromium_or_skip, fill_textbox, screenshot, serve, wait_text
from test_app_sessions import good_folder

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()


def slow_fit(path: str, progress: Any = None, cancel: Any = None, **_k: Any) -> Any:
    from ccad.errors import Cancelled

    for i in range(2400):  # two minutes at most
        if cancel is not None and cancel():
            raise Cancelled("bank build cancelled")
        if progress is not None:
            progress(i, 2400)
        time.sleep(0.05)
    raise AssertionError("the build was never cancelled")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from app.controller import AppController, Engine
    from app.main import build_app

    root = tmp_path_factory.mktemp("data")
    good_folder(root)
    ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), samples_dir=None,
                        demo_dir=None, engine=Engine(fit=slow_fit))
    demo = build_app(ctl, load_default=False)
    with serve(demo) as url:
        yield {"url": url, "ctl": ctl}


def _open_bank(page: Any, url: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name="Feature bank").click()
    page.locator("#bank-build").wait_for(state="visible")
    page.wait_for_function("() => !!localStorage.getItem('ccad-browser-id')", timeout=30_000)


def test_a_reloaded_page_lists_and_cancels_its_bank_build(env: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            a = browser.new_context(viewport={"width": 1400, "height": 1200}).new_page()
            b = browser.new_context(viewport={"width": 1400, "height": 1200}).new_page()
            for page in (a, b):
                page.set_default_timeout(60_000)
            _open_bank(a, env["url"])
            fill_textbox(a, "bank-folder", "good")
            a.locator("#bank-build").click()
            try:
                wait_text(a, "bank-jobs", "Bank build from good: running (")
            except Exception:
                screenshot(a, "bank-build-not-listed")
                raise
            a.reload()
            _open_bank(a, env["url"])
            wait_text(a, "bank-jobs", "Bank build from good: running (")  # still listed after the reload
            _open_bank(b, env["url"])
            wait_text(b, "bank-jobs", "1 bank build(s) started in other browser sessions are running")
            screenshot(a, "bank-build-after-reload")
            a.locator("#bank-cancel").click()
            wait_text(a, "bank-jobs", "Last bank build from good: cancelled")
        finally:
            browser.close()
