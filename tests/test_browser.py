"""End-to-end tests of the app in a real (headless) Chromium driven by Playwright.

The app runs in this process on a free 127.0.0.1 port with a real PatchCore detector built by
``ccad.fit_detector`` from synthetic DAGM-style textures written to a temp folder (no network,
no GPU, no shared data). Screenshots land in ``test-artifacts/``. Without a Chromium binary
(Debian: ``apt-get install -y chromium``) every test here is skipped with that reason.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from browser_util import (
    browser_page,
    chromium_or_skip,
    fill_textbox,
    screenshot,
    serve,
    textbox_value,
    wait_text,
    wait_textbox,
)

pytestmark = pytest.mark.browser

CHROMIUM = chromium_or_skip()


@pytest.fixture(scope="module")
def app_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from app.controller import AppController
    from app.main import build_app
    from ccad.data.synthetic import write_dataset
    from ccad.pipeline import fit_detector

    root = tmp_path_factory.mktemp("data")
    ds = write_dataset(root / "synth", kinds=("fibrous",), n_train=8, n_test_good=2, n_test_defect=1, size=64,
                       seed=3, defects=("spot",))
    write_dataset(root / "dagm", kinds=("granular",), n_train=3, n_test_good=1, n_test_defect=1, size=64,
                  layout="dagm", defects=("spot", "stain"))
    write_dataset(root / "multi", kinds=("fibrous", "granular"), n_train=4, n_test_good=2, n_test_defect=1,
                  size=64, seed=5, defects=("spot",))
    # a MVTec-like tree whose files all share one name (000.png)
    src = sorted((ds / "fibrous" / "test").rglob("*.png"))
    for i, sub in enumerate(("bottle/test/good", "bottle/test/spot", "cable/test/good")):
        (root / "mv" / sub).mkdir(parents=True)
        shutil.copy(src[i % len(src)], root / "mv" / sub / "000.png")
    det = fit_detector(str(ds / "fibrous"), bank_size=40, image_size=64, calibration_fraction=0.25)
    det2 = fit_detector(str(ds / "fibrous"), bank_size=8, image_size=64, calibration_fraction=0.25, seed=1)
    multi = fit_detector(str(root / "multi"), bank_size=40, image_size=64, calibration_fraction=0.25)
    ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), demo_dir=None)
    ctl.registry.add("small bank (patchcore)", det2, "built by the test")
    ctl.registry.add("two textures (patchcore)", multi, "built by the test")
    ctl.registry.add("synthetic fibrous (patchcore)", det, "built by the test")
    demo = build_app(ctl)
    with serve(demo) as url:
        yield {"url": url, "root": root, "ds": ds / "fibrous", "det": det, "ctl": ctl}


def test_inspect_upload_four_panels_score_and_threshold(app_env: dict[str, Any]) -> None:
    ds: Path = app_env["ds"]
    defect = sorted((ds / "test" / "spot").glob("*.png"))[0]
    with browser_page(CHROMIUM) as page:
        page.goto(app_env["url"])
        page.wait_for_selector("#inspect-upload")
        assert "patchcore" in page.locator("#model-card-line").inner_text().lower()
        page.locator("#inspect-upload input[type=file]").set_input_files(str(defect))
        page.locator("#inspect-run").click()
        score = wait_textbox(page, "inspect-score", lambda v: re.fullmatch(r"-?\d+\.\d+", v) is not None)
        for panel in ("panel-original", "panel-heatmap", "panel-overlay"):
            img = page.locator(f"#{panel} img").first
            img.wait_for(state="visible")
            box = img.bounding_box()
            assert box is not None and box["width"] > 50 and box["height"] > 50, panel
        # PatchCore reconstructs nothing: no grey reconstruction panel, no slider comparing with grey
        for panel in ("panel-reconstruction", "panel-slider"):
            assert not page.locator(f"#{panel}").is_visible(), panel
        heat = page.locator("#panel-heatmap img").first.bounding_box()
        orig = page.locator("#panel-original img").first.bounding_box()
        assert abs(heat["height"] - orig["height"]) < 2  # aligned panels, the colour scale under the maps
        verdict = textbox_value(page, "inspect-verdict")
        assert verdict in ("GOOD", "ANOMALOUS")
        assert re.fullmatch(r"\d+\.\d+ s", textbox_value(page, "inspect-time"))
        page.wait_for_function("name => document.querySelector('#inspect-table').innerText.includes(name)",
                               arg=defect.name)
        screenshot(page, "inspect_result")

        # move the threshold to the other side of the score: the verdict flips without a re-run
        s = float(score)
        new_t = s * 0.5 if verdict == "GOOD" else s * 1.2
        box = page.locator("#inspect-threshold input[type=number]").first
        box.fill(f"{new_t:.5f}")
        box.press("Enter")
        flipped = "ANOMALOUS" if verdict == "GOOD" else "GOOD"
        wait_textbox(page, "inspect-verdict", lambda v: v == flipped, timeout=20)
        assert "calibration good images would be false alarms" in page.locator("#inspect-false-alarms").inner_text()
        assert textbox_value(page, "inspect-score") == score  # same result, re-labelled
        screenshot(page, "inspect_threshold_moved")


def test_bad_folder_gives_a_message_and_server_survives(app_env: dict[str, Any]) -> None:
    with browser_page(CHROMIUM) as page:
        page.goto(app_env["url"])
        page.get_by_role("tab", name="Feature bank").click()
        fill_textbox(page, "bank-folder", "../../etc")
        page.locator("#bank-build").click()
        page.locator("#bank-status").get_by_text("not allowed").wait_for()
        screenshot(page, "bank_refused_path")
        page.get_by_role("tab", name="Inspect").click()
        page.locator("#inspect-run").click()  # nothing uploaded
        page.locator("#inspect-status").get_by_text("no image given").wait_for()


def test_review_tab_accept_flow(app_env: dict[str, Any]) -> None:
    with browser_page(CHROMIUM) as page:
        page.goto(app_env["url"])
        page.get_by_role("tab", name="DAGM review").click()
        fill_textbox(page, "review-folder", "dagm")
        page.locator("#review-load").click()
        wait_text(page, "review-progress", "0 / 2 reviewed")
        wait_text(page, "review-item", "1 / 2")
        # the model in use was built on the synthetic fibrous folder, not on DAGM Class1: the review
        # builds a PatchCore on every non-defective Class1 image of the folder (Train and Test) and says so
        wait_text(page, "review-status", "not built on Class1")
        wait_text(page, "review-status",
                  "PatchCore built on Class1 from all 4 of its non-defective images (3 good Train, 1 good Test)")
        page.locator("#review-panel-heatmap img").first.wait_for(state="visible")
        screenshot(page, "review_per_class_patchcore")
        page.locator("#review-panel-mask img").first.wait_for(state="visible")
        page.locator("#review-accept").click()
        wait_text(page, "review-progress", "1 / 2 reviewed")
        page.locator("#review-prev").click()
        wait_text(page, "review-item", "accepted")
        screenshot(page, "review_accept")


def test_bundled_demo_sample_gallery_inspection(tmp_path: Path) -> None:
    """`ccad app` with no options: the bundled CCAD(V) demo (128 px, fused with its bank) loads
    and a gallery sample is inspected (four panels incl. a real reconstruction) offline on CPU."""
    from app.main import build_app
    from app.state import DEMO_MODEL_DIR, SAMPLES_DIR

    assert (DEMO_MODEL_DIR / "config.json").is_file(), "checkpoints/demo is missing: run scripts/build_demo.py"
    assert sorted(SAMPLES_DIR.glob("defect_*.png")) and sorted(SAMPLES_DIR.glob("good_*.png"))
    demo = build_app(data_root=tmp_path, state_dir=tmp_path / "state")
    with serve(demo) as url, browser_page(CHROMIUM) as page:
        page.goto(url)
        assert "ccad-v" in page.locator("#model-card-line").inner_text()
        names = sorted(p.stem for p in SAMPLES_DIR.iterdir() if p.suffix == ".png")
        idx = next(i for i, n in enumerate(names) if n.startswith("defect_"))
        page.locator("#inspect-samples button.thumbnail-item").nth(idx).click()
        wait_textbox(page, "inspect-score", lambda v: re.fullmatch(r"-?\d+\.\d+", v) is not None, timeout=120)
        t = float(textbox_value(page, "inspect-time").split()[0])
        assert t > 0  # the page says how long it took (its speed is python -m benchmarks speed's business)
        label = page.locator("#panel-reconstruction").inner_text()
        assert "n/a" not in label  # the diffusion model reconstructs
        assert textbox_value(page, "inspect-file") == names[idx] + ".png"
        screenshot(page, "demo_sample_inspection")


def _select_dropdown(page: Any, elem_id: str, label: str) -> None:
    """Pick ``label`` in a Gradio dropdown (open it, click the option)."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(label)  # filters the options to this one
    page.wait_for_timeout(300)
    box.press("Enter")
    page.keyboard.press("Escape")


