"""The Train tab's preview and its estimate before Start, in a real (headless) Chromium.

- Issue 21: after a job whose method shows a reconstruction preview, a new job of a method
  without a pixel reconstruction (feat-diff) must not go on showing the previous job's preview.
- Issue 24: before Start, the tab says how long the chosen method / preset / steps would train on
  this machine (measured, and called an estimate), and without CUDA how many steps fit.

The jobs here run a stand-in for ``train_detector`` (the engine is injected, as in
tests/test_train_tab.py): what is tested is what the page shows of a job, not the training.
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

from browser_util import (
    browser_page,
    chromium_or_skip,
    offline_train_app,
    open_train,
    screenshot,
    select_dropdown,
    wait_text,
)

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()


def _fake_train(data: str, out_dir: str, callbacks: Any = (), variant: str = "", method: Any = None,
                **kw: Any) -> None:
    """One training step reported the way the Trainer reports it; a preview only for a method that
    reconstructs pixels (as the real methods do: feat-diff's ``preview`` is None)."""
    from ccad.methods import get_method
    from ccad.methods.base import Method

    has_preview = get_method(variant).preview is not Method.preview
    preview = np.zeros((32, 32, 3), np.float32)
    preview[..., 0] = 1.0  # red: the previous job's picture
    for cb in callbacks:
        cb(SimpleNamespace(step=1, total_steps=1, epoch=0, loss=0.25, lr=1e-4, eta_seconds=0.0,
                           preview=preview if has_preview else None))
    return None


MEASURED: list[tuple[str, str, int, int]] = []
PER_STEP = {"tiny": 0.5, "small": 4.0, "base": 40.0}


def _fake_measure(variant: str, method: Any, image_size: int, batch_size: int, probe_steps: int = 3) -> dict:
    """Stands in for ccad.train_probe.measure_step_seconds (its real run is tested in
    tests/test_train_budget.py): seconds per step by preset."""
    MEASURED.append((variant, method.preset, image_size, batch_size))
    return {"per_step": PER_STEP[method.preset], "steps": probe_steps, "setup_seconds": 1.0, "seconds": 3.0}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from app.controller import Engine

    def fake_probe(ctl: Any) -> None:
        ctl.engine.measure_steps = _fake_measure

    app = offline_train_app(tmp_path_factory, engine=Engine(train=_fake_train), configure=fake_probe)
    with app as (url, root, ctl):
        yield {"url": url, "root": root, "ctl": ctl}


def _preview_images(page: Any) -> int:
    return page.locator("#train-preview img").count()


def test_a_feat_diff_job_never_shows_the_previous_jobs_preview(env: dict[str, Any]) -> None:
    ctl = env["ctl"]
    with browser_page(CHROMIUM, height=1600) as page:
        open_train(page, env["url"])
        ctl.start_training("synth/fibrous", None, None, "tiny", 32, 1, 2, preview_every=1, variant="ccad-v")
        ctl.jobs.join(60)
        first = ctl.jobs.snapshot()
        assert first["state"] == "finished", first["error"]
        wait_text(page, "train-status", first["id"])
        page.locator("#train-preview img").first.wait_for(state="visible")  # the pixel method's preview

        ctl.start_training("synth/fibrous", None, None, "tiny", 32, 1, 2, preview_every=1, variant="feat-diff")
        ctl.jobs.join(60)
        second = ctl.jobs.snapshot()
        assert second["state"] == "finished", second["error"]
        wait_text(page, "train-status", second["id"])
        deadline = time.time() + 60
        while _preview_images(page) and time.time() < deadline:
            page.wait_for_timeout(300)
        screenshot(page, "train_feat_diff_no_old_preview")
        assert _preview_images(page) == 0, "the feat-diff job shows the previous job's reconstruction preview"
        wait_text(page, "train-preview", "no pixel reconstruction")


def test_the_estimate_before_start_follows_method_preset_and_steps(env: dict[str, Any]) -> None:
    from app.engine import cuda_available
    from ccad.train_budget import format_seconds

    ctl = env["ctl"]
    cpu = not cuda_available()
    d = ctl.default_train_settings("ccad-v")
    with browser_page(CHROMIUM, height=1600) as page:
        open_train(page, env["url"])  # opening the tab measures the default setting
        steps, size, bs = d["steps"], d["image_size"], d["batch_size"]
        first = f"Estimated training time: {format_seconds(0.5 * steps)} for {steps} steps"
        wait_text(page, "train-estimate", first, timeout_ms=120_000)
        text = page.locator("#train-estimate").inner_text()
        assert "0.50 s/step measured over 3 step(s)" in text and "An estimate" in text, text
        assert "real training steps were timed here" in text and f"{size} px, batch {bs}" in text, text
        if cpu:
            assert "Without a GPU this run fits in 10 minutes" in text, text
        assert ("ccad-v", "tiny", size, bs) in MEASURED
        screenshot(page, "train_estimate_default")

        # a bigger preset: measured for itself; without a GPU the steps that fit, and the smaller preset's
        select_dropdown(page, "train-preset", "small")
        wait_text(page, "train-estimate", f"Estimated training time: {format_seconds(4.0 * steps)} for {steps} steps",
                  timeout_ms=120_000)
        text = page.locator("#train-estimate").inner_text()
        if cpu:
            assert "Without a GPU: 150 steps of the small preset fit in 10 minutes" in text, text
            assert "The tiny preset: 0.50 s/step measured, 1200 steps fit in 10 minutes" in text, text
        n_measured = len(MEASURED)

        # more steps: the estimate follows at once, from the same measurement
        box = page.locator("#train-steps input").first
        box.fill(str(2 * steps))
        box.press("Enter")
        wait_text(page, "train-estimate", f"{format_seconds(8.0 * steps)} for {2 * steps} steps", timeout_ms=60_000)
        assert len(MEASURED) == n_measured
        screenshot(page, "train_estimate_small_preset")
