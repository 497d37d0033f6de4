"""The one heatmap renderer: an anomaly map coloured with OpenCV's JET colour map (blue = low,
red = high), optionally blended over its image. ``Prediction.heatmap``, the app and the relabel
review screen all draw with :func:`render_heatmap`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["as_uint8_rgb", "display_range", "render_colorbar", "render_heatmap", "with_colorbar"]


def render_heatmap(anomaly_map: np.ndarray, image: np.ndarray | None = None,
                   opacity: float = 0.5, vmin: float | None = None,
                   vmax: float | None = None) -> np.ndarray:
    """Colour an anomaly map (eq. 16 output, any range) with the JET colormap, optionally
    blended over ``image``; returns uint8 RGB. ``vmin``/``vmax`` default to the map's range."""
    import cv2  # here, not at import: the export runtime's predict needs no OpenCV

    amap = np.asarray(anomaly_map, dtype=np.float32)
    lo = float(np.nanmin(amap)) if vmin is None else float(vmin)
    hi = float(np.nanmax(amap)) if vmax is None else float(vmax)
    norm = np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    if image is None:
        return np.ascontiguousarray(heat)
    base = as_uint8_rgb(image)
    if base.shape[:2] != heat.shape[:2]:
        heat = cv2.resize(heat, (base.shape[1], base.shape[0]), interpolation=cv2.INTER_LINEAR)
    a = float(np.clip(opacity, 0, 1))
    return np.clip((1 - a) * base + a * heat + 0.5, 0, 255).astype(np.uint8)


def as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Any image (float in [0, 1] or [0, 255], uint8; grey, RGB or RGBA) as uint8 RGB ``H x W x 3``."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        f = img.astype(np.float32)
        if f.size and f.max() <= 1.0 + 1e-6:
            f = f * 255.0
        img = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] > 3:
        img = img[..., :3]
    return np.ascontiguousarray(img)


def display_range(floor: float, threshold: float, fallback_max: float = 1.0) -> tuple[float, float]:
    """The colour range every map of one model is drawn with, in score units: from the map value of
    a typical good pixel (``floor``, measured on good images at calibration) to twice the
    threshold's distance above it, so the threshold sits at mid-scale (JET's green): blue to green
    is below the threshold, yellow to red above it, and a good image's map never looks like a
    defect's just because it is stretched to its own range (issue 21 item 2). An uncalibrated
    model (no finite threshold) uses ``floor .. fallback_max``."""
    floor = float(floor) if np.isfinite(floor) else 0.0
    if threshold is None or not np.isfinite(float(threshold)):
        return floor, max(float(fallback_max), floor + 1e-6)
    thr = float(threshold)
    lo = min(floor, thr - 1e-6)
    return lo, thr + (thr - lo)


def _label(v: float, span: float = 0.0) -> str:
    """Three significant digits; a value within 1 % of ``span`` (the scale's width) of zero reads
    ``0`` (a scale from -0.00369 to 5.5 is a scale from 0 to 5.5 to the eye)."""
    if span > 0 and abs(v) < 0.01 * span:
        return "0"
    return f"{v:.3g}"


def render_colorbar(width: int, vmin: float, vmax: float, threshold: float | None = None,
                    height: int | None = None) -> np.ndarray:
    """A horizontal JET colour scale ``height x width`` (uint8 RGB) for maps drawn over
    ``vmin .. vmax``: the gradient, its two ends labelled in score units, and the threshold (when
    finite and inside the range) marked by a white tick labelled ``threshold <value>``."""
    import cv2

    width = max(int(width), 1)
    height = int(height or (max(24, min(48, width // 10)) if width >= 64 else max(4, width // 4)))
    bar_h = max(6, height // 3)
    ramp = np.linspace(0, 255, width).astype(np.uint8)[None, :].repeat(bar_h, 0)
    bar = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)[..., ::-1]
    out = np.full((height, width, 3), 255, np.uint8)
    out[:bar_h] = bar
    if width < 64:  # too narrow for labels: the gradient only
        return np.ascontiguousarray(out)
    scale = max(0.3, min(0.5, height / 70))
    font, ink = cv2.FONT_HERSHEY_SIMPLEX, (20, 20, 20)
    base = height - max(2, height // 8)
    lo_txt, hi_txt = _label(vmin, vmax - vmin), _label(vmax, vmax - vmin)
    cv2.putText(out, lo_txt, (1, base), font, scale, ink, 1, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize(hi_txt, font, scale, 1)
    cv2.putText(out, hi_txt, (width - tw - 1, base), font, scale, ink, 1, cv2.LINE_AA)
    if threshold is not None and np.isfinite(threshold) and vmax > vmin and vmin <= threshold <= vmax:
        x = int(round((float(threshold) - vmin) / (vmax - vmin) * (width - 1)))
        out[:bar_h, max(0, x - 1):x + 2] = 255
        out[bar_h:bar_h + 3, max(0, x - 1):x + 2] = 0
        txt = f"threshold {_label(float(threshold))}"
        (tw, _), _ = cv2.getTextSize(txt, font, scale, 1)
        cv2.putText(out, txt, (int(np.clip(x - tw // 2, 0, width - tw)), base), font, scale, ink, 1, cv2.LINE_AA)
    return np.ascontiguousarray(out)


def with_colorbar(image: np.ndarray, vmin: float, vmax: float, threshold: float | None = None) -> np.ndarray:
    """``image`` (uint8 RGB) with its colour scale (:func:`render_colorbar`) stacked below it."""
    img = as_uint8_rgb(image)
    return np.concatenate([img, render_colorbar(img.shape[1], vmin, vmax, threshold)], axis=0)
