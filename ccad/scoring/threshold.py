"""Threshold calibration from good images only.

The good-score distribution of a held-out slice of the good folder is stored with the model;
the threshold is either the (1 - target FPR) quantile of those scores or mean + k sigma. The
threshold stays a plain, editable parameter of a saved model (unlike anomalib#3033).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .domain import DomainStats


@dataclass
class Calibration:
    good_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    threshold: float = float("nan")
    method: str = "fpr"
    target_fpr: float = 0.01
    sigma_k: float = 3.0
    domain: Optional[DomainStats] = None  # the out-of-domain limit (ccad.scoring.domain); None on older models

    @classmethod
    def fit(cls, scores: Any, method: str = "fpr", fpr: float = 0.01, sigma: float = 3.0) -> "Calibration":
        """Calibrate on good scores: ``fpr`` -> (1 - fpr) quantile; ``sigma`` -> mean + sigma * std."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        if s.size == 0:
            raise ValueError("calibration needs at least one good-image score (the held-out good slice is empty)")
        if not np.all(np.isfinite(s)):
            raise ValueError("calibration scores contain NaN or inf")
        if method == "fpr":
            if not 0.0 <= fpr < 1.0:
                raise ValueError(f"target FPR must be in [0, 1), got {fpr}")
            # 'higher' keeps the empirical false-alarm rate at or below the target.
            thr = float(np.quantile(s, 1.0 - fpr, method="higher"))
            # A score equal to the threshold counts as good (is_anomalous is score > threshold).
        elif method == "sigma":
            thr = float(s.mean() + sigma * s.std())
        else:
            raise ValueError(f"calibration method must be 'fpr' or 'sigma', got {method!r}")
        return cls(good_scores=s.astype(np.float32), threshold=thr, method=method, target_fpr=fpr, sigma_k=sigma)

    def check_finite(self) -> "Calibration":
        """Raise ``ValueError`` unless the threshold and every stored good score are finite numbers
        (a NaN threshold would make every verdict meaningless). Returns self."""
        if not np.isfinite(float(self.threshold)):
            raise ValueError(f"the threshold is {self.threshold} (not a finite number)")
        scores = np.asarray(self.good_scores, np.float64)
        if scores.size and not np.all(np.isfinite(scores)):
            raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} of the {scores.size} good-image scores are "
                             f"NaN or inf")
        if self.domain is not None:
            self.domain.check_finite()
        return self

    def false_alarms(self, threshold: float | None = None) -> int:
        """How many calibration good images score above ``threshold`` (default: the calibrated one)."""
        t = self.threshold if threshold is None else threshold
        return int(np.sum(self.good_scores > t))

    def false_alarm_rate(self, threshold: float | None = None) -> float:
        n = self.good_scores.size
        return self.false_alarms(threshold) / n if n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = {"good_scores": [float(v) for v in self.good_scores], "threshold": float(self.threshold),
             "method": self.method, "target_fpr": self.target_fpr, "sigma_k": self.sigma_k}
        if self.domain is not None:
            d["domain"] = self.domain.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(good_scores=np.asarray(d.get("good_scores", []), np.float32),
                   threshold=float(d.get("threshold", float("nan"))), method=d.get("method", "fpr"),
                   target_fpr=float(d.get("target_fpr", 0.01)), sigma_k=float(d.get("sigma_k", 3.0)),
                   domain=DomainStats.from_dict(d.get("domain")))
