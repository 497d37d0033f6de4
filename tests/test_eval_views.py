"""The Evaluate tab shows where the threshold sits (issue 21 item 1): the current threshold is a
point on the ROC and PR curves, and a plot shows recall (overall and per defect type) and the
false-alarm rate as the threshold moves."""
from __future__ import annotations

import numpy as np

from app import views


def _records() -> list[dict]:
    rng = np.random.default_rng(0)
    recs = [{"score": float(s), "label": 0, "defect_type": "good"} for s in rng.normal(1.0, 0.2, 40)]
    recs += [{"score": float(s), "label": 1, "defect_type": "crack"} for s in rng.normal(1.3, 0.2, 10)]
    recs += [{"score": float(s), "label": 1, "defect_type": "blowhole"} for s in rng.normal(2.0, 0.2, 10)]
    return recs


def test_the_operating_point_is_the_verdicts_at_the_threshold() -> None:
    recs = _records()
    op = views.operating_point(recs, 1.5)
    scores = np.array([r["score"] for r in recs])
    labels = np.array([r["label"] for r in recs])
    assert op["recall"] == (scores[labels == 1] > 1.5).mean() and op["fpr"] == (scores[labels == 0] > 1.5).mean()
    for r in recs:
        r["is_anomalous"] = r["score"] > 1.5
    assert views.operating_point(recs, None)["recall"] == op["recall"]  # the recorded verdicts say the same
    assert views.operating_point([r for r in recs if r["label"] == 0], 1.5) is None  # one class: no point


def test_curves_mark_the_threshold_and_the_sweep_has_a_line_per_defect_type() -> None:
    recs = _records()
    op = views.operating_point(recs, 1.5)
    roc = views.roc_figure({"roc": ([0, 0.5, 1], [0, 0.8, 1])}, op)
    marker = [t for t in roc.data if t.mode == "markers"]
    assert len(marker) == 1 and marker[0].x == (op["fpr"],) and marker[0].y == (op["recall"],)
    assert "threshold 1.5" in marker[0].name
    sweep = views.threshold_sweep_figure(recs, 1.5)
    names = {t.name for t in sweep.data}
    assert {"recall (all defects)", "recall: crack", "recall: blowhole", "false-alarm rate (good images)"} <= names
    fa = next(t for t in sweep.data if t.name.startswith("false-alarm"))
    assert np.all(np.diff(np.asarray(fa.y)) <= 0)  # a higher threshold never raises false alarms
    assert any(getattr(s, "x0", None) == 1.5 for s in sweep.layout.shapes)  # the current threshold


def test_an_empty_worst_case_gallery_says_there_are_none() -> None:
    from app.tabs.evaluation import FN_LABEL, worst_gallery

    none = worst_gallery([], FN_LABEL, "none: every defect scored above the threshold")
    assert none["label"].startswith(FN_LABEL) and "none" in none["label"] and none["value"] == []
    some = worst_gallery([("a.png", "a.png 3.1")], FN_LABEL, "none")
    assert some["label"] == FN_LABEL and len(some["value"]) == 1
