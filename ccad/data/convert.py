"""Array conversions to the package's image convention and to model inputs.

:func:`to_float_rgb` turns any decoded image array (grey/RGB/RGBA, 8/16-bit, int, bool, float,
``H x W x C`` or ``C x H x W``) into the convention of the whole package: ``float32``
``H x W x 3`` in ``[0, 1]``, the inputs ``x_0`` of the CCAD paper (eq. 15 trains on them, eq. 16
compares them to reconstructions). :func:`to_tensor` and :func:`mask_to_tensor` resize such
images and masks to the model's ``3 x S x S`` / ``1 x S x S`` tensors. No file is read here
(files: :mod:`ccad.data.io`; anything a user hands over: :mod:`ccad.data.coerce`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is made (the export runtime reads images without it)
    import torch

__all__ = ["to_float_rgb", "to_tensor", "mask_to_tensor"]


def to_float_rgb(arr: np.ndarray, source: str = "array") -> np.ndarray:
    """Any image array (grey/RGB/RGBA, uint8/uint16/int/bool/float) -> float32 ``H x W x 3`` in [0, 1].

    uint8 is divided by 255, uint16 by 65535, other integers by their dtype maximum; float data
    already in [0, 1] is kept, other float data is min-max scaled. Channel order is taken as
    RGB(A); a 2-channel image is grey + alpha; alpha is dropped.
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        a = np.transpose(a, (1, 2, 0))  # C x H x W given
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{source}: expected an H x W or H x W x C image, got shape {a.shape}")
    c = a.shape[2]
    if c == 1 or c == 2:
        a = a[..., :1]
    elif c >= 3:
        a = a[..., :3]
    if a.dtype == np.bool_:
        out = a.astype(np.float32)
    elif a.dtype == np.uint8:
        out = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        out = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        af = a.astype(np.float64)
        if af.min() >= 0 and af.max() <= 255:
            out = (af / 255.0).astype(np.float32)
        elif af.min() >= 0 and af.max() <= 65535:
            out = (af / 65535.0).astype(np.float32)
        else:
            out = ((af - info.min) / float(info.max - info.min)).astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        af = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        lo, hi = float(af.min()), float(af.max())
        if lo >= 0.0 and hi <= 1.0:
            out = af
        elif lo >= 0.0 and hi <= 255.0 and a.dtype != np.float16:
            out = af / 255.0
        else:
            out = (af - lo) / (hi - lo) if hi > lo else np.zeros_like(af)
    else:
        raise ValueError(f"{source}: unsupported image dtype {a.dtype}")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _size_tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"size must be an int or (H, W), got {size!r}")
        return int(size[0]), int(size[1])
    return int(size), int(size)


def to_tensor(image: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """``H x W x 3`` float image -> ``3 x S x S`` tensor, bilinear resize with antialiasing.

    ``size`` is an int (square) or ``(H, W)``. Values stay in [0, 1].
    """
    import torch
    import torch.nn.functional as F

    img = to_float_rgb(image) if (image.dtype != np.float32 or image.ndim != 3) else image
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()
    hw = _size_tuple(size)
    if tuple(t.shape[1:]) != hw:
        t = F.interpolate(t[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
        t = t.clamp_(0.0, 1.0)
    return t


def mask_to_tensor(mask: np.ndarray | None, size: int | tuple[int, int]) -> torch.Tensor:
    """``H x W`` {0,1} mask -> ``1 x S x S`` float tensor (nearest); ``None`` -> zeros."""
    import torch
    import torch.nn.functional as F

    hw = _size_tuple(size)
    if mask is None:
        return torch.zeros(1, *hw, dtype=torch.float32)
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    t = torch.from_numpy((m > 0).astype(np.float32))[None]
    if tuple(t.shape[1:]) != hw:
        t = F.interpolate(t[None], size=hw, mode="nearest")[0]
    return t



ASPECT_WARN = 1.5  # a square resize that changes the aspect ratio by more than this is said once
_aspect_warned: set[str] = set()


class AspectRatioWarning(UserWarning):
    """An image squashed to the model's square input by more than :data:`ASPECT_WARN`."""


def warn_aspect(shape: tuple[int, ...], size: int | tuple[int, int], name: str | None = None) -> bool:
    """Warn (once per process and target shape) when resizing an ``H x W`` image to ``size``
    changes its aspect ratio by more than :data:`ASPECT_WARN` (issue 24 item 3): a 500 x 1250
    surface image squashed to 256 x 256 loses 2.5x of its pixels along its long side, and a thin
    defect running that way loses most of its width. True when this call warned."""
    import warnings

    h, w = int(shape[0]), int(shape[1])
    th, tw = _size_tuple(size)
    if min(h, w) < 1:
        return False
    ratio = (h / w) / (th / tw)
    change = max(ratio, 1.0 / ratio)
    if change <= ASPECT_WARN:
        return False
    key = f"{th}x{tw}"
    if key in _aspect_warned:
        return False
    _aspect_warned.add(key)
    who = f"{name}: " if name else ""
    warnings.warn(f"{who}a {h} x {w} image is resized to {th} x {tw}, changing its aspect ratio {change:.2f}x "
                  f"(said once per run): elongated parts and thin defects along the long side lose detail; "
                  f"a model built with --resize keep-aspect (no distortion) or --resize tile (native "
                  f"resolution) keeps them (resize= in the Python API)",
                  AspectRatioWarning, stacklevel=2)
    return True
