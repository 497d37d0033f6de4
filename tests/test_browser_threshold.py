"""The threshold box (issue 21 item 3), in a real headless Chromium: a value typed above (or below)
the slider's range is taken, not answered with a bare "Error": the range widens to it, the box keeps
it and the verdicts follow it; the threshold is shown rounded. Model: the deterministic fake of
tests/test_app.py (score = max |grey - 0.5|, threshold 0.3)."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from browser_util import browser_page, chromium_or_skip, screenshot, serve, textbox_value, wait_text, wait_textbox

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from test_app import FakeDetector, grey

    from app.controller import AppController
    from app.main import build_app

    root = tmp_path_factory.mktemp("data")
    files = [grey(root / "b_defect.png", 10, 48), grey(root / "a_ok.png", 128, 48)]
    ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), samples_dir=None, demo_dir=None)
    ctl.registry.add("fake", FakeDetector(threshold=0.312345678), "test")
    demo = build_app(ctl, load_default=False)
    with serve(demo) as url:
        yield {"url": url, "files": files}


def _type_threshold(page: Any, value: str) -> None:
    box = page.locator("#inspect-threshold input[type=number]").first
    box.fill(value)
    box.press("Enter")


def test_a_threshold_typed_outside_the_range_is_taken(env: dict[str, Any]) -> None:
    with browser_page(CHROMIUM, height=1400) as page:
        page.goto(env["url"])
        page.locator("#inspect-upload input[type=file]").set_input_files([str(f) for f in env["files"]])
        page.locator("#inspect-run").click()
        wait_text(page, "inspect-status", "Inspected 2 image(s)")
        box = page.locator("#inspect-threshold input[type=number]").first
        assert box.input_value() == "0.312346"  # rounded (6 significant digits)
        assert textbox_value(page, "inspect-verdict") == "ANOMALOUS"
        _type_threshold(page, "50")  # far above the slider's range (about 0.7)
        wait_textbox(page, "inspect-verdict", lambda v: v == "GOOD")
        wait_text(page, "inspect-false-alarms", "At threshold 50:")
        rng = page.locator("#inspect-threshold input[type=range]").first
        page.wait_for_function("() => Number(document.querySelector('#inspect-threshold input[type=range]')"
                               ".max) >= 50", timeout=30_000)
        assert box.input_value() == "50" and float(rng.get_attribute("max")) >= 50
        _type_threshold(page, "-1")  # below it
        wait_textbox(page, "inspect-verdict", lambda v: v == "ANOMALOUS")
        wait_text(page, "inspect-false-alarms", "At threshold -1:")
        assert box.input_value() == "-1"
        errors = page.locator(".toast-body").all_inner_texts()
        screenshot(page, "threshold-typed-outside-range")
        assert not errors, errors
