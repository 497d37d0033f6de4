"""Run a detector over a labelled dataset and report the metrics everyone reports.

Per category (and the mean over categories): image AUROC / AP / F1-max, pixel AUROC / AP /
F1-max and pixel AUPRO (FPR <= 0.3), with ROC and PR curves for plots and per-image records
(for browsing the worst false negatives and false positives).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .metrics import METRIC_KEYS  # the one list (ccad.metrics.pixel); re-exported here for the app and benchmarks


@dataclass
class EvalReport:
    per_category: dict[str, dict[str, float]]
    records: list[dict[str, Any]]
    curves: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean(self) -> dict[str, float]:
        return self.per_category.get("mean", {})

    def table(self) -> str:
        """A fixed-width text table, one row per category and the mean."""
        head = f"{'category':<16}" + "".join(f"{k:>13}" for k in METRIC_KEYS)
        lines = [head, "-" * len(head)]
        for cat, row in self.per_category.items():
            lines.append(f"{cat:<16}" + "".join(f"{_fmt(row.get(k)):>13}" for k in METRIC_KEYS))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {"per_category": {c: {k: clean(v) for k, v in r.items()} for c, r in self.per_category.items()},
                "records": self.records, "errors": [list(e) for e in self.errors], "seconds": self.seconds}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, default=float))

    def worst(self, kind: str, n: int = 8) -> list[dict[str, Any]]:
        """The ``n`` worst false negatives (``"fn"``: anomalous, lowest scores) or false positives
        (``"fp"``: good, highest scores) at the detector's threshold."""
        if kind == "fn":
            rows = [r for r in self.records if r["label"] == 1 and not r["is_anomalous"]]
            return sorted(rows, key=lambda r: r["score"])[:n]
        if kind == "fp":
            rows = [r for r in self.records if r["label"] == 0 and r["is_anomalous"]]
            return sorted(rows, key=lambda r: -r["score"])[:n]
        raise ValueError(f"kind must be 'fn' or 'fp', got {kind!r}")


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def evaluate(detector: Any, samples: Sequence[Any], batch_size: int = 8,
             progress: Optional[Callable[[int, int], None]] = None) -> EvalReport:
    """Score every sample, then compute the metrics per category and their mean.

    Maps are compared with the masks at the model's resolution (``image_size`` squared), as the
    papers do; unreadable files are skipped and listed in ``report.errors``.
    """
    import time

    from .data.datasets import iter_batches
    from .metrics import metrics_by_category, pr_points, roc_points

    t0 = time.perf_counter()
    errors: list[tuple[str, str]] = []
    scores, maps, labels, masks, metas = [], [], [], [], []
    done = 0
    for batch in iter_batches(list(samples), detector.image_size, batch_size, on_error="skip", errors=errors):
        s, m = detector.score_batches([batch])
        scores.append(s)
        maps.append(m)
        labels.append(np.asarray(batch["label"]).reshape(-1))
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
        metas.extend({"path": p, "category": c, "defect_type": d}
                     for p, c, d in zip(batch["path"], batch["category"], batch["defect_type"]))
        done += len(s)
        if progress is not None:
            progress(done, len(samples))
    if not scores:
        raise ValueError("no readable image in the evaluation set" + (f" (first error: {errors[0]})" if errors else ""))
    scores_a, maps_a = np.concatenate(scores), np.concatenate(maps)
    labels_a, masks_a = np.concatenate(labels).astype(int), np.concatenate(masks)
    thr = detector.threshold
    records = [{**meta, "label": int(y), "score": float(s), "is_anomalous": bool(np.isfinite(thr) and s > thr)}
               for meta, y, s in zip(metas, labels_a, scores_a)]
    cats = [m["category"] or "all" for m in metas]
    has_masks = bool(masks_a.any())
    per = metrics_by_category(cats, labels_a, scores_a, masks_a if has_masks else None,
                              maps_a if has_masks else None)
    curves = {}
    if len(set(labels_a.tolist())) == 2:
        curves = {"roc": roc_points(labels_a, scores_a), "pr": pr_points(labels_a, scores_a)}
    return EvalReport(per, records, curves, errors, seconds=time.perf_counter() - t0)
