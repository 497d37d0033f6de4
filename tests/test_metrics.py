"""Tests for ccad.metrics: equality with scikit-learn (ties included), AUPRO against a slow
threshold-loop reference, degenerate inputs, input forms, per-category tables."""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from ccad.metrics import (
    METRIC_KEYS,
    MetricWarning,
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    f1max_threshold,
    image_metrics,
    label_regions,
    metrics_by_category,
    pixel_ap,
    pixel_auroc,
    pixel_f1max,
    pixel_metrics,
    pr_points,
    roc_points,
)
from ccad.metrics._core import float32_to_key, key_to_float32

# the package re-exports the function `aupro`, which shadows the submodule attribute
aupro_mod = importlib.import_module("ccad.metrics.aupro")

# ----------------------------------------------------------------------------------------
# helpers and slow, obviously-correct references
# ----------------------------------------------------------------------------------------


def sk_f1max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(f1.max())


def f1_at(y: np.ndarray, s: np.ndarray, thr: float) -> float:
    pred = s >= thr
    tp = np.sum(pred & (y == 1))
    return 2 * tp / (pred.sum() + (y == 1).sum())


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float, conn: int = 8) -> float:
    """Threshold loop over every unique score: PRO = mean region overlap, FPR over normals."""
    structure = np.ones((3, 3)) if conn == 8 else None
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i] > 0.5, structure=structure)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = masks <= 0.5
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(pred[normal].sum() / normal.sum())
        pros.append(np.mean([pred[i][r].sum() / r.sum() for i, r in regions]))
    area = 0.0
    for k in range(1, len(fprs)):
        f0, f1, p0, p1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if f1 <= fpr_limit:
            area += (f1 - f0) * (p0 + p1) / 2
        else:
            if f0 < fpr_limit:
                p_lim = p0 + (fpr_limit - f0) * (p1 - p0) / (f1 - f0)
                area += (fpr_limit - f0) * (p0 + p_lim) / 2
            break
    return area / fpr_limit


def blob_data(rng: np.random.Generator, n: int = 6, h: int = 16, w: int = 18, levels: int = 12):
    """Small masks with a few blobs (some images empty) and tie-heavy maps correlated with them."""
    masks = np.zeros((n, h, w), dtype=np.float32)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        for _ in range(int(rng.integers(0, 3))):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, 4)
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    if masks.sum() == 0:
        masks[0, 2:5, 3:6] = 1
    # integer levels so that tied scores mix normal and anomalous pixels (sloped segments)
    boost = int(rng.integers(1, levels // 2 + 2))
    maps = ((rng.integers(0, levels, (n, h, w)) + masks * boost) / levels).astype(np.float32)
    return masks, maps


# ----------------------------------------------------------------------------------------
# image level against scikit-learn
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [3, 10, 1000])
def test_image_metrics_match_sklearn_with_ties(levels: int) -> None:
    rng = np.random.default_rng(levels)
    checked = 0
    for _ in range(60):
        n = int(rng.integers(2, 80))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = rng.integers(0, levels, n) / levels + 0.3 * y * rng.random()
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        f1, thr = f1max_threshold(y, s)
        assert f1 == pytest.approx(sk_f1max(y, s), abs=1e-12)
        assert f1_at(y, s, thr) == pytest.approx(f1, abs=1e-12)
        checked += 1
    assert checked > 40


def test_image_metrics_all_tied_scores() -> None:
    y = np.array([0, 1, 0, 1, 1])
    s = np.full(5, 0.7)
    m = image_metrics(y, s)
    assert m["image_auroc"] == pytest.approx(0.5)
    assert m["image_ap"] == pytest.approx(average_precision_score(y, s))
    assert m["image_f1max"] == pytest.approx(2 * 3 / (5 + 3))


def test_unknown_labels_are_left_out() -> None:
    y = np.array([0, 1, -1, 0, 1, -1])
    s = np.array([0.1, 0.9, 5.0, 0.3, 0.2, -4.0])
    keep = y != -1
    assert auroc(y, s) == pytest.approx(roc_auc_score(y[keep], s[keep]))
    assert average_precision(y, s) == pytest.approx(average_precision_score(y[keep], s[keep]))


def test_roc_and_pr_points_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = rng.integers(0, 8, 50).astype(float)
    fpr, tpr, thr = roc_points(y, s)
    sfpr, stpr, sthr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sfpr)
    np.testing.assert_allclose(tpr, stpr)
    np.testing.assert_array_equal(thr[1:], sthr[1:])
    assert math.isinf(thr[0])
    r, p, t = pr_points(y, s)  # x (recall) first, like roc_points
    sp, sr, st = precision_recall_curve(y, s)
    # sklearn: ascending thresholds up to full recall, then (1, 0); ours: increasing recall
    n = st.size
    np.testing.assert_allclose(p[: n + 1], sp[::-1])
    np.testing.assert_allclose(r[: n + 1], sr[::-1])
    np.testing.assert_array_equal(t[1 : n + 1], st[::-1])
    assert np.all(np.diff(r) >= 0)
    # subsampling keeps both ends
    fpr_s, tpr_s, _ = roc_points(y, s, max_points=3)
    assert fpr_s.size == 3 and fpr_s[0] == 0 and fpr_s[-1] == 1 and tpr_s[-1] == 1


