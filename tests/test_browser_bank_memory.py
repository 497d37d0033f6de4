"""The Feature bank tab's controls do what they name (issue 21 item 3), in a real headless Chromium:
"Bank size xi" says beside it what it sizes (the bank the diffusion methods are conditioned on) and
the PatchCore memory has its own control, whose value changes the detector built (its memory, as the
build's status line reports it). Real PatchCore builds (lite0 backbone, 64 px, synthetic textures)."""
from __future__ import annotations

import re
from typing import Any, Iterator

import pytest

from browser_util import browser_page, chromium_or_skip, fill_textbox, screenshot, serve

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from app.controller import AppController
    from app.main import build_app
    from ccad.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "synth", kinds=("fibrous",), n_train=8, n_test_good=1, n_test_defect=1, size=64, seed=4,
                  defects=("spot",))
    ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), samples_dir=None, demo_dir=None)
    demo = build_app(ctl, load_default=False)
    with serve(demo) as url:
        yield {"url": url, "ctl": ctl}


def _build(page: Any, memory: str, previous: str) -> tuple[int, int, str]:
    """Set the memory box, build, wait for a new "Built ..." line; (memory, patches, line)."""
    box = page.locator("#bank-memory input[type=number]").first
    box.fill(memory)
    box.press("Tab")
    page.wait_for_function("v => Number(document.querySelector('#bank-memory input[type=range]').value) === v",
                           arg=float(memory), timeout=30_000)  # the slider took the typed value
    page.locator("#bank-build").click()
    # a new "Built" line, once no progress is drawn over the status any more
    page.wait_for_function("prev => { const el = document.getElementById('bank-status'); const t = el?.innerText || '';"
                           " return t.includes('Built') && t !== prev && !el.querySelector('.progress-text, .eta-bar,"
                           " .progress-bar'); }", arg=previous, timeout=240_000)
    text = page.locator("#bank-status").inner_text()
    m = re.search(r"its memory: (\d+) of (\d+) patches", text)
    assert m, text
    return int(m.group(1)), int(m.group(2)), text


def test_the_memory_control_sizes_the_patchcore_memory(env: dict[str, Any]) -> None:
    with browser_page(CHROMIUM, height=1400) as page:
        page.goto(env["url"])
        page.get_by_role("tab", name="Feature bank").click()
        assert "conditioned on" in page.locator("#bank-xi").inner_text()  # said beside the control
        fill_textbox(page, "bank-folder", "synth/fibrous/train/good")
        page.locator("#bank-image-size input").first.click()
        page.get_by_role("option", name="64", exact=True).click()
        small, patches, line = _build(page, "1", "")
        large, patches2, _ = _build(page, "10", line)
        screenshot(page, "bank-memory-control")
        assert patches == patches2 > 0
        assert abs(small - patches / 100) <= 1 and abs(large - patches / 10) <= 1 and large > small