def test_train_tab_method_dropdown_from_the_registry(app_env: dict[str, Any]) -> None:
    """The Method dropdown lists the registry's trainable methods by title; picking one shows its
    description, preset and image size, and the Autoencoder box exactly for configs that have one;
    a bad advanced option is refused with the field named and no job starts."""
    from app.forms import method_info, trainable_variants

    infos = [method_info(n) for n, _ in trainable_variants()]
    latent = next((i for i in infos if i["has_autoencoder"]), None)
    pixel = method_info("ccad-v")
    with browser_page(CHROMIUM) as page:
        page.goto(app_env["url"])
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-method input").first.wait_for(state="visible")
        assert textbox_value(page, "train-method") == pixel["title"]
        wait_text(page, "train-method-description", pixel["description"])
        assert not page.locator("#train-autoencoder").is_visible()
        ctl = app_env["ctl"]
        assert textbox_value(page, "train-preset") == ctl.default_train_settings(pixel["name"])["preset"]
        page.locator("#train-method input").first.click()
        shown = [t.replace("✓", "").strip() for t in page.get_by_role("option").all_inner_texts()]  # ✓: selected
        assert shown == [i["title"] for i in infos]
        page.keyboard.press("Escape")
        if latent is not None:
            _select_dropdown(page, "train-method", latent["title"])
            wait_text(page, "train-method-description", latent["description"])
            page.locator("#train-autoencoder").wait_for(state="visible")
            wait_textbox(page, "train-autoencoder", lambda v: v == latent["autoencoder"], timeout=20)
            latent_size = ctl.default_train_settings(latent["name"])["image_size"]  # device defaults
            wait_textbox(page, "train-image-size", lambda v: v == str(latent_size), timeout=20)
            screenshot(page, "train_method_latent")
            _select_dropdown(page, "train-method", pixel["title"])
            wait_text(page, "train-method-description", pixel["description"])
            page.locator("#train-autoencoder").wait_for(state="hidden")
            pixel_size = ctl.default_train_settings(pixel["name"])["image_size"]
            wait_textbox(page, "train-image-size", lambda v: v == str(pixel_size), timeout=20)
        # every method can be fused with the bank's nearest-neighbour map (off by default)
        fuse = page.locator("#train-fuse")
        assert fuse.is_visible() and "bank's nearest-neighbour map" in fuse.inner_text()
        assert not fuse.locator("input[type=checkbox]").is_checked()
        # a bad advanced option names the field; nothing starts
        fill_textbox(page, "train-folder", "synth/fibrous")
        page.locator("#train-advanced").get_by_text("Advanced options").first.click()
        fill_textbox(page, "train-options", "bogus_field=1")
        page.locator("#train-start").click()
        wait_text(page, "train-message", "unknown field 'bogus_field'")
        screenshot(page, "train_bad_option")
        assert app_env["ctl"].jobs.snapshot() is None


