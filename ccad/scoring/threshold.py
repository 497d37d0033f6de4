"""Threshold calibration: the operating point, with the numbers it rests on.

The good-score distribution of the threshold part of the held-out good images is stored with
the model; the threshold is the (1 - target FPR) quantile of those scores (policy ``fpr``),
mean + k sigma (``sigma``), or the highest threshold whose *estimated* miss rate on synthetic
anomalies pasted into those images stays at or below a target (``miss``; the synthetic anomalies
are the fusion fit's recipe, :mod:`ccad.data.anomaly_synth`: a proxy for real defects, which may
be easier or harder). Every calibration reports both rates and how many images each rests on:
with ``n`` held-out good images the smallest false-alarm rate that can be told from zero is
``1 / n``; a target below it puts the threshold at the largest held-out score. A threshold may
also come from labelled images (:mod:`ccad.scoring.operating_point`, policy ``labelled``) or be
typed in (``manual``). The threshold stays a plain, editable parameter of a saved model (unlike
anomalib#3033).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

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
    # scores of synthetic-anomaly copies of the same good images (the miss-rate proxy); empty on older models
    synthetic_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    target_miss: Optional[float] = None
    source: Optional[dict[str, Any]] = None  # where a labelled / manual operating point came from

    @classmethod
    def fit(cls, scores: Any, method: str = "fpr", fpr: float = 0.01, sigma: float = 3.0,
            synthetic: Any = None, miss: float = 0.05) -> "Calibration":
        """Calibrate on good scores: ``fpr`` -> (1 - fpr) quantile; ``sigma`` -> mean + sigma * std;
        ``miss`` -> the highest threshold at which at most ``miss`` of the ``synthetic`` scores
        (synthetic anomalies in the same good images) are at or below it (missed)."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        syn = np.asarray([] if synthetic is None else synthetic, dtype=np.float64).ravel()
        if s.size == 0:
            raise ValueError("calibration needs at least one good-image score (the held-out good slice is empty)")
        if not np.all(np.isfinite(s)):
            raise ValueError("calibration scores contain NaN or inf")
        if not np.all(np.isfinite(syn)):
            raise ValueError("calibration: synthetic-anomaly scores contain NaN or inf")
        extra = {"synthetic_scores": syn.astype(np.float32)}
        if method == "miss":
            if not 0.0 <= miss < 1.0:
                raise ValueError(f"target miss rate must be in [0, 1), got {miss}")
            if syn.size == 0:
                raise ValueError("calibration policy 'miss' needs synthetic-anomaly scores (scoring.miss_estimate "
                                 "must be on)")
            allowed = int(np.floor(miss * syn.size + 1e-9))  # synthetic anomalies that may be missed
            srt = np.sort(syn.astype(np.float32))  # the stored precision, so the stored scores reproduce it
            # anomalous is score > threshold: the (allowed+1)-th smallest must lie above it
            thr = float(np.nextafter(srt[allowed], np.float32(-np.inf)))
            return cls(good_scores=s.astype(np.float32), threshold=thr, method="miss", target_fpr=fpr,
                       sigma_k=sigma, target_miss=float(miss), **extra)
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
        return cls(good_scores=s.astype(np.float32), threshold=thr, method=method, target_fpr=fpr, sigma_k=sigma,
                   **extra)

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

    def estimated_miss_rate(self, threshold: float | None = None) -> float:
        """The share of synthetic-anomaly copies scoring at or below ``threshold`` (NaN without
        any): a proxy for the miss rate on real defects, not a measurement of it."""
        t = self.threshold if threshold is None else threshold
        n = self.synthetic_scores.size
        return float(np.sum(self.synthetic_scores.astype(np.float64) <= float(t))) / n if n else float("nan")

    def report(self) -> dict[str, Any]:
        """The operating point in words and numbers (the model card's ``operating_point``)."""
        n, n_syn = int(self.good_scores.size), int(self.synthetic_scores.size)
        target = {"fpr": {"target_fpr": self.target_fpr}, "sigma": {"sigma_k": self.sigma_k},
                  "miss": {"target_miss": self.target_miss}}.get(self.method, {})
        out: dict[str, Any] = {
            "policy": self.method, **target,
            "false_alarm_rate": None if not n else round(self.false_alarm_rate(), 6),
            "false_alarm_rate_rests_on": f"{n} held-out good images (the threshold part)",
            "n_good": n,
            "estimated_miss_rate": None if not n_syn else round(self.estimated_miss_rate(), 6),
            "n_synthetic": n_syn,
        }
        if n_syn:
            out["miss_rate_note"] = ("a proxy: synthetic anomalies (Perlin-shaped patches of foreign texture) pasted "
                                     "into the held-out good images; real defects may be easier or harder to catch")
        if n and self.method == "fpr" and self.target_fpr < 1.0 / n:
            out["resolution_note"] = (f"with {n} held-out good images the smallest false-alarm rate that can be "
                                      f"measured is 1/{n} = {1.0 / n:.3g}: a target of {self.target_fpr:g} puts the "
                                      f"threshold at the largest held-out good score")
        if self.source:
            out["source"] = dict(self.source)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {"good_scores": [float(v) for v in self.good_scores], "threshold": float(self.threshold),
             "method": self.method, "target_fpr": self.target_fpr, "sigma_k": self.sigma_k}
        if self.synthetic_scores.size:
            d["synthetic_scores"] = [float(v) for v in self.synthetic_scores]
        if self.target_miss is not None:
            d["target_miss"] = float(self.target_miss)
        if self.source:
            d["source"] = dict(self.source)
        if self.domain is not None:
            d["domain"] = self.domain.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(good_scores=np.asarray(d.get("good_scores", []), np.float32),
                   threshold=float(d.get("threshold", float("nan"))), method=d.get("method", "fpr"),
                   target_fpr=float(d.get("target_fpr", 0.01)), sigma_k=float(d.get("sigma_k", 3.0)),
                   domain=DomainStats.from_dict(d.get("domain")),
                   synthetic_scores=np.asarray(d.get("synthetic_scores", []), np.float32),
                   target_miss=None if d.get("target_miss") is None else float(d["target_miss"]),
                   source=d.get("source"))


