"""Callback-level tests of the DAGM review tab (app/review.py), without a browser."""

from __future__ import annotations

import csv
import io
import os
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from app.review import ReviewUI, editor_value, mask_from_editor  # noqa: E402
from app.tabs.review import ELEM_IDS, REVIEW_SHORTCUTS_JS, build_review_tab  # noqa: E402
from ccad.data.synthetic import write_dataset  # noqa: E402

REQUIRED_IDS = ["review-folder", "review-load", "review-accept", "review-reject", "review-next",
                "review-prev", "review-progress", "review-panel-original", "review-panel-ellipse",
                "review-panel-mask", "review-panel-heatmap", "review-export"]


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    # no good images at all: nothing to build a per-class bank from (the heatmap comes from the
    # model in use, or is the "no model" note); the per-class bank has its own tests below
    write_dataset(root / "dagm", kinds=("granular", "cloud"), n_train=0, n_test_good=0,
                  n_test_defect=1, size=64, layout="dagm", defects=("spot", "stain"))
    return root


def _ui(data_root: Path, tmp_path: Path, detector: object = None) -> ReviewUI:
    return ReviewUI(lambda: detector, data_root, tmp_path / "state")


def test_tab_builds_with_stable_elem_ids(data_root: Path, tmp_path: Path) -> None:
    with gr.Blocks() as demo:
        with gr.Tab("DAGM review"):
            ui = build_review_tab(lambda: None, str(data_root), str(tmp_path / "state"))
    assert isinstance(ui, ReviewUI)
    cfg = demo.get_config_file()
    ids = {c["props"].get("elem_id") for c in cfg["components"]}
    for i in REQUIRED_IDS:
        assert i in ids, i
    assert set(ELEM_IDS.values()) <= ids
    editor = next(c for c in cfg["components"] if c["props"].get("elem_id") == "review-editor")
    assert editor["type"] == "imageeditor"


def test_shortcut_js_maps_keys_and_ignores_inputs() -> None:
    js = REVIEW_SHORTCUTS_JS.strip()
    assert js.startswith("() =>")
    for key, target in (('"n"', "review-next"), ('"ArrowRight"', "review-next"),
                        ('"p"', "review-prev"), ('"ArrowLeft"', "review-prev"),
                        ('"a"', "review-accept"), ('"r"', "review-reject")):
        assert f"{key}: \"{target}\"" in js
    for tag in ('"input"', '"textarea"', "isContentEditable"):
        assert tag in js


def test_load_shows_four_panels_and_progress(data_root: Path, tmp_path: Path) -> None:
    ui = _ui(data_root, tmp_path)
    key, status, orig, ell, mask, heat, editor, progress, item = ui.load("dagm")
    assert key == str((data_root / "dagm").resolve())
    assert "Loaded 4 labelled image(s)" in status
    assert "no model loaded" in status  # the heatmap note
    for panel in (orig, ell, mask, heat):
        assert panel.dtype == np.uint8 and panel.shape == (64, 64, 3)
    assert progress == "0 / 4 reviewed"
    assert "1 / 4" in item and "IoU with exact mask" in item
    assert not (ell == orig).all() and not (mask == orig).all()  # overlays are drawn
    assert set(editor) == {"background", "layers", "composite"}
    # the heatmap panel is the grey placeholder note, not a colour map
    assert np.abs(heat[..., 0].astype(int) - heat[..., 2].astype(int)).max() < 5


@pytest.mark.parametrize("bad, why", [("../outside", "'..' is not allowed"),
                                      ("/etc", "outside the allowed data root"),
                                      ("", "no path given"),
                                      ("missing", "does not exist")])
def test_folder_confinement_refuses(data_root: Path, tmp_path: Path, bad: str, why: str) -> None:
    out = _ui(data_root, tmp_path).load(bad)
    assert out[0] is None
    assert why in out[1] and out[1].startswith("⚠️")