# ----------------------------------------------------------------------------------------
# pixel level against scikit-learn and the AUPRO reference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [5, 64, 1 << 20])
def test_pixel_metrics_match_sklearn_and_reference(chunk: int, monkeypatch) -> None:
    # small chunks make runs of tied scores straddle chunk boundaries
    monkeypatch.setattr(aupro_mod, "CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    for trial in range(3):
        masks, maps = blob_data(rng, levels=[4, 12, 50][trial])
        m = pixel_metrics(masks, maps)
        y, s = masks.ravel(), maps.ravel()
        assert m["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert m["pixel_f1max"] == pytest.approx(sk_f1max(y, s), abs=1e-12)
        for lim in (0.3, 0.05, 1.0):
            assert aupro(masks, maps, fpr_limit=lim) == pytest.approx(
                reference_aupro(masks, maps, lim), abs=1e-10
            )
        assert m["pixel_aupro"] == pytest.approx(reference_aupro(masks, maps, 0.3), abs=1e-10)


def test_float64_maps_use_exact_path(monkeypatch) -> None:
    monkeypatch.setattr(aupro_mod, "CHUNK", 9)
    rng = np.random.default_rng(11)
    masks, maps32 = blob_data(rng, levels=6)
    # values 1e-12 apart collapse in float32; the float64 path must keep them apart
    maps = maps32.astype(np.float64) + 1e-12 * rng.integers(0, 3, maps32.shape)
    assert not np.array_equal(maps.astype(np.float32), maps)
    y, s = masks.ravel(), maps.ravel()
    m = pixel_metrics(masks, maps)
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["pixel_f1max"] == pytest.approx(sk_f1max(y, s), abs=1e-12)
    assert m["pixel_aupro"] == pytest.approx(reference_aupro(masks, maps, 0.3), abs=1e-10)


def test_pixel_metrics_over_a_chunk_boundary_with_ties() -> None:
    # 1.15 M pixels with 256 score levels: runs of ties cross the default 2**20 chunk edge
    rng = np.random.default_rng(5)
    n, h, w = 70, 128, 128
    masks = np.zeros((n, h, w), dtype=bool)
    masks[::3, 40:70, 50:90] = True
    maps = (rng.integers(0, 256, (n, h, w), dtype=np.int32) / 255).astype(np.float32)
    maps[masks] += 0.2
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    f1, thr = pixel_f1max(masks, maps)
    assert f1_at(y, s, thr) == pytest.approx(f1, abs=1e-12)


def test_aupro_hand_computed() -> None:
    # one region of 2 pixels, 2 normal pixels; the tie at 0.5 joins a region and a normal pixel
    masks = np.array([[[1, 1, 0, 0]]], dtype=np.float32)
    maps = np.array([[[0.9, 0.5, 0.5, 0.1]]], dtype=np.float32)
    # curve: (0,0) -> (0,.5) -> (.5,1) -> (1,1); PRO(.3) = .8; area = .3 * (.5 + .8) / 2
    assert aupro(masks, maps, 0.3) == pytest.approx(0.195 / 0.3)
    assert aupro(masks, maps, 1.0) == pytest.approx(0.5 * 0.75 + 0.5)


def test_aupro_weights_regions_equally_and_respects_connectivity() -> None:
    # a big region fully detected and a tiny region missed: PRO = 0.5 at low FPR
    masks = np.zeros((1, 12, 12), dtype=np.float32)
    masks[0, 1:7, 1:7] = 1
    masks[0, 10, 10] = 1
    maps = np.where(masks > 0, 1.0, 0.5).astype(np.float32)
    maps[0, 10, 10] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)
    diag = np.zeros((5, 5), dtype=bool)
    diag[1, 1] = diag[2, 2] = True
    assert label_regions(diag, 8)[1] == 1
    assert label_regions(diag, 4)[1] == 2
    m4 = diag[None].astype(np.float32)
    s4 = np.zeros((1, 5, 5), dtype=np.float32)
    s4[0, 1, 1] = 1.0
    assert aupro(m4, s4, connectivity=4) == pytest.approx(reference_aupro(m4, s4, 0.3, conn=4))
    assert aupro(m4, s4, connectivity=8) == pytest.approx(reference_aupro(m4, s4, 0.3, conn=8))


def test_float_keys_preserve_order_and_ties() -> None:
    v = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], dtype=np.float32)
    k = float32_to_key(v)
    assert np.all(np.diff(k[[0, 1, 2, 3, 5, 6, 7]].astype(np.int64)) > 0)
    assert k[3] == k[4]  # -0.0 and 0.0 are one threshold
    assert [key_to_float32(int(x)) for x in k] == [float(x) for x in v]


