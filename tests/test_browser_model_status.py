"""No stale lines (issue 21 item 3), in a real headless Chromium: the line under the model list
says how the model *in use* was loaded: "Loaded the bundled demo model" goes when another model is
picked and comes back with the demo. (A stopped job's ETA: the end of
tests/test_browser_sessions.py.)"""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from browser_util import browser_page, chromium_or_skip, screenshot, serve, wait_text

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from test_app import FakeDetector

    from app.controller import AppController
    from app.main import build_app

    ctl = AppController(data_root=tmp_path_factory.mktemp("data"), state_dir=tmp_path_factory.mktemp("state"),
                        samples_dir=None)
    demo = build_app(ctl)  # loads the bundled demo model
    ctl.registry.add("fake", FakeDetector(), "test", activate=False)
    with serve(demo) as url:
        yield {"url": url, "ctl": ctl}


def _pick(page: Any, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _no_text(page: Any, elem_id: str, needle: str, timeout_ms: int = 30_000) -> None:
    page.wait_for_function("([id, s]) => !(document.getElementById(id)?.innerText || '').includes(s)",
                           arg=[elem_id, needle], timeout=timeout_ms)


def test_the_model_line_follows_the_model_in_use(env: dict[str, Any]) -> None:
    demo_name = env["ctl"].registry.active
    assert demo_name and demo_name.startswith("demo")
    with browser_page(CHROMIUM) as page:
        page.goto(env["url"])
        wait_text(page, "model-status", "Loaded the bundled demo model")
        _pick(page, "model-select", "fake")
        wait_text(page, "model-status", "Model in use: fake (test)")
        _no_text(page, "model-status", "bundled demo")
        screenshot(page, "model-status-after-switch")
        _pick(page, "model-select", demo_name)
        try:
            wait_text(page, "model-status", "Loaded the bundled demo model")
        except Exception:
            screenshot(page, "model-status-back-to-demo")
            raise
