"""Presentation helpers: plotly figures, tables and text for the app (no method logic).

Everything here turns results computed by ``ccad`` (scores, calibration, loss history, curves,
bank projections) into something Gradio can show.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence

import numpy as np
import plotly.graph_objects as go

GOOD_COLOR = "#2e7d32"
BAD_COLOR = "#c62828"


def _finite(values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 320) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height,
                      margin=dict(l=50, r=20, t=45, b=45), legend=dict(orientation="h", y=-0.25),
                      template="plotly_white")
    return fig


def score_histogram(good_scores: Optional[Sequence[float]], batch_scores: Sequence[float],
                    threshold: float, model: str = "") -> go.Figure:
    """Calibration good-score distribution vs the current batch's scores, with the threshold line;
    ``model`` (the one whose calibration and scores these are) names the title and the traces."""
    fig = go.Figure()
    good = _finite(good_scores if good_scores is not None else [])
    batch = _finite(batch_scores)
    of = f" of {model}" if model else ""
    if good.size:
        fig.add_trace(go.Histogram(x=good, name=f"calibration good images{of} ({good.size})", opacity=0.6,
                                   marker_color=GOOD_COLOR, nbinsx=30))
    if batch.size:
        by = f", scored by {model}" if model else ""
        fig.add_trace(go.Histogram(x=batch, name=f"this batch{by} ({batch.size})", opacity=0.6,
                                   marker_color="#1565c0", nbinsx=30))
    if threshold is not None and math.isfinite(threshold):
        fig.add_vline(x=float(threshold), line_color=BAD_COLOR, line_dash="dash",
                      annotation_text=f"threshold {threshold:.4g}")
    fig.update_layout(barmode="overlay")
    return _layout(fig, f"Image scores · {model}" if model else "Image scores", "score", "images")


def loss_curve(losses: Sequence[tuple[int, float]]) -> go.Figure:
    """Training loss (eq. 15) against the step, raw and smoothed."""
    fig = go.Figure()
    if losses:
        steps = np.array([s for s, _ in losses])
        vals = np.array([v for _, v in losses], dtype=np.float64)
        fig.add_trace(go.Scatter(x=steps, y=vals, mode="lines", name="loss", line=dict(color="#90caf9")))
        if vals.size >= 5:
            k = max(2, vals.size // 20)
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            fig.add_trace(go.Scatter(x=steps[k - 1:], y=smooth, mode="lines", name=f"mean of {k}",
                                     line=dict(color="#0d47a1")))
    return _layout(fig, "Training loss", "step", "loss")


def operating_point(records: Sequence[dict[str, Any]], threshold: Optional[float]) -> Optional[dict[str, float]]:
    """Where the model's threshold sits on an evaluation: its false-alarm rate, recall and
    precision over the records' labels (anomalous = score above the threshold, as the verdict)."""
    if not records:
        return None
    labels = np.asarray([int(r["label"]) for r in records])
    if not ((labels == 0).any() and (labels == 1).any()):
        return None
    if threshold is None:  # the verdicts the evaluation recorded at the model's threshold
        if not all("is_anomalous" in r for r in records):
            return None
        flagged = np.asarray([bool(r["is_anomalous"]) for r in records])
        threshold = float("nan")
    elif not np.isfinite(float(threshold)):
        return None
    else:
        flagged = np.asarray([float(r["score"]) for r in records]) > float(threshold)
    tp = float((flagged & (labels == 1)).sum())
    return {"threshold": float(threshold), "fpr": float(flagged[labels == 0].mean()),
            "recall": float(flagged[labels == 1].mean()), "precision": tp / max(float(flagged.sum()), 1.0)}


def _point_trace(x: float, y: float, op: dict[str, float]) -> go.Scatter:
    return go.Scatter(x=[x], y=[y], mode="markers", marker=dict(size=12, color="#c62828", symbol="x"),
                      name=(f"threshold {op['threshold']:.4g}" if np.isfinite(op["threshold"]) else "the threshold")
                      + f": recall {op['recall']:.2f}, "
                           f"false alarms {op['fpr']:.2f}")


