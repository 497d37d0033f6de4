"""How an image of any shape becomes the model's square inputs, and how their maps come back
(issue 24 item 3: images keep their shape).

A detector's ``resize`` setting (:class:`ccad.detector_config.DetectorConfig`) is one of
:data:`RESIZE_MODES`:

``square`` (the default, every model before this setting)
    the whole image is resized to ``S x S`` (antialiased bilinear), changing its aspect ratio;
    the ``S x S`` map is resized back to the image's size. One model input per image.
``keep-aspect``
    the image is resized without distortion so that its longer side is ``S`` (the shorter side
    becomes ``round(side * S / longer)``), centred in the ``S x S`` input and the rest filled with
    the image's mean colour (the good images the model is built from are padded the same way, so
    the band's edge is normal to it; a mirror fill was tried and copied a defect near the edge
    into the padding, where the smoothed map merged the two and moved the peak to the edge).
    The map is cropped to the image's own region (the padding removed: no score is
    ever read there, so padded pixels can neither show a defect nor raise the image score) and
    resized to the image's size; the image score is taken on the cropped map at model
    resolution. One model input per image. It keeps shapes, not pixels: a long image is
    shrunk by its longer side, so it has no more resolution than ``square``.
``tile``
    the image is scored at its native resolution in overlapping ``S x S`` tiles (``S`` is the
    model's input size), ``stride`` pixels apart (default ``S // 2``: each pixel is seen by up to
    four tiles); tiles are placed evenly from the first row/column to the last, so no tile hangs
    over the image and no two start more than ``stride`` apart. An image smaller than ``S`` on a
    side is padded to ``S`` on that side (bottom / right) with its mean colour, the padding
    cropped off the map before the score is taken. The
    tiles' maps are stitched by averaging where they overlap, and the image score is the
    method's own rule (``scoring.score``) applied to the stitched map at the image's size. A
    model with ``tile`` is also *built* from tiles of the good images (every method's bank,
    training set and held-out selection), so it learns the texture at the scale it scores it.
    (The idea is anomalib's Tiler; this is its own code.)

Everything here that does geometry is numpy only (the torch-free runtime can import it); the
tensor helpers import torch where they are called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .sample import Sample

if TYPE_CHECKING:
    import torch

__all__ = ["RESIZE_MODES", "DEFAULT_RESIZE", "check_resize", "tile_stride", "Layout", "plan", "tile_starts",
           "frame_tensor", "unframe", "score_region", "FramedSample", "frame_samples",
           "frame_item", "frame_key"]

RESIZE_MODES = ("square", "keep-aspect", "tile")
DEFAULT_RESIZE = "square"


def check_resize(mode: object, where: str = "resize") -> str:
    """``mode`` if it is one of :data:`RESIZE_MODES`, else a ``ValueError`` naming ``where`` and the choices."""
    if not isinstance(mode, str) or mode not in RESIZE_MODES:
        raise ValueError(f"{where} must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return mode


def tile_stride(size: int, stride: Optional[int]) -> int:
    """The stride tiles of side ``size`` are placed at: ``stride``, or ``size // 2`` when None."""
    s = int(size) // 2 if stride is None else int(stride)
    if not 1 <= s <= int(size):
        raise ValueError(f"tile_stride must be in 1..{int(size)} (the tile size), got {stride}")
    return max(1, s)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` (>= ``tile``) pixels: evenly
    spaced from 0 to ``length - tile``, never more than ``stride`` apart."""
    length, tile, stride = int(length), int(tile), int(stride)
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / stride) + 1
    return sorted({int(round(v)) for v in np.linspace(0, length - tile, n)})


@dataclass
class Layout:
    """Where one image's model inputs sit in it (from :func:`plan`).

    ``mode``: the resize mode; ``height`` / ``width``: the image's size; ``size``: the model's
    square input side ``S``. ``keep-aspect``: ``content = (nh, nw)`` is the resized image's size
    and ``offset = (top, left)`` where it sits in the ``S x S`` input. ``tile``: ``canvas`` is
    the (padded) image size the tiles cover and ``boxes`` their ``(top, left)`` corners."""

    mode: str
    height: int
    width: int
    size: int
    content: tuple[int, int] = (0, 0)
    offset: tuple[int, int] = (0, 0)
    canvas: tuple[int, int] = (0, 0)
    boxes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_inputs(self) -> int:
        return len(self.boxes) if self.mode == "tile" else 1


def plan(height: int, width: int, size: int, mode: str, stride: Optional[int] = None) -> Layout:
    """The :class:`Layout` of an ``height x width`` image for a model of input side ``size``."""
    h, w, s = int(height), int(width), int(size)
    check_resize(mode)
    if mode == "keep-aspect":
        scale = s / max(h, w)
        nh, nw = max(1, min(s, int(round(h * scale)))), max(1, min(s, int(round(w * scale))))
        return Layout(mode, h, w, s, content=(nh, nw), offset=((s - nh) // 2, (s - nw) // 2))
    if mode == "tile":
        st = tile_stride(s, stride)
        ch, cw = max(h, s), max(w, s)
        boxes = [(t, le) for t in tile_starts(ch, s, st) for le in tile_starts(cw, s, st)]
        return Layout(mode, h, w, s, canvas=(ch, cw), boxes=boxes)
    return Layout(mode, h, w, s)


def frame_tensor(image: np.ndarray, layout: Layout, box: Optional[tuple[int, int]] = None,
                 out_size: Optional[int] = None) -> "torch.Tensor":
    """The model inputs ``K x 3 x S x S`` of an ``H x W x 3`` float image (``K = layout.n_inputs``;
    ``box``: only that tile, ``K = 1``). ``out_size``: each input resized to that side afterwards
    (a method whose own size differs from the tile size; ``keep-aspect`` letterboxes straight at it)."""
    import torch

    from .convert import to_float_rgb, to_tensor

    img = to_float_rgb(image) if (image.dtype != np.float32 or image.ndim != 3) else image
    s = layout.size
    if layout.mode == "square":
        return to_tensor(img, out_size or s)[None]
    if layout.mode == "keep-aspect":
        lay = layout if out_size in (None, s) else plan(layout.height, layout.width, int(out_size), "keep-aspect")
        content = to_tensor(img, lay.content)
        (nh, nw), (top, left), s2 = lay.content, lay.offset, lay.size
        fill = content.mean(dim=(1, 2), keepdim=True)  # the image's mean colour (see the module docstring)
        out = fill.expand(3, s2, s2).clone()
        out[:, top:top + nh, left:left + nw] = content
        return out[None]
    ch, cw = layout.canvas
    if (ch, cw) != img.shape[:2]:  # smaller than a tile on a side: the image's mean colour beyond it
        canvas = np.empty((ch, cw, 3), np.float32)
        canvas[:] = img.reshape(-1, 3).mean(0)
        canvas[:img.shape[0], :img.shape[1]] = img
        img = canvas
    out = []
    for top, left in ([box] if box is not None else layout.boxes):
        out.append(to_tensor(np.ascontiguousarray(img[top:top + s, left:left + s]), out_size or s))
    return torch.stack(out)


def unframe(maps: "torch.Tensor", layout: Layout) -> "torch.Tensor":
    """The maps (or reconstructions) ``K x C x S' x S'`` of one image's inputs -> ``C x H x W`` at
    the image's size: ``square`` resized; ``keep-aspect`` cropped to the image's region, then
    resized; ``tile`` stitched (overlaps averaged), padded margins cropped."""
    import torch
    import torch.nn.functional as F

    maps = maps.float()
    hw = (layout.height, layout.width)
    if layout.mode == "tile":
        s = layout.size
        if tuple(maps.shape[-2:]) != (s, s):
            maps = F.interpolate(maps, size=(s, s), mode="bilinear", align_corners=False)
        ch, cw = layout.canvas
        acc = torch.zeros(maps.shape[1], ch, cw, dtype=maps.dtype, device=maps.device)
        cnt = torch.zeros(1, ch, cw, dtype=maps.dtype, device=maps.device)
        for k, (top, left) in enumerate(layout.boxes):
            acc[:, top:top + s, left:left + s] += maps[k]
            cnt[:, top:top + s, left:left + s] += 1
        return (acc / cnt)[:, :layout.height, :layout.width]
    crop = score_region(maps, layout)
    if tuple(crop.shape[-2:]) != hw:
        crop = F.interpolate(crop[None], size=hw, mode="bilinear", align_corners=False)[0]
    return crop


def score_region(maps: "torch.Tensor", layout: Layout) -> "torch.Tensor":
    """The part of one image's maps ``K x C x S' x S'`` its image score is taken on, ``C x h x w``:
    ``square``: the whole map; ``keep-aspect``: the image's region of the input (no padding), at
    the map's resolution; ``tile``: the stitched map at the image's size (:func:`unframe`)."""
    if layout.mode == "tile":
        return unframe(maps, layout)
    m = maps[0].float()
    if layout.mode == "square":
        return m
    sy = m.shape[-2] / layout.size
    sx = m.shape[-1] / layout.size
    (nh, nw), (top, left) = layout.content, layout.offset
    t0, l0 = int(round(top * sy)), int(round(left * sx))
    t1, l1 = max(t0 + 1, int(round((top + nh) * sy))), max(l0 + 1, int(round((left + nw) * sx)))
    return m[:, t0:t1, l0:l1]


def frame_key(resize: str, box: Optional[Sequence[int]]) -> str:
    """A short text naming one framed input (for cache hashes): ``""`` for ``square``."""
    if resize == "square":
        return ""
    return f"#{resize}" + ("" if box is None else f"@{int(box[0])},{int(box[1])},{int(box[2])}")


# --------------------------------------------------------------------------------------------
# Framed samples: the inputs a model is *built* from (fitting / training / held-out selection)
# --------------------------------------------------------------------------------------------

@dataclass
class FramedSample(Sample):
    """A :class:`~ccad.data.sample.Sample` read through a resize mode: ``keep-aspect`` (the
    whole image letterboxed, see the module docstring) or one tile of it (``resize="tile"``,
    ``box = (top, left, side)`` in the image's pixels). :func:`ccad.data.dataset.load_item` reads
    it as the model input the detector builds from the image at scoring time."""

    resize: str = "square"
    box: Optional[tuple[int, int, int]] = None
    tile_stride: Optional[int] = None

    def frame_key(self) -> str:
        return frame_key(self.resize, self.box)


def _fields(s: Sample) -> dict:
    import dataclasses

    return {f.name: getattr(s, f.name) for f in dataclasses.fields(Sample)}


def frame_samples(samples: Sequence[Sample], resize: str, size: int, stride: Optional[int] = None) -> list:
    """The samples a model with ``resize`` is built from: ``square``: ``samples`` as given;
    ``keep-aspect``: each image letterboxed; ``tile``: each image cut into its tiles of side
    ``size`` (every image is decoded once here to count them; an unreadable one stays one sample
    and is reported as unreadable when it is read, as any other)."""
    check_resize(resize)
    if resize == "square":
        return list(samples)
    out: list = []
    for s in samples:
        base = _fields(s)
        if resize == "keep-aspect":
            out.append(FramedSample(**base, resize="keep-aspect"))
            continue
        from .io import ImageReadError, load_image

        try:
            h, w = load_image(s.image_path).shape[:2]
        except ImageReadError:
            out.append(FramedSample(**base, resize="tile", box=(0, 0, int(size)), tile_stride=stride))
            continue
        lay = plan(h, w, size, "tile", stride)
        out.extend(FramedSample(**base, resize="tile", box=(t, le, int(size)), tile_stride=stride)
                   for t, le in lay.boxes)
    return out


def frame_item(image: np.ndarray, mask: Optional[np.ndarray], sample: "FramedSample",
               image_size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A framed sample's ``3 x s x s`` input and ``1 x s x s`` mask (``s = image_size``) from its
    decoded image and ``H x W`` mask (or None)."""
    import torch

    h, w = image.shape[:2]
    if sample.resize == "keep-aspect":
        lay = plan(h, w, int(image_size), "keep-aspect")
        box = None
    else:
        side = int(sample.box[2]) if sample.box else int(image_size)
        lay = plan(h, w, side, "tile", sample.tile_stride)
        box = (int(sample.box[0]), int(sample.box[1])) if sample.box else lay.boxes[0]
    x = frame_tensor(image, lay, box=box, out_size=int(image_size))[0]
    if mask is None:
        m = torch.zeros(1, int(image_size), int(image_size), dtype=torch.float32)
    else:
        m3 = np.repeat((np.asarray(mask) > 0).astype(np.float32)[..., None], 3, axis=2)
        m = (frame_tensor(m3, lay, box=box, out_size=int(image_size))[0, :1] > 0.5).float()
    return x, m