# ----------------------------------------------------------------------------------------
# compute_metrics, perfect detector, degenerate inputs, input forms
# ----------------------------------------------------------------------------------------


def test_perfect_detector_scores_one_everywhere() -> None:
    rng = np.random.default_rng(2)
    masks, _ = blob_data(rng, n=8)
    labels = (masks.reshape(8, -1).max(1) > 0).astype(int)
    scores = labels + rng.random(8) * 0.5
    maps = masks * 2 + rng.random(masks.shape).astype(np.float32) * 0.5
    m = compute_metrics(labels, scores, masks, maps)
    assert list(m) == list(METRIC_KEYS)
    for k, v in m.items():
        assert v == pytest.approx(1.0), k


def test_compute_metrics_without_masks_has_nan_pixel_keys() -> None:
    m = compute_metrics([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.2])
    assert set(m) == set(METRIC_KEYS)
    assert m["image_auroc"] == pytest.approx(0.75)
    assert all(math.isnan(m[k]) for k in METRIC_KEYS if k.startswith("pixel_"))
    with pytest.raises(ValueError, match="maps"):
        compute_metrics([0, 1], [0.1, 0.2], masks=np.zeros((2, 4, 4)))


def test_one_class_gives_nan_with_reason() -> None:
    with pytest.warns(MetricWarning, match="only normal samples"):
        assert math.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.warns(MetricWarning, match="only anomalous samples"):
        assert math.isnan(average_precision([1, 1], [0.1, 0.2]))
    with pytest.warns(MetricWarning, match="image_f1max"):
        f1, thr = f1max_threshold([0, 0], [0.1, 0.2])
    assert math.isnan(f1) and math.isnan(thr)
    masks = np.zeros((2, 4, 4), dtype=np.float32)
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    with pytest.warns(MetricWarning) as record:
        m = compute_metrics([0, 1], [0.1, 0.9], masks, maps)
    messages = [str(w.message) for w in record]
    for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        assert any(msg.startswith(k) and "no anomalous pixels" in msg for msg in messages), k
    assert m["image_auroc"] == 1.0
    assert all(math.isnan(m[k]) for k in METRIC_KEYS if k.startswith("pixel_"))
    with pytest.warns(MetricWarning, match="no normal pixels"):
        assert math.isnan(aupro(np.ones((1, 3, 3)), maps[:1, :3, :3]))
    with pytest.warns(MetricWarning, match="no samples"):
        assert math.isnan(auroc([], []))


