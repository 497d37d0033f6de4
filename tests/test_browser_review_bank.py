"""The DAGM review tab's per-class bank and mask editor in a real (headless) Chromium (issue 21).

With a model in use that was not built on the class, the heatmap and the proposal come from a
PatchCore built on the class's own non-defective images: every one the folder holds (its good
Train AND good Test images here, more than the 32 an earlier cap kept), and the page says how many.
The editor shows the image across the editor's full width, with the proposal drawn as a visible
filled layer over the defect. Data: a generated DAGM-like class (tests/dagm_like.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from browser_util import browser_page, chromium_or_skip, fill_textbox, screenshot, serve, wait_text

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()


def _image_width(png: bytes) -> int:
    """The width (px) of the textured image inside an editor screenshot: the columns of which a
    fifth or more is mid-grey texture (the editor's own background and tool icons are not)."""
    shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE).astype(int)
    cols = np.nonzero(((shot > 20) & (shot < 200)).mean(axis=0) > 0.2)[0]
    return int(cols[-1] - cols[0] + 1) if len(cols) else 0


def _red_pixels(png: bytes) -> tuple[int, float, float]:
    """(count, x centre, y centre as fractions) of the red-tinted pixels of a screenshot."""
    shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(int)  # BGR
    red = (shot[..., 2] - np.maximum(shot[..., 0], shot[..., 1])) > 40
    ys, xs = np.nonzero(red)
    if not len(xs):
        return 0, -1.0, -1.0
    return int(red.sum()), float(xs.mean() / red.shape[1]), float(ys.mean() / red.shape[0])


def test_per_class_bank_uses_every_good_image_and_the_editor_shows_the_filled_proposal(tmp_path: Path) -> None:
    import gradio as gr
    from dagm_like import write_dagm_like

    from app.tabs.review import build_review_tab

    root = tmp_path / "data"
    # 36 good Train images and 2 defective ones, 4 good Test images: 40 non-defective in all
    write_dagm_like(root / "dagm", n_good=36, n_defect=2, size=96, axes=(14, 10))
    write_dagm_like(root / "dagm", n_good=4, n_defect=0, size=96, seed=1, split="Test")

    class NotDagm:  # the model in use, built on something else
        info = {"categories": ["tiles"]}

        def predict(self, image: Any) -> Any:
            raise AssertionError("the model in use must not make this class's proposals")

    made = []
    with gr.Blocks() as demo:
        made.append(build_review_tab(lambda: NotDagm(), str(root), str(tmp_path / "state")))
    ui = made[0]
    with serve(demo) as url, browser_page(CHROMIUM, height=1400) as page:
        page.goto(url)
        fill_textbox(page, "review-folder", "dagm")
        page.get_by_text("Edit the mask").click()
        page.locator("#review-load").click()
        wait_text(page, "review-item", "1 / 2", timeout_ms=180_000)
        wait_text(page, "review-status", "PatchCore built on Class1", timeout_ms=180_000)
        status = page.locator("#review-status").inner_text()
        assert "from all 40 of its non-defective images (36 good Train, 4 good Test)" in status, status

        sess = ui.session(str((root / "dagm").resolve()))
        proposal = sess.proposal(0)
        assert proposal[48, 48] and proposal.sum() > 50  # the dark blob at the centre
        editor = page.locator("#review-editor")
        canvas = editor.locator("canvas").first
        canvas.wait_for(state="visible")
        canvas.scroll_into_view_if_needed()
        deadline = time.time() + 120
        n_red, cx, cy, shown = 0, -1.0, -1.0, 0
        while time.time() < deadline:
            ebox = editor.bounding_box()
            png = canvas.screenshot()
            n_red, cx, cy = _red_pixels(png)
            shown = _image_width(png)
            if shown >= 0.75 * ebox["width"] and n_red > 0:
                break
            page.wait_for_timeout(300)
        screenshot(page, "review_editor_full_width")
        # the image across the editor (it was a 96 px image drawn 3x in the middle of a 1200 px box)
        assert shown >= 0.75 * ebox["width"], (shown, ebox)
        # the proposal: a filled red layer over the defect, as large on screen as its share of the image
        scale = (shown / 96.0) ** 2
        assert n_red > 0.5 * proposal.sum() * scale, (n_red, proposal.sum(), scale)
        assert abs(cx - 0.5) < 0.05 and abs(cy - 0.5) < 0.05, (cx, cy)