def roc_figure(curves: dict[str, Any], point: Optional[dict[str, float]] = None) -> go.Figure:
    """The ROC curve; ``point`` (:func:`operating_point`) marks where the current threshold sits."""
    fig = go.Figure()
    if "roc" in curves:
        fpr, tpr = (np.asarray(v) for v in curves["roc"][:2])
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name="ROC"))
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                                 line=dict(dash="dot", color="grey")))
        if point is not None:
            fig.add_trace(_point_trace(point["fpr"], point["recall"], point))
    return _layout(fig, "Image-level ROC", "false positive rate", "true positive rate")


def pr_figure(curves: dict[str, Any], point: Optional[dict[str, float]] = None) -> go.Figure:
    """The precision-recall curve; ``point`` marks the current threshold."""
    fig = go.Figure()
    if "pr" in curves:
        recall, precision = (np.asarray(v) for v in curves["pr"][:2])
        fig.add_trace(go.Scatter(x=recall, y=precision, mode="lines", name="PR"))
        if point is not None:
            fig.add_trace(_point_trace(point["recall"], point["precision"], point))
    return _layout(fig, "Image-level precision-recall", "recall", "precision")


def threshold_sweep_figure(records: Sequence[dict[str, Any]], threshold: Optional[float]) -> go.Figure:
    """Recall and false-alarm rate as the threshold moves (issue 21 item 1): recall of all defects,
    recall per defect type (dashed), the false-alarm rate on the good images, and the current
    threshold as a vertical line, so an engineer sees what moving it would catch and cost."""
    fig = go.Figure()
    if records:
        scores = np.asarray([float(r["score"]) for r in records])
        labels = np.asarray([int(r["label"]) for r in records])
        types = np.asarray([str(r.get("defect_type") or "defect") for r in records])
        finite = scores[np.isfinite(scores)]
        if finite.size:
            grid = np.unique(np.quantile(finite, np.linspace(0, 1, 201)))
            grid = np.concatenate([[grid[0] - 1e-9], grid])
            above = scores[None, :] > grid[:, None]  # thresholds x images
            if (labels == 1).any():
                fig.add_trace(go.Scatter(x=grid, y=above[:, labels == 1].mean(1), mode="lines",
                                         name="recall (all defects)", line=dict(color="#1565c0", width=3)))
                for d in sorted(set(types[labels == 1].tolist())):
                    sel = (labels == 1) & (types == d)
                    fig.add_trace(go.Scatter(x=grid, y=above[:, sel].mean(1), mode="lines", name=f"recall: {d}",
                                             line=dict(dash="dash", width=1)))
            if (labels == 0).any():
                fig.add_trace(go.Scatter(x=grid, y=above[:, labels == 0].mean(1), mode="lines",
                                         name="false-alarm rate (good images)", line=dict(color="#c62828", width=3)))
    if threshold is not None and np.isfinite(float(threshold)):
        fig.add_vline(x=float(threshold), line=dict(color="black", dash="dot"),
                      annotation_text=f"threshold {float(threshold):.4g}")
    return _layout(fig, "Recall and false alarms as the threshold moves", "threshold (anomaly score)", "rate")


def category_curve_figures(named: dict[str, dict[str, Any]]) -> tuple[go.Figure, go.Figure]:
    """ROC and PR figures with one trace per category (``{category: {"roc": ..., "pr": ...}}``)."""
    roc, pr = go.Figure(), go.Figure()
    for name, curves in named.items():
        if "roc" in curves:
            fpr, tpr = (np.asarray(v) for v in curves["roc"][:2])
            roc.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=name))
        if "pr" in curves:
            recall, precision = (np.asarray(v) for v in curves["pr"][:2])
            pr.add_trace(go.Scatter(x=recall, y=precision, mode="lines", name=name))
    roc.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(dash="dot", color="grey")))
    return (_layout(roc, "Image-level ROC per category", "false positive rate", "true positive rate"),
            _layout(pr, "Image-level precision-recall per category", "recall", "precision"))


def projection_figure(bank_xy: np.ndarray, all_xy: Optional[np.ndarray]) -> go.Figure:
    """2-D PCA projection of the bank (xi points) against a sample of all patch features."""
    fig = go.Figure()
    if all_xy is not None and len(all_xy):
        fig.add_trace(go.Scattergl(x=all_xy[:, 0], y=all_xy[:, 1], mode="markers", name="patch features (sample)",
                                   marker=dict(size=3, color="#b0bec5", opacity=0.5)))
    if bank_xy is not None and len(bank_xy):
        fig.add_trace(go.Scattergl(x=bank_xy[:, 0], y=bank_xy[:, 1], mode="markers", name="bank (coreset)",
                                   marker=dict(size=7, color=BAD_COLOR)))
    return _layout(fig, "Feature bank: PCA projection", "PC 1", "PC 2", height=380)


