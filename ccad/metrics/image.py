"""Image-level (class-level) metrics: AUROC, AP (AUPRC), F1-max, and curve points.

The CCAD paper (Sec. 4.3) evaluates class-level detection with AUROC, F1-score-max and
Average Precision, "same as the prior works" (anomalib's ``image_AUROC``, ``image_AP``,
``image_F1Max``). Equations are given in :class:`ccad.metrics._core.CurveSweep`; results
equal ``sklearn.metrics.roc_auc_score`` / ``average_precision_score`` and the maximum F1 over
``precision_recall_curve``, ties included.

Labels: 0 good, 1 anomalous, -1 unknown (samples with label -1 are left out).
Scores: higher means more anomalous; NaN raises ``ValueError`` naming the field.
Undefined metrics (only one class present) return NaN with a :class:`MetricWarning`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._core import CurveSweep, as_numpy, check_no_nan

__all__ = [
    "auroc",
    "average_precision",
    "f1max_threshold",
    "image_metrics",
    "roc_points",
    "pr_points",
    "prepare_labels_scores",
]


def prepare_labels_scores(
    labels: Any, scores: Any, labels_field: str = "labels", scores_field: str = "scores"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(labels int8, scores float64)`` with unknown (-1) samples dropped.

    Raises ``ValueError`` naming the field for wrong shapes, label values outside
    {0, 1, -1}, or NaN scores.
    """
    y = as_numpy(labels, labels_field)
    s = as_numpy(scores, scores_field)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{labels_field} must be 1-D, got shape {y.shape}")
    if s.ndim != 1:
        raise ValueError(f"{scores_field} must be 1-D, got shape {s.shape}")
    if y.shape[0] != s.shape[0]:
        raise ValueError(
            f"{labels_field} has {y.shape[0]} entries but {scores_field} has {s.shape[0]}"
        )
    if y.dtype.kind == "f":
        check_no_nan(y, labels_field)
    if y.dtype.kind not in "biuf":
        raise ValueError(f"{labels_field} must be numeric (0 good, 1 anomalous, -1 unknown)")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"{scores_field} must be numeric, got dtype {s.dtype}")
    bad = ~np.isin(y, (0, 1, -1))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{labels_field}[{i}] = {y[i]!r}; labels must be 0 (good), 1 (anomalous) or -1 (unknown)"
        )
    s = s.astype(np.float64, copy=False)
    check_no_nan(s, scores_field)
    keep = y != -1
    return y[keep].astype(np.int8), s[keep]


def _sweep(y: np.ndarray, s: np.ndarray, record: bool = False) -> CurveSweep:
    order = np.argsort(s, kind="stable")[::-1]
    vals = s[order]
    regions = y[order].astype(np.int64)
    n_pos = int(y.sum())
    sw = CurveSweep(n_pos, y.size - n_pos, record=record)
    sw.feed(vals, regions, None)
    return sw


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve (trapezoid rule over distinct thresholds; CCAD Sec. 4.3)."""
    y, s = prepare_labels_scores(labels, scores)
    return _sweep(y, s).auroc("image_auroc")


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision AP = sum_k (R_k - R_{k-1}) P_k (CCAD Sec. 4.3; sklearn's definition)."""
    y, s = prepare_labels_scores(labels, scores)
    return _sweep(y, s).ap("image_ap")


def f1max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """Return ``(F1-max, threshold)``: the best F1 = 2PR/(P+R) over all thresholds.

    Predictions are ``score >= threshold``. On ties of the maximum the lowest such threshold
    is returned (as anomalib's F1Max / ``argmax`` over sklearn's ascending thresholds).
    ``(nan, nan)`` with a warning when only one class is present.
    """
    y, s = prepare_labels_scores(labels, scores)
    return _sweep(y, s).f1max("image_f1max")


def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """``{"image_auroc", "image_ap", "image_f1max"}`` from one sort of the scores."""
    y, s = prepare_labels_scores(labels, scores)
    sw = _sweep(y, s)
    return {
        "image_auroc": sw.auroc("image_auroc"),
        "image_ap": sw.ap("image_ap"),
        "image_f1max": sw.f1max("image_f1max")[0],
    }


def _downsample(n: int, max_points: int | None) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def roc_points(
    labels: Any, scores: Any, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points ``(fpr, tpr, thresholds)`` for plotting.

    Like ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``: thresholds are the
    distinct scores in descending order, preceded by ``inf`` at (0, 0). ``max_points``
    evenly subsamples long curves (first and last points kept). When a class is missing,
    the rate of the missing class is NaN (no exception).
    """
    y, s = prepare_labels_scores(labels, scores)
    sw = _sweep(y, s, record=True)
    tp, fp, thr = sw.points()
    tp = np.concatenate([[0], tp])
    fp = np.concatenate([[0], fp])
    thr = np.concatenate([[math.inf], thr])
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / sw.P if sw.P else np.full(tp.shape, math.nan)
        fpr = fp / sw.N if sw.N else np.full(fp.shape, math.nan)
    keep = _downsample(tp.size, max_points)
    return fpr[keep], tpr[keep], thr[keep]


def pr_points(
    labels: Any, scores: Any, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve points ``(recall, precision, thresholds)`` for plotting.

    Note the order: x then y, as :func:`roc_points` returns ``(fpr, tpr, ...)`` (this differs
    from ``sklearn.metrics.precision_recall_curve``, which returns precision first).
    Ordered by increasing recall: the first point is (recall 0, precision 1) at threshold
    ``inf``, then one point per distinct score in descending order (precision =
    TP / (TP + FP), recall = TP / P). Recall is NaN when there are no anomalous samples.
    """
    y, s = prepare_labels_scores(labels, scores)
    sw = _sweep(y, s, record=True)
    tp, fp, thr = sw.points()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.concatenate([[1.0], tp / (tp + fp)])
        recall = (
            np.concatenate([[0.0], tp / sw.P]) if sw.P else np.full(tp.size + 1, math.nan)
        )
    thr = np.concatenate([[math.inf], thr])
    keep = _downsample(thr.size, max_points)
    return recall[keep], precision[keep], thr[keep]