def test_card_is_one_line_and_the_tabs_are_above_the_fold(app_env: dict[str, Any]) -> None:
    with browser_page(CHROMIUM) as page:
        page.goto(app_env["url"])
        line = page.locator("#model-card-line")
        line.wait_for(state="visible")
        assert "synthetic fibrous (patchcore)" in line.inner_text() and "\n" not in line.inner_text().strip()
        assert line.bounding_box()["height"] < 60
        tabs = page.get_by_role("tab", name="Inspect")
        assert tabs.bounding_box()["y"] < 500, tabs.bounding_box()  # not pushed below the fold
        assert not page.locator("#model-card").is_visible()
        screenshot(page, "card_collapsed", full_page=False)
        page.locator("#model-card-details").get_by_text("Model card (all facts)").click()
        page.locator("#model-card").get_by_text("bank size").wait_for()
        screenshot(page, "card_expanded", full_page=False)


def test_folder_batch_relative_paths_and_whole_batch_comparison(app_env: dict[str, Any]) -> None:
    names = ["bottle/test/good/000.png", "bottle/test/spot/000.png", "cable/test/good/000.png"]
    with browser_page(CHROMIUM, height=1400) as page:
        page.goto(app_env["url"])
        fill_textbox(page, "inspect-folder", "mv")
        page.locator("#inspect-folder-run").click()
        for n in names:
            wait_text(page, "inspect-table", n)
        wait_textbox(page, "inspect-file", lambda v: v in names)
        _select_dropdown(page, "compare-select", "small bank (patchcore)")
        wait_text(page, "inspect-table", "score · small bank (patchcore)")  # one table, both models
        for n in names:
            wait_text(page, "inspect-table", n)
        wait_text(page, "compare-agreement", "Agreement on 3 image(s)")
        text = page.locator("#compare-agreement").inner_text()
        m = re.search(r"(\d+) agree .*?(\d+) disagree", text)
        assert m and int(m.group(1)) + int(m.group(2)) == 3, text
        for panel in ("compare-original", "compare-heatmap", "compare-overlay"):
            page.locator(f"#{panel} img").first.wait_for(state="visible")
        # both models are PatchCore: no reconstruction, so no grey panel and no slider comparing with grey
        for panel in ("compare-reconstruction", "compare-slider", "panel-reconstruction", "panel-slider"):
            assert not page.locator(f"#{panel}").is_visible(), panel
        wait_textbox(page, "compare-score", lambda v: re.fullmatch(r"-?\d+\.\d+", v) is not None)
        page.locator("#inspect-table").scroll_into_view_if_needed()
        screenshot(page, "compare_whole_batch")