def card_markdown(card: Optional[dict[str, Any]], name: str = "", source: str = "") -> str:
    """The model card as a small markdown table."""
    if not card:
        return "**No model loaded.** Build a feature bank (Feature bank tab) or load a model above."

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "-" if not math.isfinite(v) else f"{v:.4g}"
        if isinstance(v, dict):
            return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return ", ".join(fmt(x) for x in v)
        return str(v)

    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    # the common facts first, then whatever else the method reports (autoencoder, reconstruction ...)
    keys = ["variant", "title", "backbone", "layers", "bank_size", "image_size", "resize", "threshold",
            "n_train_images", "calibration", "reconstruction", "denoiser_parameters", "created"]
    skip = {"metrics", "ccad_version"}
    keys += [k for k in card if k not in keys and k not in skip]
    labels = {"denoiser_parameters": "network parameters"}
    rows = []
    for k in keys:
        if k not in card:
            continue
        v = card.get(k)
        if k == "bank_size" and v is None:
            v = "none (this method keeps no feature bank)"
        rows.append(f"| {labels.get(k, str(k).replace('_', ' '))} | {cell(v)} |")
    metrics = card.get("metrics")
    if metrics:
        if isinstance(metrics, dict) and all(isinstance(v, dict) for v in metrics.values()):
            metrics = metrics.get("mean", next(iter(metrics.values())))
        rows.append(f"| metrics | {fmt(metrics)} |")
    else:
        rows.append("| metrics | not recorded |")
    head = f"**{name}**" + (f" &nbsp;·&nbsp; {source}" if source else "")
    return head + "\n\n| field | value |\n|---|---|\n" + "\n".join(rows)


def card_summary(card: Optional[dict[str, Any]], name: str = "") -> str:
    """The model card in one line (the full table sits in a closed accordion below it)."""
    if not card:
        return "**No model loaded.** Build a feature bank (Feature bank tab) or load a model above."
    parts = [f"**{name or card.get('variant', 'model')}**"]
    title = card.get("title") or card.get("variant")
    if title:
        parts.append(str(title).split(":")[0])
    if card.get("image_size"):
        resize = card.get("resize")  # keep-aspect / tile: the model frames images itself (ccad.data.framing)
        parts.append(f"{card['image_size']} px" + (f" {resize}" if resize not in (None, "square") else ""))
    if card.get("bank_size"):
        parts.append(f"bank {card['bank_size']}")
    cats = card.get("categories")
    if cats:
        parts.append(f"{len(cats)} categor{'y' if len(cats) == 1 else 'ies'}")
    thr = card.get("threshold")
    if isinstance(thr, (int, float)) and math.isfinite(float(thr)):
        parts.append(f"threshold {float(thr):.4g}")
    metrics = card.get("metrics")
    if isinstance(metrics, dict) and metrics:
        if all(isinstance(v, dict) for v in metrics.values()):
            metrics = metrics.get("mean", next(iter(metrics.values())))
        auroc = metrics.get("image_AUROC") if isinstance(metrics, dict) else None
        if isinstance(auroc, (int, float)) and math.isfinite(float(auroc)):
            parts.append(f"image AUROC {float(auroc):.3f}")
    if card.get("note"):  # what the model's own measurement says about it (e.g. its denoiser added nothing)
        parts.append(f"note: {card['note']}")
    return " · ".join(parts)


def format_seconds(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else (f"{m}m {sec:02d}s" if m else f"{sec}s")


def metrics_rows(per_category: dict[str, dict[str, float]], keys: Sequence[str]) -> list[list[Any]]:
    rows = []
    for cat, row in per_category.items():
        vals = []
        for k in keys:
            v = row.get(k)
            vals.append(None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4))
        rows.append([cat, *vals])
    return rows


def pretty_json(d: Any) -> str:
    return json.dumps(d, indent=1, default=str)
