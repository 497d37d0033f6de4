"""Issue 13 ("Trust") in a real headless Chromium: a model switch re-scores the batch (also the
switch a finished bank build makes), the model that scored a result is named, out-of-domain images
are flagged, a comparison is one table (both scores, both verdicts, agreement per image) with the
second model's panels under the first's, the bank-build progress stays off the model
dropdowns, and the Evaluate tab has per-defect-type rows and false-negative thumbnails.

Models: the deterministic fakes of tests/test_app_trust.py (so the wrong "good" of the bug is
certain), a real PatchCore detector built in the browser from synthetic textures, and a real one
built by ``ccad.fit_detector`` for the Evaluate tab. Screenshots land in ``test-artifacts/``.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
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
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from test_app import FakeDetector, grey
    from test_app_trust import DomainDetector, ScaledDetector

    from app.controller import AppController
    from app.main import build_app
    from ccad.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("data")
    imgs = root / "imgs"
    imgs.mkdir()
    files = [grey(imgs / "b_defect.png", 10, 48), grey(imgs / "a_ok.png", 128, 48), grey(imgs / "c_mid.png", 70, 48)]
    ds = write_dataset(root / "synth", kinds=("fibrous",), n_train=12, n_test_good=2, n_test_defect=2, size=64,
                       seed=3, defects=("spot", "stain"))
    ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), samples_dir=None, demo_dir=None)
    ctl.registry.add("scaled", ScaledDetector(), "test")
    ctl.registry.add("domain", DomainDetector(), "test")
    ctl.registry.add("fake", FakeDetector(), "test")
    ctl.registry.add("recon", _recon_detector(), "test", activate=False)
    demo = build_app(ctl)
    with serve(demo) as url:
        yield {"url": url, "root": root, "files": files, "ds": ds / "fibrous", "ctl": ctl}


def _recon_detector() -> Any:
    """A FakeDetector whose predictions carry a reconstruction (the input itself)."""
    from test_app import FakeDetector

    class Recon(FakeDetector):
        def predict(self, item: Any) -> Any:
            p = super().predict(item)
            return type(p)(image=p.image, reconstruction=p.image, anomaly_map=p.anomaly_map, score=p.score,
                           threshold=self.threshold, seconds=p.seconds, path=p.path)

    return Recon()


def _text(page: Any, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _pick(page: Any, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _table(page: Any, elem_id: str) -> list[list[str]]:
    """The rows of a Gradio Dataframe as shown (cell texts)."""
    return page.evaluate("""id => Array.from(document.querySelectorAll('#' + id + ' [role=row].virtual-row'))
        .sort((a, b) => Number(a.dataset.index) - Number(b.dataset.index))
        .map(tr => Array.from(tr.querySelectorAll('[role=gridcell]')).map(td => td.innerText.trim()))""", elem_id)


def _inspect(page: Any, files: list[Path]) -> None:
    page.locator("#inspect-upload input[type=file]").set_input_files([str(f) for f in files])
    page.locator("#inspect-run").click()
    wait_text(page, "inspect-status", f"Inspected {len(files)} image(s)")


def test_model_switch_and_bank_build_rescore_the_batch(env: dict[str, Any]) -> None:
    with browser_page(CHROMIUM) as page:
        page.goto(env["url"])
        page.wait_for_selector("#inspect-upload")
        _inspect(page, env["files"][:2])
        assert textbox_value(page, "inspect-verdict") == "ANOMALOUS"  # the defect, worst first
        assert textbox_value(page, "inspect-model") == "fake"
        assert "scored by fake" in _text(page, "inspect-table")
        score_fake = float(textbox_value(page, "inspect-score"))
        screenshot(page, "trust_before_model_switch")

        # switch model: the batch is re-scored by the new model (before the fix: the old scores at the
        # new threshold 2.0, so the defect read GOOD, and the histogram mixed the two models)
        _pick(page, "model-select", "scaled")
        wait_textbox(page, "inspect-model", lambda v: v == "scaled")
        wait_text(page, "inspect-status", "Re-scored the 2 image(s) of the batch with scaled")
        assert textbox_value(page, "inspect-verdict") == "ANOMALOUS"
        assert float(textbox_value(page, "inspect-score")) == pytest.approx(10 * score_fake, rel=1e-3)
        assert "scored by scaled" in _text(page, "inspect-table")
        rows = _table(page, "inspect-table")
        assert [r[3] for r in rows] == ["anomalous", "good"]
        wait_text(page, "inspect-histogram", "scored by scaled")
        assert "scored by fake" not in _text(page, "inspect-histogram")
        screenshot(page, "trust_after_model_switch")

        # a bank build switches the model by itself: the batch follows, and the progress is drawn on
        # the bank status, never over the model dropdowns
        page.get_by_role("tab", name="Feature bank").click()
        fill_textbox(page, "bank-folder", "synth/fibrous/train/good")
        page.locator("#bank-build").click()
        over_dropdowns, on_status = 0, 0
        deadline = time.time() + 120
        shot = False
        while time.time() < deadline and "Built" not in _text(page, "bank-status"):
            over_dropdowns += page.locator("#model-select .eta-bar, #model-select .progress-text, "
                                           "#compare-select .eta-bar, #compare-select .progress-text").count()
            n = page.locator("#bank-status .eta-bar, #bank-status .progress-text, #bank-status .progress-bar").count()
            on_status += n
            if n and not shot:
                screenshot(page, "trust_bank_build_progress")
                shot = True
            time.sleep(0.1)
        assert "Built" in _text(page, "bank-status")
        assert over_dropdowns == 0
        page.get_by_role("tab", name="Inspect").click()
        wait_textbox(page, "inspect-model", lambda v: v.startswith("bank "), timeout=60)
        wait_text(page, "inspect-status", "Re-scored the 2 image(s)")
        bank_name = textbox_value(page, "inspect-model")
        assert page.locator("#model-select input").first.input_value() == bank_name
        assert f"scored by {bank_name}" in _text(page, "inspect-table")
        screenshot(page, "trust_after_bank_build")
        print("progress elements seen on the bank status:", on_status)


def _header(page: Any, elem_id: str) -> list[str]:
    return [h.strip() for h in page.evaluate(
        "id => Array.from(document.querySelectorAll('#' + id + ' thead th')).map(th => th.innerText)", elem_id)]


def test_out_of_domain_images_and_one_comparison_table(env: dict[str, Any]) -> None:
    with browser_page(CHROMIUM) as page:
        page.goto(env["url"])
        page.wait_for_selector("#inspect-upload")
        _pick(page, "model-select", "domain")
        wait_textbox(page, "inspect-model", lambda v: v == "", timeout=10)
        _inspect(page, env["files"])
        wait_text(page, "inspect-status", "unlike domain's training images")
        assert "b_defect.png" in _text(page, "inspect-status")
        assert textbox_value(page, "inspect-domain").startswith("OUT OF DOMAIN")  # the worst is the dark one
        rows = _table(page, "inspect-table")
        dom = {r[1]: r[5] for r in rows}
        assert dom["b_defect.png"].startswith("OUT OF DOMAIN") and dom["a_ok.png"].startswith("in domain")
        screenshot(page, "trust_out_of_domain")

        _pick(page, "compare-select", "scaled")
        # ONE table: per image both scores, both verdicts and whether they agree (issue 21)
        wait_text(page, "inspect-table", "agree")
        deadline = time.time() + 60
        while "score · scaled" not in _header(page, "inspect-table") and time.time() < deadline:
            page.wait_for_timeout(300)
        head = _header(page, "inspect-table")
        assert head[:7] == ["#", "file", "score · domain", "verdict · domain", "score · scaled", "verdict · scaled",
                            "verdicts agree"], head
        assert not page.locator("#compare-table").is_visible()  # no second table beside it
        rows = _table(page, "inspect-table")
        by_file = {r[1]: r for r in rows}
        # c_mid (score ~0.225): good for domain (0.3), anomalous for scaled (2.25 > 2.0); it disagrees: first
        assert rows[0][1] == "c_mid.png"
        assert by_file["c_mid.png"][3:7] == ["good", by_file["c_mid.png"][4], "anomalous", "✗ DIFFERS"]
        assert by_file["a_ok.png"][6] == by_file["b_defect.png"][6] == "✓ same"
        # the agreement column is in view, not scrolled off to the right of a half-width table
        table_box = page.locator("#inspect-table").bounding_box()
        cell = page.locator("#inspect-table [role=row].virtual-row [role=gridcell]").nth(6)
        cell_box = cell.bounding_box()
        assert cell_box is not None and cell_box["x"] + cell_box["width"] <= table_box["x"] + table_box["width"] + 1
        assert "DIFFERS" in cell.inner_text() or "same" in cell.inner_text()
        # the second model's panels sit under the first's, column by column (not a page further down)
        page.locator("#compare-heatmap img").first.wait_for(state="visible")
        first, second = page.locator("#panel-heatmap").bounding_box(), page.locator("#compare-heatmap").bounding_box()
        gap = second["y"] - (first["y"] + first["height"])
        assert 0 <= gap < first["height"], (first, second)  # only the first model's score line between
        assert abs(second["x"] - first["x"]) < 20 and abs(second["width"] - first["width"]) < 20, (first, second)
        assert "Heatmap · scaled" in _text(page, "compare-heatmap")
        screenshot(page, "trust_compare_one_table")

        # a comparison model WITH a reconstruction (the model in use has none): its extra panels come
        # after the heatmap and overlay, so those still line up column by column
        _pick(page, "compare-select", "recon")
        page.locator("#compare-reconstruction img").first.wait_for(state="visible")
        wait_text(page, "compare-reconstruction", "· recon")
        assert not page.locator("#panel-reconstruction").is_visible()
        for kind in ("original", "heatmap", "overlay"):
            a, b = page.locator(f"#panel-{kind}").bounding_box(), page.locator(f"#compare-{kind}").bounding_box()
            assert abs(a["x"] - b["x"]) < 20 and abs(a["width"] - b["width"]) < 20, (kind, a, b)
        screenshot(page, "trust_compare_with_reconstruction")


def test_evaluate_per_defect_type_rows_and_unstretched_false_negatives(env: dict[str, Any]) -> None:
    from PIL import Image

    from ccad.pipeline import fit_detector

    ctl = env["ctl"]
    ds: Path = env["ds"]
    # a wide defect image (aspect 2:1) that the model misses: its thumbnail must keep that aspect
    wide = ds / "test" / "stain" / "wide.png"
    src = Image.open(sorted((ds / "train" / "good").glob("*.png"))[0])
    Image.fromarray(np.concatenate([np.asarray(src)] * 2, axis=1)).save(wide)
    det = fit_detector(str(ds), bank_size=20, image_size=64, calibration_fraction=0.25)
    ctl.registry.add("eval bank (patchcore)", det, "built by the test", activate=False)
    with browser_page(CHROMIUM) as page:
        page.goto(env["url"])
        page.wait_for_selector("#inspect-upload")
        _pick(page, "model-select", "eval bank (patchcore)")
        page.get_by_role("tab", name="Evaluate").click()
        fill_textbox(page, "eval-path", str(ds.relative_to(env["root"])))
        page.locator("#eval-run").click()
        wait_text(page, "eval-status", "Evaluated eval bank")
        rows = _table(page, "eval-defect-types")
        kinds = [r[1] for r in rows]
        assert kinds == ["good (false alarms)", "spot", "stain"]
        stain = rows[2]
        assert int(stain[2]) == 3 and int(stain[3]) + int(stain[4]) == 3
        page.locator("#eval-fn").scroll_into_view_if_needed()
        screenshot(page, "trust_evaluate_defect_types")
        # every missed defect is shown with its name and score, its thumbnail not stretched or cropped
        fn = page.locator("#eval-fn img")
        assert fn.count() == int(stain[4]) + int(rows[1][4]) > 0
        fit = page.evaluate("() => Array.from(document.querySelectorAll('#eval-fn img')).map("
                            "i => getComputedStyle(i).objectFit)")
        assert fit and all(f == "contain" for f in fit)
        captions = _text(page, "eval-fn")
        assert len(re.findall(r"score \d+(\.\d+)? · \S+\.png", captions)) == fn.count()


def test_zip_upload_over_budget_is_refused_and_a_zip_batch_leaves_nothing(env: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    import zipfile

    ctl = env["ctl"]
    ok, bomb = tmp_path / "batch.zip", tmp_path / "bomb.zip"
    with zipfile.ZipFile(ok, "w") as zf:
        for f in env["files"]:
            zf.write(f, f"imgs/{f.name}")
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(env["files"][0], "a.png")
        zf.writestr("zeros.bin", b"\0" * (3 * 1024**2))
    old = ctl.zip_budget
    ctl.zip_budget = 2 * 1024**2
    try:
        with browser_page(CHROMIUM) as page:
            page.goto(env["url"])
            page.wait_for_selector("#inspect-upload")
            _pick(page, "model-select", "fake")
            page.locator("#inspect-upload input[type=file]").set_input_files(str(bomb))
            page.locator("#inspect-run").click()
            wait_text(page, "inspect-status", "more than the upload budget of 2.0 MB")
            screenshot(page, "trust_zip_over_budget", full_page=False)
            page.locator("#inspect-upload button[aria-label='Clear']").first.click()
            page.locator("#inspect-upload input[type=file]").set_input_files(str(ok))
            page.locator("#inspect-run").click()
            wait_text(page, "inspect-status", "Inspected 3 image(s) with fake")
            assert [p for p in ctl.uploads_dir.rglob("*") if p.is_file()] == []
    finally:
        ctl.zip_budget = old


def test_the_page_says_what_the_bundled_demo_was_trained_on(tmp_path: Path) -> None:
    from app.main import build_app
    from app.state import DEMO_MODEL_DIR

    import json

    info = json.loads((DEMO_MODEL_DIR / "info.json").read_text())
    demo = build_app(data_root=tmp_path, state_dir=tmp_path / "state")
    with serve(demo) as url, browser_page(CHROMIUM) as page:
        page.goto(url)
        wait_text(page, "model-training-data", "was trained on")
        text = _text(page, "model-training-data")
        assert f"{info['n_train_images']} synthetic '{info['demo']['kind']}' texture images only" in text
        assert "out of its domain" in text
        screenshot(page, "trust_demo_training_data", full_page=False)


def test_downloads_are_served_when_the_state_folder_is_outside_temp_and_cwd(tmp_path: Path, monkeypatch) -> None:
    """``ccad app`` keeps its state in the user data folder (``~/.local/share/ccad/app``), outside
    the system temp folder and the working directory Gradio serves by default: the downloads
    written there after an inspection must still reach the page (no "Cannot move ... InvalidPathError")."""
    import tempfile

    from test_app import FakeDetector, grey

    from app.controller import AppController
    from app.main import build_app

    systmp, cwd = tmp_path / "systmp", tmp_path / "cwd"
    systmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))  # the state folder is not under it
    monkeypatch.chdir(cwd)
    root = tmp_path / "data"
    root.mkdir()
    img = grey(root / "part.png", 10, 48)
    ctl = AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    ctl.registry.add("fake", FakeDetector(), "test")
    with serve(build_app(ctl)) as url, browser_page(CHROMIUM) as page:
        page.goto(url)
        page.wait_for_selector("#inspect-upload")
        _inspect(page, [img])
        wait_text(page, "inspect-downloads", "batch_scores")  # the name and its extension are shown apart
        assert "part_heatmap" in _text(page, "inspect-downloads")
        assert "Error" not in _text(page, "inspect-status")
        shot = screenshot(page, "trust_downloads_outside_temp")
    assert shot.is_file()