def test_evaluate_multi_class_rows_and_per_category_curves(app_env: dict[str, Any]) -> None:
    with browser_page(CHROMIUM, height=1300) as page:
        page.goto(app_env["url"])
        _select_dropdown(page, "model-select", "two textures (patchcore)")
        wait_text(page, "model-card-line", "two textures")
        page.get_by_role("tab", name="Evaluate").click()
        fill_textbox(page, "eval-path", "multi")
        page.locator("#eval-run").click()
        wait_text(page, "eval-status", "2 categories", timeout_ms=120_000)
        table = page.locator("#eval-metrics")
        for cat in ("fibrous", "granular", "mean"):
            wait_text(page, "eval-metrics", cat)
        assert table.inner_text().index("fibrous") < table.inner_text().index("mean")
        _select_dropdown(page, "eval-curves", "every category (overlaid)")
        page.wait_for_function("() => { const t = document.getElementById('eval-roc')?.innerText || '';"
                               " return t.includes('fibrous') && t.includes('granular'); }", timeout=30_000)
        screenshot(page, "evaluate_per_category")


def test_train_tab_settings_form_from_the_config(app_env: dict[str, Any]) -> None:
    from app.forms import method_info, settings_form, trainable_variants

    infos = [method_info(n) for n, _ in trainable_variants()]
    latent = next((i for i in infos if i["has_autoencoder"]), None)
    with browser_page(CHROMIUM, height=1400) as page:
        page.goto(app_env["url"])
        page.get_by_role("tab", name="Train").click()
        form = page.locator("#train-form")
        form.wait_for(state="visible")
        d = app_env["ctl"].default_train_settings()
        for row in settings_form(d["variant"], d["preset"])[:3]:
            wait_text(page, "train-form", row[0])
        assert textbox_value(page, "train-image-size") == str(d["image_size"])
        if d["device"] == "cpu" and d["preset"] is not None:
            assert textbox_value(page, "train-preset") == "tiny"
        screenshot(page, "train_settings_form")
        if latent is not None:
            _select_dropdown(page, "train-method", latent["title"])
            first = settings_form(latent["name"], app_env["ctl"].default_train_settings(latent["name"])["preset"])
            for row in first[:3]:
                wait_text(page, "train-form", row[0])
            wait_text(page, "train-settings", f"Settings of {latent['title']}")
            screenshot(page, "train_settings_form_latent")
