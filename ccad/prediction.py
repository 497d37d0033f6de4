"""The result of one inspection (:class:`Prediction`) and the one count of verdicts every summary
prints (:func:`count_statuses`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .scoring.heatmap import display_range, render_heatmap, with_colorbar
from .scoring.verdict import STATUSES, status_of

@dataclass
class Prediction:
    """The result of one inspection. Images are at the input's original size.

    :attr:`status` is the one verdict every summary counts (CLI, app, ``predict_many`` callers):
    ``"good"`` only for a finite score at or below a finite (calibrated) threshold; ``"anomalous"``
    above it; ``"uncalibrated"`` when the model has no threshold; ``"error"`` when the score or map
    is NaN / inf (:attr:`error` says why and names the model's files). Nothing but ``"good"`` is
    good. :attr:`out_of_domain` says when the image is unlike the model's good training images
    (its :attr:`domain_distance` above :attr:`domain_limit`, see :mod:`ccad.scoring.domain`); None
    when the model stores no such statistic (older models, methods without a memory)."""

    image: np.ndarray  # H x W x 3 float32 in [0, 1]
    reconstruction: Optional[np.ndarray]  # H x W x 3 float32, None for feature-only detectors
    anomaly_map: np.ndarray  # H x W float32
    score: float
    threshold: float
    seconds: float
    path: Optional[str] = None
    map_floor: float = 0.0  # map value of a typical good pixel (for display scaling)
    error: Optional[str] = None  # why this result is not a verdict (non-finite score or map)
    domain_distance: Optional[float] = None  # median patch distance to the good memory (ccad.scoring.domain)
    domain_limit: Optional[float] = None  # the good-only limit above which the image is out of domain

    @property
    def status(self) -> str:
        """``"good"``, ``"anomalous"``, ``"uncalibrated"`` or ``"error"`` (see the class docstring)."""
        return status_of(self.score, self.threshold, self.error)

    @property
    def is_anomalous(self) -> bool:
        """True only for the status ``"anomalous"`` (an error or an uncalibrated model is neither)."""
        return self.status == "anomalous"

    @property
    def is_good(self) -> bool:
        """True only for the status ``"good"``: a finite score at or below a calibrated threshold."""
        return self.status == "good"

    @property
    def verdict(self) -> str:
        """The same as :attr:`status`."""
        return self.status

    @property
    def out_of_domain(self) -> Optional[bool]:
        """True when the image's :attr:`domain_distance` exceeds :attr:`domain_limit` (it is unlike
        the good images the model was calibrated on); None when either is unknown."""
        if self.domain_distance is None or self.domain_limit is None:
            return None
        if not math.isfinite(float(self.domain_distance)):
            return True
        return bool(self.domain_distance > self.domain_limit)

    @property
    def mask(self) -> np.ndarray:
        """Pixels whose map value exceeds the threshold (H x W bool); empty unless the status is a verdict."""
        if self.status not in ("good", "anomalous"):
            return np.zeros(self.anomaly_map.shape, bool)
        return self.anomaly_map > self.threshold

    def with_threshold(self, threshold: float) -> "Prediction":
        """The same result re-labelled at another threshold, without re-running the model."""
        return replace(self, threshold=float(threshold))

    def normalized_map(self) -> np.ndarray:
        """Map scaled so a typical good pixel is 0 and the threshold is 1 (comparable across images)."""
        amap = np.nan_to_num(self.anomaly_map, nan=0.0, posinf=0.0, neginf=0.0)
        hi = self.threshold if np.isfinite(self.threshold) else float(amap.max())
        lo = min(self.map_floor, hi - 1e-6)
        return np.clip((amap - lo) / max(hi - lo, 1e-6), 0.0, 1.0)

    def display_range(self) -> tuple[float, float]:
        """The model's colour range in score units (:func:`ccad.scoring.heatmap.display_range`): the
        same for every image of one model at one threshold, with the threshold at mid-scale."""
        finite = self.anomaly_map[np.isfinite(self.anomaly_map)]
        return display_range(self.map_floor, self.threshold, float(finite.max()) if finite.size else 1.0)

    def heatmap(self, colorbar: bool = False) -> np.ndarray:
        """H x W x 3 uint8 colour-mapped anomaly map on the model's fixed scale (blue-green below the
        threshold, yellow-red above); ``colorbar``: the scale in score units, the threshold marked,
        stacked below (the app shows it; files written for a line stay pixel-aligned without it)."""
        lo, hi = self.display_range()
        amap = np.nan_to_num(self.anomaly_map, nan=lo, posinf=hi, neginf=lo)
        heat = render_heatmap(amap, vmin=lo, vmax=hi)
        return with_colorbar(heat, lo, hi, self.threshold) if colorbar else heat

    def overlay(self, alpha: float = 0.5, colorbar: bool = False, heat: Optional[np.ndarray] = None) -> np.ndarray:
        """H x W x 3 uint8: the heatmap blended over the image; for an anomalous verdict the pixels
        above the threshold are outlined in white (a good image's map is never outlined as a defect).
        ``heat``: this prediction's :meth:`heatmap` when the caller has it already (not drawn twice)."""
        import cv2

        base = (np.clip(self.image, 0, 1) * 255).astype(np.float32)
        heat = self.heatmap() if heat is None else heat
        out = (1 - alpha) * base + alpha * heat.astype(np.float32)
        out = np.clip(out, 0, 255).astype(np.uint8)
        m = self.mask.astype(np.uint8) if self.status == "anomalous" else np.zeros(self.anomaly_map.shape, np.uint8)
        if m.any():
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, round(min(m.shape) / 200)))
        if colorbar:
            lo, hi = self.display_range()
            return with_colorbar(out, lo, hi, self.threshold)
        return out

    def to_record(self) -> dict[str, Any]:
        """One row: path, score, threshold, status (also as ``verdict``), error, out_of_domain,
        domain_distance, domain_limit, seconds."""
        return {"path": self.path, "score": self.score, "threshold": self.threshold, "status": self.status,
                "verdict": self.verdict, "error": self.error, "out_of_domain": self.out_of_domain,
                "domain_distance": self.domain_distance, "domain_limit": self.domain_limit,
                "seconds": self.seconds}


def count_statuses(predictions: Iterable[Prediction], errors: Sequence[Any] = ()) -> dict[str, int]:
    """How many predictions have each :attr:`Prediction.status` (``good`` / ``anomalous`` /
    ``uncalibrated`` / ``error``), plus ``unreadable`` (``len(errors)``, the files
    :meth:`AnomalyDetector.predict_many` could not read), ``out_of_domain`` (flagged, whatever the
    status) and ``total``. The one count every summary (CLI, app) should print: an uncalibrated or
    failed image is never counted as good."""
    counts = dict.fromkeys(STATUSES, 0)
    ood = n = 0
    for p in predictions:
        counts[p.status] += 1
        ood += bool(p.out_of_domain)
        n += 1
    counts["unreadable"] = len(errors)
    counts["out_of_domain"] = ood
    counts["total"] = n + len(errors)
    return counts
