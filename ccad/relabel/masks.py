"""Mask files and pictures for the DAGM review: read images and label masks, write binary PNG
masks atomically, compare two masks (IoU) and draw a mask over its image."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ccad.data.io import load_image, load_mask
from ccad.scoring.heatmap import as_uint8_rgb as _as_uint8_rgb

__all__ = ["atomic_write_bytes", "mask_iou", "overlay", "read_image", "read_mask", "write_mask_png"]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as float32 ``H x W x 3`` in [0, 1] (``ccad.data.io.load_image``; raises
    ``ImageReadError`` naming the file when it cannot be read)."""
    return load_image(path)


def read_mask(path: str | os.PathLike[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label mask as bool ``H x W`` (any value > 0 is defect), resized (nearest) to
    ``shape`` when given (``ccad.data.io.load_mask``)."""
    return load_mask(path, shape) > 0.5


def write_mask_png(path: str | os.PathLike[str], mask: np.ndarray) -> Path:
    """Write a binary mask as an 8-bit PNG with values {0, 255}, atomically (temp + replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", (np.asarray(mask) > 0).astype(np.uint8) * 255)
    if not ok:
        raise ValueError(f"cannot encode mask for {path}")
    atomic_write_bytes(path, buf.tobytes())
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binary masks (values > 0 are foreground).

    Two empty masks agree perfectly (IoU 1.0). Raises ``ValueError`` on a shape mismatch.
    """
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: shapes differ {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
            opacity: float = 0.5, mode: str = "fill", thickness: int = 2) -> np.ndarray:
    """Draw ``mask`` over ``image`` and return uint8 RGB ``H x W x 3``.

    ``mode="fill"`` alpha-blends ``color`` inside the mask with ``opacity`` in [0, 1];
    ``mode="outline"`` draws the mask's contours (``thickness`` px) blended with ``opacity``
    and leaves the pixels inside untouched.
    """
    if mode not in ("fill", "outline"):
        raise ValueError(f"overlay mode must be 'fill' or 'outline', got {mode!r}")
    opacity = float(np.clip(opacity, 0.0, 1.0))
    base = _as_uint8_rgb(image)
    mask = np.asarray(mask) > 0
    if mask.shape != base.shape[:2]:
        raise ValueError(f"overlay: mask shape {mask.shape} != image shape {base.shape[:2]}")
    if mode == "fill":
        region = mask
    else:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST,
                                       cv2.CHAIN_APPROX_NONE)
        canvas = np.zeros(mask.shape, np.uint8)
        cv2.drawContours(canvas, contours, -1, 1, int(thickness))
        region = canvas > 0
    out = base.astype(np.float32)
    col = np.asarray(color, dtype=np.float32)[:3]
    out[region] = (1.0 - opacity) * out[region] + opacity * col
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
