"""Evaluate tab: metrics of a model on a labelled dataset, per category and per defect type, its
curves and its worst cases."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .. import views
from ..batch import to_uint8
from ..engine import ProgressFn
from ..errors import UserError
from .base import ControllerBase

ALL_IMAGES = "all images (pooled)"
EVERY_CATEGORY = "every category (overlaid)"


DEFECT_HEADERS = ["category", "defect type", "images", "detected", "missed", "detection rate", "image_AUROC vs good",
                  "median score"]


def defect_type_rows(records: Sequence[dict[str, Any]], threshold: float) -> tuple[list[str], list[list[Any]]]:
    """One row per (category, defect type) of an evaluation's per-image records: how many images,
    how many the model flags at its ``threshold`` (records' ``is_anomalous``) and misses, and the
    image AUROC of that defect type against the good images of its category
    (:func:`ccad.metrics.auroc`); the good images get a row of their own (false alarms)."""
    from ccad.metrics import auroc

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        cat = str(r.get("category") or "all")
        kind = "good" if int(r["label"]) == 0 else str(r.get("defect_type") or "defect")
        groups.setdefault((cat, kind), []).append(r)
    rows = []
    for (cat, kind), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "good", kv[0][1])):
        scores = np.asarray([float(r["score"]) for r in recs], float)
        flagged = sum(1 for r in recs if r.get("is_anomalous"))
        med = round(float(np.median(scores)), 4) if scores.size else None
        if kind == "good":
            rows.append([cat, "good (false alarms)", len(recs), flagged, None, None, None, med])
            continue
        good = [float(r["score"]) for r in groups.get((cat, "good"), [])]
        auc = None
        if good:
            try:
                auc = round(float(auroc(np.r_[np.zeros(len(good)), np.ones(len(scores))], np.r_[good, scores])), 4)
            except Exception:
                auc = None
        rate = round(flagged / len(recs), 4) if math.isfinite(float(threshold)) else None
        rows.append([cat, kind, len(recs), flagged, len(recs) - flagged, rate, auc, med])
    return DEFECT_HEADERS, rows


class EvaluateMixin(ControllerBase):
    """The Evaluate tab's callbacks."""

    def run_evaluation(self, name: Optional[str], path: str, layout: str = "auto", split: str = "test",
                       progress: ProgressFn = None) -> dict[str, Any]:
        """Evaluate a model on a labelled dataset inside the data root (``ccad.evaluate``)."""
        det = self._detector(name)
        root = self._in_root(path, kind="any")
        try:
            samples = self.engine.load_dataset(str(root), split=split, layout=layout)
        except Exception as exc:
            raise UserError(f"{path}: cannot read it as a dataset (layout {layout!r}): {exc}") from None
        if not samples:
            raise UserError(f"{path}: no {split} images found (layout {layout!r})")
        labels = {int(s.label) for s in samples}
        try:
            report = self.engine.evaluate(det, samples, progress=progress)
        except Exception as exc:
            raise UserError(f"evaluation failed ({type(exc).__name__}: {exc})") from None
        from ccad.evaluate import METRIC_KEYS

        rows = views.metrics_rows(report.per_category, METRIC_KEYS)
        msg = (f"Evaluated {name} on {len(report.records)} images from {path} in {report.seconds:.1f} s "
               f"(+ {report.metrics_seconds:.1f} s for the metrics)"
               + (f"; {len(report.errors)} unreadable file(s) skipped" if report.errors else "")
               + (f"; left out {len(getattr(samples, 'skipped', []))} file(s) with unsupported extensions: "
                  + ", ".join(Path(q).name for q in samples.skipped[:10]) if getattr(samples, "skipped", None) else "")
               + ("" if labels >= {0, 1} else "; only one class present, so AUROC/AP are undefined"))
        cats = [c for c in report.per_category if c != "mean"]
        if len(cats) > 1:
            msg += f"; {len(cats)} categories: one row each, then their mean"
        threshold = getattr(det, "threshold", float("nan"))
        defect_headers, defect_rows = defect_type_rows(report.records, threshold)
        point = views.operating_point(report.records, threshold)  # where the threshold sits on the curves
        return {"headers": ["category", *METRIC_KEYS], "rows": rows, "roc": views.roc_figure(report.curves, point),
                "defect_headers": defect_headers, "defect_rows": defect_rows, "point": point,
                "sweep": views.threshold_sweep_figure(report.records, threshold),
                "pr": views.pr_figure(report.curves, point), "fn": self._gallery(report.worst("fn")),
                "fp": self._gallery(report.worst("fp")), "message": msg, "report": report,
                "categories": cats, "curve_choices": [ALL_IMAGES, *(cats if len(cats) > 1 else []),
                                                      *([EVERY_CATEGORY] if len(cats) > 1 else [])]}

    def use_operating_point(self, name: Optional[str], report: Any, policy: str) -> str:
        """Set the model's threshold to the operating point ``policy`` (``f1``, ``recall=R``,
        ``fpr=F``) picks on the evaluation's labelled images (``ccad.evaluate.set_operating_point``;
        the source is recorded in the model's calibration and card). The model folder is not
        rewritten: the message says how to keep it."""
        from ccad.evaluate import set_operating_point

        if report is None:
            raise UserError("run an evaluation first: the operating point is chosen on its labelled images")
        det = self._detector(name)
        recs = [r for r in report.records if int(r["label"]) in (0, 1)]
        try:
            p = set_operating_point(det, [r["label"] for r in recs], [r["score"] for r in recs], policy or "f1",
                                    f"the evaluation of {name} ({len(recs)} labelled images)")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return (f"Threshold of {name} set to {p['threshold']:.6g} ({p['policy']}): on these images it catches "
                f"{p['caught']} of {p['n_anomalous']} defects (recall {p['recall']:.3f}) with {p['false_alarms']} "
                f"false alarms in {p['n_good']} good images (rate {p['false_alarm_rate']:.3f}). Chosen on labelled "
                f"test images, so these rates are optimistic for new images. Verdicts from now on use it; the model "
                f"folder is unchanged until you save the model (or run `ccad calibrate MODEL --labelled DATA --policy "
                f"{p['policy']}`).")

    def category_curves(self, report: Any, which: str) -> tuple[Any, Any, str]:
        """(ROC, PR, note) for ``which``: all images pooled, one category, or every category overlaid
        (curves from the report's per-image records, ``ccad.metrics.roc_points`` / ``pr_points``)."""
        if report is None:
            raise UserError("run an evaluation first")
        if not which or which == ALL_IMAGES:
            point = views.operating_point(report.records, None)
            return views.roc_figure(report.curves, point), views.pr_figure(report.curves, point), ""
        from ccad.metrics import pr_points, roc_points

        cats = [c for c in report.per_category if c != "mean"]
        wanted = cats if which == EVERY_CATEGORY else [which]
        named, skipped = {}, []
        for cat in wanted:
            recs = [r for r in report.records if (r.get("category") or "all") == cat]
            labels = np.asarray([r["label"] for r in recs], int)
            scores = np.asarray([r["score"] for r in recs], float)
            if len(set(labels.tolist())) < 2:
                skipped.append(cat)
                continue
            named[cat] = {"roc": roc_points(labels, scores), "pr": pr_points(labels, scores)}
        if which not in cats and which != EVERY_CATEGORY:
            raise UserError(f"no category {which!r} in this evaluation")
        roc, pr = views.category_curve_figures(named)
        note = ("" if not skipped else "No curve for " + ", ".join(skipped)
                + " (only one class of images there).")
        return roc, pr, note

    def _gallery(self, records: list[dict[str, Any]]) -> list[tuple[np.ndarray, str]]:
        """(image, caption) of the worst cases: the file name, its category / defect type and its
        score against the threshold (the gallery shows them with their aspect kept)."""
        out = []
        for r in records:
            try:
                img = to_uint8(self.engine.load_image(r["path"]))
            except Exception:
                continue
            where = " / ".join(str(x) for x in (r.get("category"), r.get("defect_type")) if x)
            # the score first: a narrow thumbnail cuts the end of its caption
            out.append((img, f"score {float(r['score']):.4g} · {Path(r['path']).name}"
                        + (f" · {where}" if where else "")))
        return out
