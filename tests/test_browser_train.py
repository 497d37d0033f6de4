"""The Train tab in a real (headless) Chromium (issue 13 item 12): the Autoencoder box offers what
loads offline first and says a TAEF2 spec is a folder; an autoencoder that would not load is
refused on Start with the field named and no job; after a stopped and twice resumed DeCo-Diff job
(random-init TAEF2, 32 px, 3 steps) the page shows the real last step and loss, a reconstruction
preview, and one short model name. Offline: HF_HUB_OFFLINE=1 and an empty Hub cache folder.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from browser_util import (
    browser_page,
    chromium_or_skip,
    fill_textbox,
    offline_train_app,
    open_train,
    select_dropdown,
    screenshot,
    wait_text,
    wait_textbox,
)

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()

DEFAULT_KL = "kl:stabilityai/sd-vae-ft-mse"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    def taef2_files(root: Any) -> None:
        taef2 = root / "weights" / "taef2"
        taef2.mkdir(parents=True)
        for f in ("taef2_encoder.pth", "taef2_decoder.pth"):
            (taef2 / f).write_bytes(b"")  # listed by what is in the folder; no job here loads it

    with offline_train_app(tmp_path_factory, prepare=taef2_files) as (url, root, ctl):
        yield {"url": url, "root": root, "ctl": ctl, "taef2": root / "weights" / "taef2"}


def test_autoencoder_box_offers_offline_first_and_refuses_what_will_not_load(env: dict[str, Any]) -> None:
    from ccad.methods import get_method

    deco = get_method("deco-diff")
    with browser_page(CHROMIUM, height=1400) as page:
        open_train(page, env["url"])
        select_dropdown(page, "train-method", deco.title)
        page.locator("#train-autoencoder").wait_for(state="visible")
        spec = f"taef2:{env['taef2']}"
        wait_textbox(page, "train-autoencoder", lambda v: v == spec, timeout=20)  # what loads offline first
        wait_text(page, "train-autoencoder", f"Loads offline here: {spec}.")
        hint = page.locator("#train-autoencoder").inner_text()
        assert "taef2:/path/to/folder (the folder holding taef2_encoder.pth and taef2_decoder.pth)" in hint
        assert "taef2.pth" not in hint
        screenshot(page, "train_autoencoder_offline_first")
        # the method's default, offline and not cached: refused on Start, the field named, no job
        fill_textbox(page, "train-folder", "synth/fibrous")
        fill_textbox(page, "train-autoencoder", DEFAULT_KL)
        page.locator("#train-start").click()
        wait_text(page, "train-message", f"Autoencoder '{DEFAULT_KL}'")
        msg = page.locator("#train-message").inner_text()
        assert "HF_HUB_OFFLINE" in msg and "Nothing was started" in msg and f"Loads offline here: {spec}" in msg
        assert "ccad train" not in msg
        screenshot(page, "train_autoencoder_refused")
        assert env["ctl"].jobs.snapshot() is None
        # a TAEF2 file instead of its folder
        fill_textbox(page, "train-autoencoder", f"{spec}/taef2_encoder.pth")
        page.locator("#train-start").click()
        wait_text(page, "train-message", f"give the folder that holds taef2_encoder.pth and taef2_decoder.pth: {spec}")
        assert env["ctl"].jobs.snapshot() is None


def test_resumed_job_shows_real_step_loss_preview_and_one_model_name(env: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)
    from test_train_tab import stop_training_at

    ctl = env["ctl"]
    real = ctl.engine.train
    stop_at = stop_training_at(ctl, 1)
    try:
        ctl.start_training("synth/fibrous", None, None, "tiny", 32, 3, 2, preview_every=1, variant="deco-diff",
                           autoencoder="taef2:random")
        ctl.jobs.join(600)
        assert ctl.training_status()["state"] == "stopped", ctl.jobs.snapshot()["error"]
        stop_at["step"] = -1
        for _ in range(2):  # the second resume has nothing left to train
            ctl.start_training(None, None, None, "", 0, 0, 0, resume=True)
            ctl.jobs.join(600)
            assert ctl.training_status()["state"] == "finished", ctl.jobs.snapshot()["error"]
    finally:
        ctl.engine.train = real
    st = ctl.training_status()
    last = st["losses"][-1][1]
    with browser_page(CHROMIUM, height=1600) as page:
        open_train(page, env["url"])
        wait_text(page, "train-progress", "step 3/3")
        progress = page.locator("#train-progress").inner_text()
        assert f"loss {last:.4f}" in progress and "nan" not in progress
        status = page.locator("#train-status").inner_text()
        assert "finished" in status and "bank" not in status
        img = page.locator("#train-preview img").first
        img.wait_for(state="visible")
        box = img.bounding_box()
        assert box is not None and box["width"] > 20 and box["height"] > 20
        screenshot(page, "train_resumed_finished")
        name = st["model_name"]
        assert ctl.registry.names() == [name] and "stopped" not in name and "(2)" not in name
        wait_text(page, "train-status", f"Model loaded as '{name}'")
        page.locator("#model-select input").first.click()  # the model list holds the run once
        shown = [t.replace("✓", "").strip() for t in page.get_by_role("option").all_inner_texts()]
        page.keyboard.press("Escape")
        assert shown == [name]