def test_symlink_out_of_root_is_refused(data_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_dataset(outside, kinds=("granular",), n_train=0, n_test_good=0, n_test_defect=1,
                  size=32, layout="dagm", defects=("spot",))
    os.symlink(outside, data_root / "link")
    out = _ui(data_root, tmp_path).load("link")
    assert out[0] is None and "outside the allowed data root" in out[1]
    # a symlinked *file* inside an allowed folder that points out is dropped too
    inside = data_root / "mixed" / "Class1" / "Test"
    (inside / "Label").mkdir(parents=True)
    img = outside / "Class1" / "Test" / "0001.PNG"
    os.symlink(img, inside / "0001.PNG")
    os.symlink(outside / "Class1" / "Test" / "Label" / "0001_label.PNG",
               inside / "Label" / "0001_label.PNG")
    (inside / "Label" / "Labels.txt").write_text("1\n1\t1\t0001.PNG\t1\t0001_label.PNG\n")
    key, status, *_ = _ui(data_root, tmp_path).load("mixed")
    assert "refused" in status and "outside the data root" in status


def test_decisions_progress_and_resume(data_root: Path, tmp_path: Path) -> None:
    ui = _ui(data_root, tmp_path)
    key = ui.load("dagm")[0]
    out = ui.accept(key, 0.5, "outline", True)
    assert "accepted (saved)" in out[0] and out[6] == "1 / 4 reviewed" and "2 / 4" in out[7]
    out = ui.reject(key, 0.5, "outline", True)
    assert out[6] == "2 / 4 reviewed" and "3 / 4" in out[7]
    out = ui.navigate(key, -1)
    assert "2 / 4" in out[7] and "rejected" in out[7]
    out = ui.navigate(key, +1, 0.5, "fill")
    assert "3 / 4" in out[7]
    # an edit: paint a square on the editor layer and save it
    value = out[5]
    layer = np.zeros_like(value["layers"][0])
    layer[10:20, 10:30] = (255, 0, 0, 255)
    value = {**value, "layers": [layer]}
    out = ui.save_edit(key, value, 0.5, "outline", False)
    assert "edited (saved)" in out[0] and out[6] == "3 / 4 reviewed"
    assert "mask area 200 px" in out[7]

    # a page reload / server restart: a new UI on the same state_dir resumes
    ui2 = _ui(data_root, tmp_path)
    assert ui2.last_folder() == "dagm"
    key2, status, *views = ui2.load("dagm")
    assert "resumed: 3 already reviewed" in status
    assert views[5] == "3 / 4 reviewed" and "3 / 4" in views[6] and "edited" in views[6]


def test_decision_without_folder_is_a_message(data_root: Path, tmp_path: Path) -> None:
    out = _ui(data_root, tmp_path).accept(None)
    assert out[0].startswith("⚠️") and "no folder loaded" in out[0]
    out = _ui(data_root, tmp_path).save_edit(None, None)
    assert out[0].startswith("⚠️")


def test_editor_round_trip_and_gradio_value(tmp_path: Path) -> None:
    img = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
    mask = np.zeros((40, 50), bool)
    mask[5:15, 10:30] = True
    val = editor_value(img, mask)
    assert (mask_from_editor(val, (40, 50)) == mask).all()
    # eraser: alpha cleared; brush elsewhere: alpha set
    lay = val["layers"][0].copy()
    lay[5:15, 10:20] = 0
    lay[30:35, 40:45] = (255, 0, 0, 255)
    got = mask_from_editor({**val, "layers": [lay]}, (40, 50))
    assert got.sum() == 100 + 25 and got[32, 42] and not got[6, 12]
    # no layers: the difference between composite and background
    comp = val["background"].copy()
    comp[0:4, 0:4] = (255, 0, 0)
    got = mask_from_editor({"background": val["background"], "layers": [], "composite": comp},
                           (40, 50))
    assert got.sum() == 16
    with pytest.raises(ValueError):
        mask_from_editor(None, (40, 50))
    # the component accepts the value we send it
    editor = gr.ImageEditor(type="numpy", image_mode="RGBA", format="png")
    data = editor.postprocess(val)
    assert data is not None and len(data.layers) == 1


def test_opacity_and_mode_change_the_mask_panel(data_root: Path, tmp_path: Path) -> None:
    ui = _ui(data_root, tmp_path)
    key = ui.load("dagm")[0]
    square = np.zeros((64, 64, 4), np.uint8)
    square[16:46, 16:46] = (255, 0, 0, 255)
    ui.save_edit(key, {"background": None, "layers": [square], "composite": None}, advance=False)
    orig = ui.views(key, 1.0, "fill")[1]
    fill = ui.views(key, 1.0, "fill")[3]
    outline = ui.views(key, 1.0, "outline")[3]
    faint = ui.views(key, 0.1, "fill")[3]
    assert (fill == [255, 40, 40]).all(axis=2).sum() == 900
    drawn = (outline != orig).any(axis=2)
    assert drawn[16, 16:46].all() and not drawn[20:42, 20:42].any()  # outline keeps the inside
    assert np.abs(faint.astype(int) - orig).sum() < np.abs(fill.astype(int) - orig).sum() / 5


class _MapDetector:
    """Stands in for AnomalyDetector: predict(image).anomaly_map is the image's darkness."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, image: np.ndarray) -> SimpleNamespace:
        self.calls += 1
        g = np.asarray(image, np.float32).mean(axis=2)
        return SimpleNamespace(anomaly_map=cv2.GaussianBlur(np.abs(g - g.mean()), (0, 0), 2))


class _BrokenDetector:
    def predict(self, image: np.ndarray) -> None:
        raise RuntimeError("weights missing")


def test_heatmap_with_detector_and_graceful_failure(data_root: Path, tmp_path: Path) -> None:
    det = _MapDetector()
    ui = _ui(data_root, tmp_path, det)
    key, status, orig, ell, mask, heat, *_ = ui.load("dagm")
    assert "no model loaded" not in status and det.calls == 1
    assert np.abs(heat[..., 0].astype(int) - heat[..., 2].astype(int)).max() > 40  # colours
    ui.views(key)
    assert det.calls == 1  # maps are cached per item
    bad = _ui(data_root, tmp_path / "b", _BrokenDetector())
    key, status, orig, ell, mask, heat, *_ = bad.load("dagm")
    assert "model failed" in status and "RuntimeError" in status
    assert mask.shape == (64, 64, 3)  # the proposal still comes from the image cue


def test_export_zip_has_masks_by_stem_and_csv(data_root: Path, tmp_path: Path) -> None:
    ui = _ui(data_root, tmp_path)
    key = ui.load("dagm")[0]
    ui.accept(key)
    ui.reject(key)
    ui.accept(key)
    path, msg = ui.export(key)
    assert "Exported 2 mask(s)" in msg
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pngs = [n for n in names if n.endswith(".png")]
        assert len(pngs) == 2
        for n in pngs:  # stems repeat across DAGM classes, so masks nest by class/split
            assert n.split("/")[1] in ("Class1", "Class2") and n.endswith("/test/" + n.rsplit("/", 1)[1])
            m = cv2.imdecode(np.frombuffer(zf.read(n), np.uint8), cv2.IMREAD_UNCHANGED)
            assert m.ndim == 2 and set(np.unique(m)) <= {0, 255} and m.max() == 255
        csv_name = next(n for n in names if n.endswith("decisions.csv"))
        rows = list(csv.DictReader(io.StringIO(zf.read(csv_name).decode())))
    assert [r["decision"] for r in rows] == ["accepted", "rejected", "accepted"]
    assert {"stem", "decision", "mask_area", "iou_with_ellipse", "timestamp"} <= set(rows[0])
    assert ui.export(None)[0] is None


@pytest.mark.browser
def test_keyboard_shortcuts_in_chromium(data_root: Path, tmp_path: Path) -> None:
    """End to end: the JS snippet drives accept / reject / previous / next from the keyboard."""
    pytest.importorskip("playwright")
    from tests.browser_util import browser_page, fill_textbox, find_chromium, screenshot, serve, wait_text

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium (apt-get install chromium)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        demo = gr.Blocks(js=REVIEW_SHORTCUTS_JS)
    with demo:
        with gr.Tab("DAGM review"):
            build_review_tab(lambda: None, str(data_root), str(tmp_path / "state"))

    def text(page, elem_id: str) -> str:
        return page.locator(f"#{elem_id}").inner_text()

    def wait_for(page, elem_id: str, needle: str) -> None:
        wait_text(page, elem_id, needle, timeout_ms=60_000)

    with serve(demo) as url, browser_page(chromium) as page:
        page.goto(url)
        fill_textbox(page, "review-folder", "dagm")
        page.locator("#review-load").click()
        wait_for(page, "review-progress", "0 / 4 reviewed")
        wait_for(page, "review-item", "1 / 4")
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("a")
        wait_for(page, "review-progress", "1 / 4 reviewed")
        wait_for(page, "review-item", "2 / 4")
        page.keyboard.press("r")
        wait_for(page, "review-progress", "2 / 4 reviewed")
        page.keyboard.press("ArrowLeft")
        wait_for(page, "review-item", "rejected")
        page.keyboard.press("p")
        wait_for(page, "review-item", "accepted")
        page.keyboard.press("n")
        wait_for(page, "review-item", "2 / 4")
        # typing in the folder box must not trigger shortcuts
        box = page.locator("#review-folder textarea, #review-folder input").first
        box.click()
        box.press("a")
        box.press("r")
        # a negative cannot be polled for, so sync on a later shortcut: had "a" and "r" fired they
        # would have moved us to item 4, and "p" (previous) would land on 3, not on 1
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("p")
        wait_for(page, "review-item", "1 / 4")
        assert "2 / 4 reviewed" in text(page, "review-progress")
        screenshot(page, "review-shortcuts")


class _OnClass:
    """A detector built on one DAGM class (``info['categories']``); its map is a flat 0.5 field."""

    def __init__(self, category: str) -> None:
        self.info = {"categories": [category]}
        self.bank = None
        self.calls = 0

    def predict(self, image: np.ndarray) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(anomaly_map=np.full(np.asarray(image).shape[:2], 0.5, np.float32))


def test_per_class_patchcore_when_the_model_was_not_built_on_the_class(tmp_path: Path) -> None:
    """Auto: a model built on another class is replaced (for the heatmap and proposals) by a
    PatchCore fitted on the reviewed class's own good Train images, once per class, and the
    status says so; the model in use is kept where it was built on the class; the user may pick
    the model in use or any loaded model instead."""
    from app.review import AUTO, IN_USE

    root = tmp_path / "data"
    write_dataset(root / "dagm", kinds=("granular", "cloud"), n_train=4, n_test_good=0, n_test_defect=1,
                  size=64, layout="dagm", defects=("spot",))
    in_use = _OnClass("Class2")
    other = _OnClass("Class1")
    fitted: list[tuple[int, str, int]] = []

    def fake_fit(good: list, variant: str, image_size: int, **kw: object) -> _MapDetector:
        fitted.append((len(good), good[0].category, image_size))
        assert variant == "patchcore" and all(s.label == 0 for s in good)
        return _MapDetector()

    ui = ReviewUI(lambda: in_use, root, tmp_path / "state", models=lambda: ["m1", "other"],
                  get_model=lambda n: other if n == "other" else None, fit=fake_fit)
    assert ui.model_choices() == [AUTO, IN_USE, "m1", "other"]
    key, status, *_ = ui.load("dagm")
    assert "not built on Class1" in status and "PatchCore built on Class1 from all 4 of its good Train images" in status
    assert fitted == [(4, "Class1", 64)] and in_use.calls == 0
    ui.views(key)
    assert len(fitted) == 1  # built once per class
    status = ui.navigate(key, 1)[0]  # Class2: the model in use was built on it
    assert "the model in use" in status and in_use.calls == 1 and len(fitted) == 1
    status = ui.choose_model(key, IN_USE)[0]
    ui.navigate(key, -1)
    assert "the model in use" in ui.views(key)[0] and len(fitted) == 1 and in_use.calls == 2
    status = ui.choose_model(key, "other")[0]
    assert "**other** (picked)" in status and other.calls == 1
    assert "is not loaded" in ui.choose_model(key, "m1")[0]


def test_per_class_patchcore_real_fit(tmp_path: Path) -> None:
    """The real engine: ``ccad.fit_detector`` builds the per-class PatchCore and its
    map colours the heatmap panel."""

    root = tmp_path / "data"
    write_dataset(root / "dagm", kinds=("granular",), n_train=4, n_test_good=0, n_test_defect=1,
                  size=64, layout="dagm", defects=("spot",))
    ui = ReviewUI(lambda: _OnClass("Class9"), root, tmp_path / "state")
    key, status, orig, ell, mask, heat, *_ = ui.load("dagm")
    assert "PatchCore built on Class1" in status, status
    det = ui._class_dets[(key, "Class1")][0]
    assert det.info["categories"] == ["Class1"] and ReviewUI.built_on(det, "Class1")
    assert np.abs(heat[..., 0].astype(int) - heat[..., 2].astype(int)).max() > 40  # a colour map


# --------------------------------------------------------------------------------------------
# issue 13 item 11: the per-class bank on a DAGM sample, the model named, the mask editor
# --------------------------------------------------------------------------------------------


def test_per_class_bank_on_a_loose_dagm_sample_names_the_model(tmp_path: Path) -> None:
    """A folder laid out like the DAGM sample (classN/*.PNG + true_masks/, no Labels.txt): the
    per-class bank is built from the class's images without a label file (never the labelled
    ones), and the status names the model in use and the bank that made the proposal."""
    from dagm_like import write_dagm_like

    from app.review import IN_USE

    root = tmp_path / "data"
    names = write_dagm_like(root / "sample", n_good=2, n_defect=2, size=48, cls="class1", loose=True)
    fitted: list[list[str]] = []

    def fake_fit(good: list, variant: str, image_size: int, **kw: object) -> _MapDetector:
        fitted.append(sorted(Path(s.image_path).name for s in good))
        assert all(s.label == 0 for s in good)
        return _MapDetector()

    ui = ReviewUI(lambda: _OnClass("Class9"), root, tmp_path / "state", fit=fake_fit,
                  active_name=lambda: "demo (ccad-v)")
    key, status, *_ = ui.load("sample")
    assert fitted == [names["good"]]
    assert "The model in use (**demo (ccad-v)**) was not built on class1" in status, status
    assert "**a PatchCore built on class1 from all 2 of its images without a defect label" in status, status
    assert "no good" not in status and "using the model in use" not in status
    assert "PatchCore built on class1" in ui.export(key)[1]  # still named after an export
    status = ui.choose_model(key, IN_USE)[0]
    assert "Heatmap and proposal from **demo (ccad-v)** (the model in use)." in status, status


def test_editor_canvas_is_smaller_than_any_image() -> None:
    """gr.ImageEditor centres the mask layer in max(canvas, image): the canvas must not be larger
    than the image, or the proposal is drawn offset from it (the browser test checks the pixels)."""
    with gr.Blocks() as demo:
        build_review_tab(lambda: None, ".", "/tmp/ccad-review-test-state")
    editor = next(c for c in demo.get_config_file()["components"] if c["props"].get("elem_id") == "review-editor")
    assert max(editor["props"]["canvas_size"]) <= 16


def _red_centre(png: bytes) -> tuple[float, float, int]:
    """(x, y) centre of the red-tinted pixels of a screenshot, as fractions of its size, and their
    count; the editor's tool bars (left, top) are left out (the brush colour icon is red)."""
    shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(int)  # BGR
    red = (shot[..., 2] - np.maximum(shot[..., 0], shot[..., 1])) > 40
    h, w = red.shape
    red[:, : w // 8] = False
    red[: h // 8] = False
    ys, xs = np.nonzero(red)
    if not len(xs):
        return -1.0, -1.0, 0
    return float(xs.mean() / shot.shape[1]), float(ys.mean() / shot.shape[0]), int(red.sum())


@pytest.mark.browser
def test_mask_editor_in_chromium_proposal_over_image_strokes_add_unchanged_accepts(tmp_path: Path) -> None:
    """End to end in Chromium on a generated DAGM-like class (defects at the image centre): the
    editor shows the proposal over the defect; a small stroke saves proposal + stroke ("edited",
    IoU with the proposal stays high); "Save edit" with no change records "accepted"; the eraser
    removes from the proposal; the page names the per-class bank that made the proposal."""
    pytest.importorskip("playwright")
    from dagm_like import write_dagm_like

    from app.review import ReviewUI as _UI
    from ccad.relabel import mask_iou
    from tests.browser_util import browser_page, fill_textbox, find_chromium, screenshot, serve, wait_text

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium (apt-get install chromium)")
    root = tmp_path / "data"
    write_dagm_like(root / "dagm", n_good=3, n_defect=3, size=128, axes=(24, 16))
    made: list[_UI] = []
    with gr.Blocks() as demo:
        made.append(build_review_tab(lambda: None, str(root), str(tmp_path / "state")))
    ui = made[0]

    def wait_for(page, elem_id: str, needle: str) -> None:
        wait_text(page, elem_id, needle, timeout_ms=120_000)

    def wait_proposal_drawn(page, canvas) -> tuple[float, float, int]:
        """Poll (never sleep-then-assert) until the proposal layer shows on the canvas."""
        deadline = time.monotonic() + 120
        while True:
            cx, cy, n_red = _red_centre(canvas.screenshot())
            if n_red > 100 or time.monotonic() > deadline:
                return cx, cy, n_red
            page.wait_for_timeout(200)

    def wait_canvas_changed(page, canvas, before: bytes) -> None:
        """Poll until the editor has drawn the stroke (the canvas differs from ``before``)."""
        deadline = time.monotonic() + 60
        while canvas.screenshot() == before:
            assert time.monotonic() < deadline, "the stroke never showed on the canvas"
            page.wait_for_timeout(100)

    with serve(demo) as url, browser_page(chromium) as page:
        page.goto(url)
        fill_textbox(page, "review-folder", "dagm")
        page.get_by_text("Edit the mask").click()  # open the editor before loading
        page.locator("#review-load").click()
        wait_for(page, "review-item", "1 / 3")
        wait_for(page, "review-status", "PatchCore built on Class1 from all 3 of its good Train images")
        sess = ui.session(str((root / "dagm").resolve()))
        proposal = sess.proposal(0).copy()
        assert proposal[64, 64] and 300 < proposal.sum() < 3000  # the dark blob at the centre
        canvas = page.locator("#review-editor canvas").first
        canvas.wait_for(state="visible")
        cx, cy, n_red = wait_proposal_drawn(page, canvas)  # the layer loads after the background
        screenshot(page, "review-editor-proposal")
        assert n_red > 100 and abs(cx - 0.5) < 0.03 and abs(cy - 0.5) < 0.05, (cx, cy, n_red)

        # a short stroke from the centre of the defect out past its edge, then Save edit
        canvas.scroll_into_view_if_needed()  # mouse events need it inside the viewport
        box = canvas.bounding_box()
        x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        before = canvas.screenshot()
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x0 + 0.25 * box["height"], y0, steps=8)  # past the blob's right edge
        page.mouse.up()
        wait_canvas_changed(page, canvas, before)
        screenshot(page, "review-editor-stroke")
        page.locator("#review-save-edit").click()
        wait_for(page, "review-progress", "1 / 3 reviewed")
        dec = sess.decision(0)
        saved = sess.mask(0)
        assert dec["decision"] == "edited"
        assert (saved >= proposal).all()  # every proposal pixel kept where it was
        assert saved.sum() > proposal.sum()  # the stroke added
        assert mask_iou(saved, proposal) > 0.7, mask_iou(saved, proposal)  # a small stroke, a small change

        # the next item: Save edit with no change is an accept
        wait_for(page, "review-item", "2 / 3")
        wait_proposal_drawn(page, canvas)
        page.locator("#review-save-edit").click()
        wait_for(page, "review-progress", "2 / 3 reviewed")
        assert sess.decision(1)["decision"] == "accepted"
        assert (sess.mask(1) == sess.proposal(1)).all()
        wait_for(page, "review-status", "accepted (saved)")
        screenshot(page, "review-editor-saved")

        # the third: the eraser, dragged across the middle of the defect, removes from the proposal
        wait_for(page, "review-item", "3 / 3")
        wait_proposal_drawn(page, canvas)
        proposal = sess.proposal(2).copy()
        page.locator("#review-editor button[aria-label='Erase']").click()
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        before = canvas.screenshot()
        page.mouse.move(x0 - 0.2 * box["height"], y0)
        page.mouse.down()
        page.mouse.move(x0 + 0.2 * box["height"], y0, steps=10)
        page.mouse.up()
        wait_canvas_changed(page, canvas, before)
        screenshot(page, "review-editor-erased")
        page.locator("#review-save-edit").click()
        wait_for(page, "review-progress", "3 / 3 reviewed")
        saved = sess.mask(2)
        assert sess.decision(2)["decision"] == "edited"
        assert (saved <= proposal).all() and 0 < saved.sum() < proposal.sum()
        assert not saved[64, 50:78].any()  # the erased line through the centre
