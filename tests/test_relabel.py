"""Tests of ccad.relabel: tight-mask proposals for DAGM ellipse labels and the review store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from ccad.data.synthetic import make_sample, write_dataset
from ccad.relabel import (
    ProposalSettings,
    ReviewItem,
    ReviewSession,
    discover_items,
    mask_iou,
    overlay,
    propose_mask,
    render_heatmap,
)

CASES = [("fibrous", "scratch"), ("granular", "spot"), ("cloud", "blur"), ("woven", "stain"),
         ("speckle", "scratch"), ("granular", "stain"), ("fibrous", "spot"), ("cloud", "scratch")]


def _write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------


def test_mask_iou_values() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert mask_iou(a, b) == 1.0  # both empty agree
    a[:5] = True
    assert mask_iou(a, b) == 0.0
    b[:, :5] = True
    assert mask_iou(a, b) == pytest.approx(25 / 75)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, np.zeros((5, 5)))


def test_overlay_fill_and_outline() -> None:
    img = np.full((40, 40), 0.5, np.float32)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    fill = overlay(img, mask, (255, 0, 0), 1.0, "fill")
    assert fill.dtype == np.uint8 and fill.shape == (40, 40, 3)
    assert (fill[mask] == [255, 0, 0]).all()
    assert (fill[~mask] == 128).all()  # untouched outside
    out = overlay(img, mask, (255, 0, 0), 1.0, "outline", thickness=1)
    changed = (out != 128).any(axis=2)
    assert changed[10, 10:30].all() and changed[29, 10:30].all()  # the border is drawn
    assert not changed[15:25, 15:25].any()  # the inside stays visible
    assert not changed[:8].any()
    half = overlay(img, mask, (255, 0, 0), 0.5, "fill")
    assert half[20, 20, 0] == 192 and half[20, 20, 1] == 64
    assert (overlay(img, mask, (255, 0, 0), 0.0, "fill") == 128).all()
    with pytest.raises(ValueError, match="mode"):
        overlay(img, mask, mode="glow")
    with pytest.raises(ValueError, match="shape"):
        overlay(img, mask[:10])


def test_render_heatmap_orders_colours() -> None:
    amap = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (8, 1))
    heat = render_heatmap(amap)
    assert heat.shape == (8, 32, 3) and heat.dtype == np.uint8
    assert heat[0, 0, 2] > heat[0, 0, 0]  # low = blue
    assert heat[0, -1, 0] > heat[0, -1, 2]  # high = red


# --------------------------------------------------------------------------------------------
# proposals
# --------------------------------------------------------------------------------------------


def test_proposals_beat_ellipses_on_synthetic_dagm() -> None:
    ell, prop = [], []
    for i, (kind, defect) in enumerate(CASES):
        s = make_sample(kind, 128, seed=10 + i, defect=defect)
        e = s.ellipse > 0
        p = propose_mask(s.image, e)
        assert p.dtype == bool and p.shape == e.shape
        assert not (p & ~e).any(), "the proposal must stay inside the ellipse"
        ell.append(mask_iou(e, s.mask))
        prop.append(mask_iou(p, s.mask))
    ell_m, prop_m = float(np.mean(ell)), float(np.mean(prop))
    assert prop_m > ell_m + 0.2, (ell, prop)
    assert sum(p > e for p, e in zip(prop, ell)) >= 6, (ell, prop)


def test_grabcut_refinement_is_used_and_helps_on_average() -> None:
    on, off = [], []
    for i, (kind, defect) in enumerate(CASES[:6]):
        s = make_sample(kind, 128, seed=40 + i, defect=defect)
        e = s.ellipse > 0
        on.append(mask_iou(propose_mask(s.image, e), s.mask))
        off.append(mask_iou(propose_mask(s.image, e, settings=ProposalSettings(grabcut_iters=0)),
                            s.mask))
    assert on != off  # GrabCut changes the result
    assert np.mean(on) >= np.mean(off) - 0.02


def test_anomaly_map_guides_proposal_when_image_cue_is_weak() -> None:
    rng = np.random.default_rng(0)
    img = (0.5 + 0.02 * rng.standard_normal((96, 96))).astype(np.float32)
    truth = np.zeros((96, 96), np.uint8)
    cv2.circle(truth, (48, 48), 8, 1, -1)
    # the defect is invisible in the image (no intensity or texture change); only the model sees it
    ellipse = np.zeros((96, 96), np.uint8)
    cv2.ellipse(ellipse, (50, 47), (22, 17), 20, 0, 360, 1, -1)
    amap = cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 1.5) + 0.01 * rng.random((96, 96))
    with_map = propose_mask(img, ellipse > 0, amap.astype(np.float32))
    without = propose_mask(img, ellipse > 0, None)
    assert mask_iou(with_map, truth) > 0.6
    assert mask_iou(with_map, truth) > mask_iou(without, truth) + 0.2


def test_uniform_region_and_empty_ellipse_fall_back() -> None:
    img = np.full((64, 64, 3), 0.4, np.float32)
    ellipse = np.zeros((64, 64), np.uint8)
    cv2.ellipse(ellipse, (32, 32), (15, 9), 0, 0, 360, 1, -1)
    out = propose_mask(img, ellipse > 0)  # nothing to find: keep the label unchanged
    assert (out == (ellipse > 0)).all()
    assert not propose_mask(img, np.zeros((64, 64), bool)).any()
    with pytest.raises(ValueError, match="shape"):
        propose_mask(img, np.ones((32, 32), bool))


def test_map_of_other_size_is_resized() -> None:
    s = make_sample("granular", 96, seed=3, defect="spot")
    amap = cv2.resize(s.mask, (24, 24), interpolation=cv2.INTER_AREA)
    out = propose_mask(s.image, s.ellipse > 0, amap)
    assert out.shape == (96, 96)
    assert mask_iou(out, s.mask) > mask_iou(s.ellipse, s.mask)


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


def test_published_dagm_layout_with_exact_masks(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "dagm", kinds=("fibrous", "cloud"), n_train=1, n_test_good=1,
                         n_test_defect=1, size=48, layout="dagm", defects=("scratch", "spot"))
    sess = ReviewSession(root, tmp_path / "store")
    assert len(sess) == 4  # 2 classes x 2 defects; good images are not reviewed
    for i in range(len(sess)):
        it = sess.items[i]
        assert it.label_path and Path(it.label_path).name.endswith("_label.PNG")
        assert it.exact_path is not None
        assert (sess.exact(i) <= sess.ellipse(i)).all()  # the ellipse encloses the exact mask
    assert len({it.key for it in sess.items}) == 4  # stems repeat across classes, keys do not


def test_flat_sample_layout_labels_only(tmp_path: Path) -> None:
    cls = tmp_path / "test_data" / "class1"
    rng = np.random.default_rng(1)
    for stem in ("0001", "0002", "0003"):
        _write_png(cls / f"{stem}.PNG", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    lab = np.zeros((32, 32), np.uint8)
    cv2.ellipse(lab, (16, 16), (8, 5), 0, 0, 360, 255, -1)
    _write_png(cls / "true_masks" / "0002_label.PNG", lab)
    items, unlabelled = discover_items(tmp_path)
    assert [Path(it.image_path).name for it in items] == ["0002.PNG"]
    assert sorted(Path(p).name for p in unlabelled) == ["0001.PNG", "0003.PNG"]
    sess = ReviewSession(tmp_path, tmp_path / "store")
    assert len(sess) == 1 and len(sess.unlabelled) == 2
    assert sess.ellipse(0).sum() == (lab > 0).sum()


def test_mvtec_style_weak_labels_layout(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "mv", kinds=("granular",), n_train=1, n_test_good=1,
                         n_test_defect=1, size=48, layout="mvtec", defects=("spot", "stain"))
    sess = ReviewSession(root, tmp_path / "store")
    assert len(sess) == 2
    assert all("_ellipse" in Path(it.label_path).name for it in sess.items)
    assert all(it.exact_path and "_mask" in Path(it.exact_path).name for it in sess.items)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        ReviewSession(tmp_path / "nope", tmp_path / "store")


# --------------------------------------------------------------------------------------------
# decisions and export
# --------------------------------------------------------------------------------------------


def _small_items(tmp_path: Path, n: int = 4, size: int = 64) -> list[ReviewItem]:
    items = []
    kinds = ("granular", "cloud", "speckle", "fibrous")
    for i in range(n):
        s = make_sample(kinds[i % 4], size, seed=i, defect=("spot", "stain")[i % 2])
        img = _write_png(tmp_path / "imgs" / f"{i:04d}.png", (s.image * 255).round().astype(np.uint8))
        lab = _write_png(tmp_path / "imgs" / "Label" / f"{i:04d}_label.png",
                         (s.ellipse > 0).astype(np.uint8) * 255)
        items.append(ReviewItem(str(img), str(lab)))
    return items


def test_decisions_persist_across_sessions(tmp_path: Path) -> None:
    items = _small_items(tmp_path)
    store = tmp_path / "store"
    s1 = ReviewSession(items, store)
    assert s1.progress_text() == "0 / 4 reviewed"
    proposal0 = s1.proposal(0).copy()
    s1.accept(0)
    on_disk = json.loads((store / "decisions.json").read_text())  # saved at once
    assert on_disk["decisions"]["0000"]["decision"] == "accepted"
    s1.reject(1)
    edit = np.zeros((64, 64), bool)
    edit[5:15, 20:40] = True
    s1.save_edit(edit, 2)
    s1.goto(3)
    assert s1.progress_text() == "3 / 4 reviewed"
    assert not list(store.glob("*.tmp")) and not list(store.glob(".*"))  # atomic writes

    s2 = ReviewSession(items, store)  # a reload: nothing lost, same position
    assert s2.index == 3
    assert s2.n_reviewed == 3
    assert s2.decision(0)["decision"] == "accepted"
    assert s2.decision(1)["decision"] == "rejected"
    assert s2.decision(2)["decision"] == "edited"
    assert (s2.mask(2) == edit).all()
    assert (s2.mask(0) == proposal0).all()
    assert s2.decision(2)["mask_area"] == 200
    assert s2.decision(3) is None
    s2.clear(2)
    assert ReviewSession(items, store).decision(2) is None


def test_navigation_clamps_and_next_undecided(tmp_path: Path) -> None:
    sess = ReviewSession(_small_items(tmp_path, 3), tmp_path / "store")
    assert sess.prev() == 0
    assert sess.next() == 1 and sess.next() == 2 and sess.next() == 2
    sess.accept(0)
    sess.goto(0)
    assert sess.next_undecided() == 1
    with pytest.raises(IndexError):
        sess.accept(7)
    with pytest.raises(ValueError, match="shape"):
        sess.save_edit(np.ones((5, 5), bool), 1)


def test_export_writes_binary_pngs_by_stem_and_csv(tmp_path: Path) -> None:
    items = _small_items(tmp_path)
    sess = ReviewSession(items, tmp_path / "store")
    sess.accept(0)
    sess.reject(1)
    edit = np.zeros((64, 64), bool)
    edit[30:40, 30:50] = True
    sess.save_edit(edit, 3)
    out = tmp_path / "export"
    csv_path = sess.export(out)
    assert csv_path == out / "decisions.csv"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["0000.png", "0003.png"]  # rejected and undecided items are not exported
    m3 = cv2.imread(str(out / "0003.png"), cv2.IMREAD_UNCHANGED)
    assert m3.dtype == np.uint8 and m3.ndim == 2
    assert set(np.unique(m3)) == {0, 255}
    assert ((m3 > 0) == edit).all()
    m0 = cv2.imread(str(out / "0000.png"), cv2.IMREAD_UNCHANGED)
    assert ((m0 > 0) == sess.proposal(0)).all()
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["stem"] for r in rows] == ["0000", "0001", "0003"]
    assert [r["decision"] for r in rows] == ["accepted", "rejected", "edited"]
    assert int(rows[2]["mask_area"]) == 200
    ell3 = sess.ellipse(3)
    assert float(rows[2]["iou_with_ellipse"]) == pytest.approx(mask_iou(edit, ell3), abs=1e-5)
    assert rows[1]["mask_file"] == "" and rows[0]["mask_file"] == "0000.png"
    assert all(r["timestamp"] for r in rows)


def test_export_nests_by_key_when_stems_repeat(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "dagm", kinds=("granular", "cloud"), n_train=0,
                         n_test_good=0, n_test_defect=1, size=48, layout="dagm",
                         defects=("spot",))
    sess = ReviewSession(root, tmp_path / "store")
    assert [it.stem for it in sess.items] == ["0001", "0001"]
    sess.accept(0)
    sess.accept(1)
    sess.export(tmp_path / "out")
    assert (tmp_path / "out" / "Class1" / "test" / "0001.png").is_file()
    assert (tmp_path / "out" / "Class2" / "test" / "0001.png").is_file()


def test_proposals_are_cached_and_use_the_map_fn(tmp_path: Path) -> None:
    items = _small_items(tmp_path, 2)
    calls: list[tuple[int, ...]] = []

    def amap(image: np.ndarray) -> np.ndarray:
        calls.append(image.shape)
        return np.zeros(image.shape[:2], np.float32)

    sess = ReviewSession(items, tmp_path / "store", anomaly_map_fn=amap)
    a = sess.proposal(0)
    b = sess.proposal(0)
    assert a is b and len(calls) == 1


# --------------------------------------------------------------------------------------------
# issue 13 item 11: unchanged saves, portable CSV paths, the non-defective images of a class
# --------------------------------------------------------------------------------------------


def test_saving_the_proposal_unchanged_is_accepted_not_edited(tmp_path: Path) -> None:
    sess = ReviewSession(_small_items(tmp_path, 2), tmp_path / "store")
    proposal = sess.proposal(0).copy()
    assert proposal.any()
    rec = sess.save_edit(proposal.copy(), 0)  # "Save edit" without touching the mask
    assert rec["decision"] == "accepted" and rec["mask_area"] == int(proposal.sum())
    stroke = proposal.copy()
    stroke[0:3, 0:3] = True  # one small stroke
    assert sess.save_edit(stroke, 0)["decision"] == "edited"
    assert (sess.mask(0) == stroke).all()
    assert sess.save_edit(sess.mask(0), 0)["decision"] == "edited"  # the edit saved again stays edited
    sess.reject(1)
    assert sess.save_edit(sess.mask(1), 1)["decision"] == "accepted"  # the proposal shown after a reject


def test_decisions_csv_paths_are_relative_to_the_dataset_root(tmp_path: Path) -> None:
    from dagm_like import write_dagm_like

    root = tmp_path / "dagm"
    write_dagm_like(root, n_good=1, n_defect=2, size=64)
    sess = ReviewSession(root, tmp_path / "store")
    sess.accept(0)
    sess.reject(1)
    rows = list(csv.DictReader(open(sess.export(tmp_path / "out"))))
    assert [r["image_path"] for r in rows] == ["Class1/Train/0001.PNG", "Class1/Train/0002.PNG"]
    assert not any(str(tmp_path) in v for r in rows for v in r.values())  # no server path anywhere
    moved = tmp_path / "elsewhere"
    root.rename(moved)  # portable: the CSV still names the files under the moved root
    assert all((moved / r["image_path"]).is_file() for r in rows)
    # a session on a list of items: paths relative to the items' common folder
    items = _small_items(tmp_path / "loose", 2)
    s2 = ReviewSession(items, tmp_path / "store2")
    s2.accept(0)
    assert [r["image_path"] for r in csv.DictReader(open(s2.export(tmp_path / "out2")))] == ["0000.png"]


def test_class_normal_images_published_layout_uses_labels_txt(tmp_path: Path) -> None:
    from dagm_like import write_dagm_like

    from ccad.relabel import class_normal_images

    names = write_dagm_like(tmp_path / "dagm", n_good=5, n_defect=2, size=32)
    write_dagm_like(tmp_path / "dagm", n_good=3, n_defect=1, size=32, cls="Class2", seed=1)
    found = class_normal_images(tmp_path / "dagm", "Class1")
    assert found.source == "good Train images" and found.total == 5
    assert sorted(Path(s.image_path).name for s in found.samples) == names["good"]
    assert all(s.label == 0 and s.category == "Class1" for s in found.samples)
    few = class_normal_images(tmp_path / "dagm", "Class1", limit=3)
    assert [Path(s.image_path).name for s in few.samples] == ["0003.PNG", "0005.PNG", "0007.PNG"]
    assert few.total == 5
    assert len(class_normal_images(tmp_path / "dagm", "Class2").samples) == 3
    assert class_normal_images(tmp_path / "dagm", "Class7").samples == []  # no such class
    assert class_normal_images(tmp_path / "nowhere", "Class1").samples == []


def test_class_normal_images_loose_sample_takes_the_images_without_a_label(tmp_path: Path) -> None:
    """The DAGM sample layout (classN/*.PNG + true_masks/, no Labels.txt): the images without a
    label file are the non-defective ones; the labelled ones are never in the bank."""
    from dagm_like import write_dagm_like

    from ccad.relabel import class_normal_images

    names = write_dagm_like(tmp_path / "sample", n_good=2, n_defect=3, size=32, cls="class1", loose=True)
    found = class_normal_images(tmp_path / "sample", "class1")
    assert found.source == "images without a defect label"
    assert sorted(Path(s.image_path).name for s in found.samples) == names["good"]
    assert all(s.label == 0 for s in found.samples)