def split_held_out(held_out: Sequence[Any], selection_fraction: float = 0.5,
                   seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Split the held-out good images into a *selection* part (settings are chosen on it) and a
    *threshold* part (the threshold is set on it), deterministically and stratified by category
    (``sample.category``): a category with ``n >= 2`` held-out images gives ``round(n * fraction)``
    of them, at least 1 and at most ``n - 1``, to selection; the categories with a single held-out
    image are pooled and split the same way (one alone goes to the threshold part). Returns
    ``(selection, threshold)``, each in the input's order."""
    if not 0.0 < float(selection_fraction) < 1.0:
        raise ValueError(f"selection_fraction must be in (0, 1), got {selection_fraction}")
    items = list(held_out)
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(items):
        by_cat.setdefault(getattr(s, "category", "") or "", []).append(i)
    rng = np.random.default_rng(int(seed) + 1)
    chosen: set[int] = set()
    groups = [by_cat[c] for c in sorted(by_cat) if len(by_cat[c]) >= 2]
    singles = [by_cat[c][0] for c in sorted(by_cat) if len(by_cat[c]) == 1]
    for idx in groups + ([singles] if len(singles) >= 2 else []):
        k = min(max(int(round(len(idx) * float(selection_fraction))), 1), len(idx) - 1)
        chosen.update(idx[j] for j in rng.permutation(len(idx))[:k])
    return ([s for i, s in enumerate(items) if i in chosen], [s for i, s in enumerate(items) if i not in chosen])


def check_held_out_split(selection: Sequence[Any], threshold: Sequence[Any], chosen: Sequence[str],
                         min_selection: int = 1, min_threshold: int = 1, where: Any = None) -> None:
    """Refuse held-out good images too few to give both parts their minimum (``ValueError``
    naming the numbers and what would be chosen on the selection part)."""
    n_sel, n_thr = len(selection), len(threshold)
    if n_sel >= int(min_selection) and n_thr >= int(min_threshold):
        return
    n = n_sel + n_thr
    src = f"{where}: " if where is not None else ""
    raise ValueError(
        f"{src}{n} held-out good image{'s' if n != 1 else ''}: too few to split into a selection part (which "
        f"chooses {', '.join(chosen)}) and a separate threshold part: at least {int(min_selection)} + "
        f"{int(min_threshold)} are needed (scoring.min_selection_images / scoring.min_threshold_images), the split "
        f"gave {n_sel} + {n_thr}. Hold out more good images (a larger calibration_fraction, or more good images "
        f"per category)")
