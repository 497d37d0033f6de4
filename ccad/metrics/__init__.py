"""Evaluation metrics (CCAD paper Sec. 4.3; anomalib names).

Image level: AUROC, AP (AUPRC), F1-max. Pixel level, pooled over all test pixels of a
category: AUROC, AP, F1-max and AUPRO (per-region overlap integrated up to FPR 0.3,
normalised). Exact with ties (equal to scikit-learn), NaN with a :class:`MetricWarning`
when a metric is undefined, ``ValueError`` naming the field for NaN scores.
"""

from ._core import MetricWarning
from .aupro import aupro, label_regions
from .image import (
    auroc,
    average_precision,
    f1max_threshold,
    image_metrics,
    pr_points,
    roc_points,
)
from .pixel import (
    METRIC_KEYS,
    compute_metrics,
    metrics_by_category,
    pixel_ap,
    pixel_auroc,
    pixel_f1max,
    pixel_metrics,
)

__all__ = [
    "METRIC_KEYS",
    "MetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "compute_metrics",
    "f1max_threshold",
    "image_metrics",
    "label_regions",
    "metrics_by_category",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1max",
    "pixel_metrics",
    "pr_points",
    "roc_points",
]
