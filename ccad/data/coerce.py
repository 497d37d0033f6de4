"""Anything a user hands over -> an image in the package's convention.

:func:`coerce_image` takes a path, a PIL image, a numpy array or a torch tensor and returns
``float32`` ``H x W x 3`` in ``[0, 1]`` (files through :func:`ccad.data.io.load_image`, arrays
through :func:`ccad.data.convert.to_float_rgb`); :func:`decode_item` wraps it for one item of a
batch, timing the read and collecting an unreadable item's error instead of stopping the batch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ccad.data.convert import to_float_rgb
from ccad.data.io import ImageReadError, _check_pixels, _pil_to_array, load_image

__all__ = ["coerce_image", "decode_item"]


def coerce_image(x: Any) -> np.ndarray:
    """Anything image-like -> the :func:`load_image` format (float32 ``H x W x 3`` in [0, 1]).

    Accepts a path (str / PathLike), a PIL image, a numpy array (uint8/uint16/float, grey/RGB/RGBA,
    ``H x W x C`` or ``C x H x W``) or a torch tensor (``C x H x W`` or ``H x W``, values in [0, 1]).
    Arrays are taken as RGB channel order.
    """
    if isinstance(x, (str, os.PathLike)):
        return load_image(x)
    if isinstance(x, Image.Image):
        w, h = x.size
        _check_pixels(h, w, "<PIL image>")
        return to_float_rgb(_pil_to_array(x), source="PIL image")
    torch = sys.modules.get("torch")  # a tensor can only come from a process that imported torch
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        return to_float_rgb(t.float().numpy(), source="tensor")
    if isinstance(x, np.ndarray):
        if x.ndim >= 2:
            _check_pixels(x.shape[0], x.shape[1], "<array>")
        return to_float_rgb(x, source="array")
    raise TypeError(
        f"cannot interpret {type(x).__name__} as an image; pass a path, a PIL image, "
        "a numpy array or a torch tensor"
    )


def decode_item(item: Any, index: int, on_error: str, errors: list[tuple[str, str]],
                read: Callable[[Any], np.ndarray] = coerce_image,
                clock: Callable[[], float] = time.perf_counter) -> tuple[np.ndarray, float, str | None] | None:
    """One item to inspect -> ``(image, seconds its read took, its path or None)``.

    ``read`` (:func:`coerce_image`) decodes a path, PIL image, array or tensor, timed by ``clock``.
    An unreadable item raises when ``on_error == "raise"``; otherwise it is added to ``errors`` as
    ``(its path, else "item <index>", the reason)`` and None is returned. Callers pass the ``read``
    and ``clock`` they look up themselves (``ccad.detector`` passes its own names).
    """
    name = str(item) if isinstance(item, (str, Path)) else f"item {index}"
    try:
        t = clock()
        image = read(item)
        return image, clock() - t, str(item) if isinstance(item, (str, Path)) else None
    except (ImageReadError, ValueError, TypeError) as exc:
        if on_error == "raise":
            raise
        errors.append((name, str(exc)))
        return None
