"""The one heatmap renderer: an anomaly map coloured with OpenCV's JET colour map (blue = low,
red = high), optionally blended over its image. ``Prediction.heatmap``, the app and the relabel
review screen all draw with :func:`render_heatmap`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["as_uint8_rgb", "render_heatmap"]


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
