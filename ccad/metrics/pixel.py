"""Pixel-level metrics pooled over all test pixels of a category, and ``compute_metrics``.

CCAD paper Sec. 4.3: pixel-level localisation is evaluated with AUROC, F1-score-max and
Average Precision over all pixels of all test images of a category (pooled, not averaged
per image), plus AUPRO (PRO of Bergmann et al., used by D3AD Sec. 4) up to FPR 0.3.
All four come from one sort of the pooled pixels (see :mod:`ccad.metrics.aupro`).
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Sequence

import numpy as np

from ._core import as_numpy
from .aupro import pixel_sweep
from .image import image_metrics

__all__ = [
    "METRIC_KEYS",
    "compute_metrics",
    "metrics_by_category",
    "pixel_metrics",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
]

METRIC_KEYS: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pixel_aupro",
)
PIXEL_KEYS = METRIC_KEYS[3:]


def pixel_metrics(
    masks: Any,
    maps: Any,
    fpr_limit: float = 0.3,
    labels: Any | None = None,
    connectivity: int = 8,
) -> dict[str, float]:
    """Pooled ``pixel_auroc``, ``pixel_ap``, ``pixel_f1max`` and ``pixel_aupro``.

    ``masks``/``maps``: ``N x H x W`` (or ``N x 1 x H x W``) arrays/tensors, or lists of
    per-image ``H x W`` arrays. Images whose ``labels`` entry is -1 are skipped.
    """
    return pixel_sweep(masks, maps, fpr_limit, labels, True, connectivity).metrics()


def pixel_auroc(masks: Any, maps: Any, labels: Any | None = None) -> float:
    """Pooled pixel AUROC (no connected components are computed)."""
    return pixel_sweep(masks, maps, 0.3, labels, regions=False).sweep.auroc("pixel_auroc")


def pixel_ap(masks: Any, maps: Any, labels: Any | None = None) -> float:
    """Pooled pixel average precision (AUPRC)."""
    return pixel_sweep(masks, maps, 0.3, labels, regions=False).sweep.ap("pixel_ap")


def pixel_f1max(masks: Any, maps: Any, labels: Any | None = None) -> tuple[float, float]:
    """Pooled pixel ``(F1-max, threshold)``; predictions are ``map >= threshold``."""
    return pixel_sweep(masks, maps, 0.3, labels, regions=False).sweep.f1max("pixel_f1max")


def compute_metrics(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All metrics everyone reports (anomalib names), exactly the keys of :data:`METRIC_KEYS`.

    Image level from ``labels`` (0 good, 1 anomalous, -1 unknown: left out) and ``scores``;
    pixel level pooled over ``masks``/``maps`` (``N x H x W`` or lists, same ``N`` as
    ``labels``; images with label -1 left out). Pixel keys are NaN when ``masks`` is None.
    Undefined metrics are NaN with a :class:`ccad.metrics.MetricWarning` stating why; NaN in
    ``scores`` or ``maps`` raises ``ValueError`` naming the field.
    """
    out: dict[str, float] = dict(image_metrics(labels, scores))
    if masks is None:
        out.update({k: math.nan for k in PIXEL_KEYS})
    else:
        if maps is None:
            raise ValueError("maps is None but masks were given; pass the anomaly maps")
        n = len(as_numpy(labels, "labels").reshape(-1))
        n_masks = len(masks)
        if n_masks != n:
            raise ValueError(f"masks has {n_masks} images but labels has {n} entries")
        out.update(pixel_metrics(masks, maps, fpr_limit, labels))
    return {k: out[k] for k in METRIC_KEYS}


def _subset(x: Any, idx: np.ndarray) -> Any:
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [x[int(i)] for i in idx]
    return as_numpy(x, "masks/maps")[idx]


def metrics_by_category(
    categories: Sequence[Hashable],
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    fpr_limit: float = 0.3,
) -> dict[Hashable, dict[str, float]]:
    """:func:`compute_metrics` per category (first-appearance order) plus a ``"mean"`` row.

    The mean of each key is taken over the categories where that metric is defined
    (finite); it is NaN if none is. A category literally named ``"mean"`` is rejected.
    """
    cats = list(categories)
    y = as_numpy(labels, "labels").reshape(-1)
    s = as_numpy(scores, "scores").reshape(-1)
    if len(cats) != y.shape[0]:
        raise ValueError(f"categories has {len(cats)} entries but labels has {y.shape[0]}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores has {s.shape[0]} entries but labels has {y.shape[0]}")
    if "mean" in cats:
        raise ValueError('categories: "mean" is reserved for the mean row')
    order: list[Hashable] = list(dict.fromkeys(cats))
    cat_arr = np.empty(len(cats), dtype=object)
    cat_arr[:] = cats
    result: dict[Hashable, dict[str, float]] = {}
    for c in order:
        idx = np.flatnonzero(cat_arr == c)
        result[c] = compute_metrics(
            y[idx], s[idx], _subset(masks, idx), _subset(maps, idx), fpr_limit
        )
    mean: dict[str, float] = {}
    for k in METRIC_KEYS:
        vals = [result[c][k] for c in order if math.isfinite(result[c][k])]
        mean[k] = float(np.mean(vals)) if vals else math.nan
    result["mean"] = mean
    return result
