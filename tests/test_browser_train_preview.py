"""The Train tab's preview and its estimate before Start, in a real (headless) Chromium.

- Issue 21: after a job whose method shows a reconstruction preview, a new job of a method
  without a pixel reconstruction (feat-diff) must not go on showing the previous job's preview.
- Issue 24: before Start, the tab says how long the chosen method / preset / steps would train on
  this machine (measured, and called an estimate), and without CUDA how many steps fit.

The jobs here run a stand-in for ``train_detector`` (the engine is injected, as in
tests/test_train_tab.py): what is tested is what the page shows of a job, not the training.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

from browser_util import browser_page, chromium_or_skip, screenshot, serve, wait_text

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


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from app.controller import AppController, Engine
    from app.main import build_app
    from ccad.data.synthetic import write_dataset

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "synth", kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1, size=32, seed=2,
                  defects=("spot",))
    ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), samples_dir=None,
                        demo_dir=None, engine=Engine(train=_fake_train))
    ctl.hub_cache_dir = str(tmp_path_factory.mktemp("hub-cache"))
    ctl.hub_probe = lambda: False
    demo = build_app(ctl)
    try:
        with serve(demo) as url:
            yield {"url": url, "root": root, "ctl": ctl}
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _open_train(page: Any, url: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-method input").first.wait_for(state="visible")


def _preview_images(page: Any) -> int:
    return page.locator("#train-preview img").count()


def test_a_feat_diff_job_never_shows_the_previous_jobs_preview(env: dict[str, Any]) -> None:
    ctl = env["ctl"]
    with browser_page(CHROMIUM, height=1600) as page:
        _open_train(page, env["url"])
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