def test_nan_and_bad_inputs_raise_naming_the_field() -> None:
    with pytest.raises(ValueError, match="scores"):
        compute_metrics([0, 1, 0], [0.1, float("nan"), 0.2])
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[2, 1, 3] = np.nan
    masks = np.zeros((3, 4, 4))
    masks[1, :2, :2] = 1
    with pytest.raises(ValueError, match=r"maps\[2\]"):
        compute_metrics([0, 1, 0], [0.1, 0.5, 0.2], masks, maps)
    with pytest.raises(ValueError, match="labels"):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="3 entries"):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"masks\[1\].*maps\[1\]"):
        pixel_metrics([np.zeros((4, 4)), np.zeros((4, 5))], [np.zeros((4, 4)), np.zeros((4, 4))])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, np.zeros((3, 4, 4)), fpr_limit=0.0)


def test_input_forms_lists_tensors_and_mixed_sizes() -> None:
    import torch

    rng = np.random.default_rng(9)
    masks, maps = blob_data(rng, n=4)
    ref = pixel_metrics(masks, maps)
    as_tensors = pixel_metrics(torch.from_numpy(masks[:, None]), torch.from_numpy(maps[:, None]))
    as_lists = pixel_metrics(list(masks.astype(bool)), [m.astype(np.float64) for m in maps])
    for k in ref:
        assert as_tensors[k] == pytest.approx(ref[k])
        assert as_lists[k] == pytest.approx(ref[k])
    # images of different sizes are pooled pixel by pixel
    m2, s2 = blob_data(rng, n=2, h=9, w=11)
    mixed_masks = list(masks) + list(m2)
    mixed_maps = list(maps) + list(s2)
    y = np.concatenate([m.ravel() for m in mixed_masks])
    s = np.concatenate([m.ravel() for m in mixed_maps])
    assert pixel_auroc(mixed_masks, mixed_maps) == pytest.approx(roc_auc_score(y, s))
    # label -1 images are skipped at the pixel level too
    labels = np.array([0, 1, -1, 1])
    keep = labels != -1
    assert pixel_metrics(masks, maps, labels=labels)["pixel_aupro"] == pytest.approx(
        reference_aupro(masks[keep], maps[keep], 0.3), abs=1e-10
    )


def test_metrics_by_category_rows_and_mean() -> None:
    rng = np.random.default_rng(4)
    ma, sa = blob_data(rng, n=6)
    mb, sb = blob_data(rng, n=6)
    masks = np.concatenate([ma, mb])
    maps = np.concatenate([sa, sb])
    labels = (masks.reshape(12, -1).max(1) > 0).astype(int)
    labels[0], labels[6] = 0, 0
    masks[0], masks[6] = 0, 0
    scores = rng.random(12) + labels * 0.3
    cats = ["tile"] * 6 + ["wood"] * 6
    table = metrics_by_category(cats, labels, scores, masks, maps)
    assert list(table) == ["tile", "wood", "mean"]
    for c, sl in (("tile", slice(0, 6)), ("wood", slice(6, 12))):
        assert table[c] == pytest.approx(compute_metrics(labels[sl], scores[sl], masks[sl], maps[sl]))
    for k in METRIC_KEYS:
        assert table["mean"][k] == pytest.approx((table["tile"][k] + table["wood"][k]) / 2)
    # a category with one class contributes NaN and is left out of the mean
    labels2 = labels.copy()
    labels2[6:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        t2 = metrics_by_category(cats, labels2, scores, None, None)
    assert math.isnan(t2["wood"]["image_auroc"])
    assert t2["mean"]["image_auroc"] == pytest.approx(t2["tile"]["image_auroc"])
    assert math.isnan(t2["mean"]["pixel_aupro"])
