"""An operating point chosen from labelled images (issue 21.1): the engineer who has good and
defective images with labels picks the threshold by what matters on the line.

Policies (``parse_policy``): ``f1`` (the threshold of the highest F1 on the labelled images),
``recall=R`` (the highest threshold that still catches at least a share R of the defective
images: the fewest false alarms at that recall) and ``fpr=F`` (the lowest threshold whose
false-alarm rate on the labelled good images is at most F: the most defects caught within that
budget). An image is anomalous when its score is strictly above the threshold, as everywhere
in ccad. Benchmarks never use this: their thresholds stay good-only.
"""
from __future__ import annotations

from typing import Any

import numpy as np

POLICIES = ("f1", "recall=R", "fpr=F")


def parse_policy(text: str) -> tuple[str, float | None]:
    """``"f1"`` -> ``("f1", None)``; ``"recall=0.95"`` -> ``("recall", 0.95)``; ``"fpr=0.02"`` ->
    ``("fpr", 0.02)``. Anything else is a ``ValueError`` naming the accepted forms."""
    t = str(text).strip().lower()
    if t == "f1":
        return "f1", None
    name, _, value = t.partition("=")
    if name in ("recall", "fpr") and value:
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        ok = (0.0 < v <= 1.0) if name == "recall" else (0.0 <= v < 1.0)  # NaN fails both
        if ok:
            return name, v
        raise ValueError(f"policy {text!r}: {name} must be a number in "
                         f"{'(0, 1]' if name == 'recall' else '[0, 1)'}, got {value!r}")
    raise ValueError(f"policy {text!r}: expected one of f1, recall=R (e.g. recall=0.95), fpr=F (e.g. fpr=0.02)")


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts and rates of the verdicts ``score > threshold`` against ``labels`` (0 good, 1 anomalous)."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, np.float64)
    pred = s > threshold
    tp, fp = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0)))
    n_bad, n_good = int(np.sum(y == 1)), int(np.sum(y == 0))
    recall = tp / n_bad if n_bad else float("nan")
    fpr = fp / n_good if n_good else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + (n_bad - tp)) if n_bad else float("nan")
    return {"threshold": float(threshold), "recall": recall, "false_alarm_rate": fpr, "precision": precision,
            "f1": f1, "caught": tp, "false_alarms": fp, "n_anomalous": n_bad, "n_good": n_good}


def choose_threshold(labels: Any, scores: Any, policy: str) -> dict[str, Any]:
    """The threshold a ``policy`` (:func:`parse_policy`) picks on labelled scores, with the rates
    it gives there (:func:`rates_at`). Needs at least one good and one anomalous image."""
    name, target = parse_policy(policy)
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, np.float64).ravel()
    keep = (y == 0) | (y == 1)
    y, s = y[keep], s[keep]
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{int(np.sum(~np.isfinite(s)))} labelled image(s) have a non-finite score")
    n_good, n_bad = int(np.sum(y == 0)), int(np.sum(y == 1))
    if n_good == 0 or n_bad == 0:
        raise ValueError(f"an operating point from labelled images needs good and defective images; got {n_good} "
                         f"good and {n_bad} defective")
    # every distinct verdict split: a threshold at each distinct score, and one below all of them
    uniq = np.unique(s)
    candidates = np.r_[np.nextafter(uniq[0], -np.inf), uniq]
    rows = [rates_at(y, s, float(t)) for t in candidates]
    if name == "f1":
        best = max(rows, key=lambda r: (r["f1"], r["threshold"]))
    elif name == "recall":
        ok = [r for r in rows if r["recall"] >= float(target) - 1e-12]
        best = max(ok, key=lambda r: r["threshold"])  # the threshold below every score catches all: never empty
    else:
        ok = [r for r in rows if r["false_alarm_rate"] <= float(target) + 1e-12]
        best = min(ok, key=lambda r: r["threshold"])  # the largest score as threshold: 0 false alarms, never empty
    # the chosen split's threshold sits at a score; move it halfway to the next distinct score: the
    # same verdicts on these images, but an image re-scored a float rounding apart (another batch,
    # the export runtime) no longer flips (it sat exactly on the threshold)
    t = float(best["threshold"])
    above = uniq[uniq > t]
    if above.size:
        t_mid = 0.5 * (t + float(above[0]))
    else:
        spacing = float(np.median(np.diff(uniq))) if uniq.size > 1 else abs(t) * 1e-3
        t_mid = t + 0.5 * max(spacing, abs(t) * 1e-6, 1e-9)
    mid = rates_at(y, s, t_mid)
    assert {k: mid[k] for k in ("recall", "false_alarm_rate")} == {k: best[k] for k in ("recall", "false_alarm_rate")}
    return {**mid, "policy": policy.strip().lower()}
