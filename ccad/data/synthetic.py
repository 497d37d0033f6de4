"""Procedural DAGM-style textured-surface defects with exact masks and ellipse weak labels.

DAGM 2007 (Wieler & Hahn) is a synthetic set of grey textured surfaces with one defect per
defective image, labelled only by a coarse ellipse. The CCAD paper (Sec. 4.2) re-annotated four
of its classes (defect, scratch, blur, spots) with tight masks because the ellipses make pixel
metrics meaningless. This module makes data of the same kind from a seed, with *both* labels:

* the exact pixel mask of every defect (every changed pixel is inside it, nothing outside
  changes), the analogue of CCAD's re-annotation, and
* a DAGM-style ellipse enclosing the defect, looser than the mask, the analogue of the
  published weak label.

so that a benchmark can compare ellipse masks and proposed masks against the truth, and every
loader / app screen can be tested without the real data sets.

Everything is deterministic from the seed (``numpy.random.Generator``; the same seed gives the
same bytes) and fast (a 256 x 256 sample takes a few milliseconds).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ccad.data.io import save_image, save_mask

__all__ = [
    "TEXTURES",
    "DEFECTS",
    "SyntheticSample",
    "generate_texture",
    "make_defect",
    "ellipse_label",
    "make_sample",
    "write_dataset",
]

#: Texture classes (categories) the generator knows.
TEXTURES: tuple[str, ...] = ("fibrous", "granular", "cloud", "woven", "speckle")
#: Defect types the generator knows.
DEFECTS: tuple[str, ...] = ("scratch", "spot", "blur", "stain")


@dataclass
class SyntheticSample:
    """One generated image.

    Attributes:
        image: ``H x W`` float32 grey image in [0, 1], quantised to 8-bit levels (so that writing
            it as an 8-bit PNG and reading it back gives exactly the same values).
        mask: ``H x W`` float32 {0, 1}: the exact defect pixels (all zeros for a good image).
        ellipse: ``H x W`` float32 {0, 1}: a DAGM-style filled ellipse enclosing the mask,
            looser than it (all zeros for a good image).
        defect: the defect type or ``None`` for a good image.
        kind: the texture class.
        seed: the seed it was made from.
        clean: the defect-free texture the defect was painted on (same quantisation).
        ellipse_params: ``(cx, cy, a, b, angle_deg)`` of the ellipse (semi-axes), or ``None``.
    """

    image: np.ndarray
    mask: np.ndarray
    ellipse: np.ndarray
    defect: str | None
    kind: str = ""
    seed: int = 0
    clean: np.ndarray | None = None
    ellipse_params: tuple[float, float, float, float, float] | None = field(default=None)

    @property
    def label(self) -> int:
        """1 when a defect was painted, else 0."""
        return 0 if self.defect is None else 1


# --------------------------------------------------------------------------------------------
# textures
# --------------------------------------------------------------------------------------------


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        h, w = int(size[0]), int(size[1])
    else:
        h = w = int(size)
    if h < 16 or w < 16:
        raise ValueError(f"synthetic images must be at least 16 x 16 pixels, got {h} x {w}")
    return h, w


def _seed_seq(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth value noise: a (cells+1)^2 random grid upsampled bicubically to h x w."""
    cy = max(2, int(round(cells * h / max(h, w)))) + 1
    cx = max(2, int(round(cells * w / max(h, w)))) + 1
    g = rng.standard_normal((cy, cx)).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _standardise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    s = float(x.std())
    y = (x - float(x.mean())) / (s if s > 1e-8 else 1.0)
    return (y * std + mean).astype(np.float32)


def _line_kernel(length: int, angle_deg: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2.0
    t = np.deg2rad(angle_deg)
    dx, dy = np.cos(t) * c, np.sin(t) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1)
    return k / k.sum()


def _texture_float(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    s = max(h, w)
    if kind == "fibrous":  # brushed metal / fibres: white noise smeared along one direction
        n = rng.standard_normal((h, w)).astype(np.float32)
        length = max(7, (s // 10) | 1)
        ang = 18.0 + float(rng.uniform(-3.0, 3.0))
        t = cv2.filter2D(n, -1, _line_kernel(length, ang), borderType=cv2.BORDER_REFLECT)
        t = _standardise(t, 0.0, 1.0) + 0.35 * _standardise(_lowfreq(rng, h, w, 4), 0.0, 1.0)
        return _standardise(t, 0.5, 0.11)
    if kind == "granular":  # sand paper: fine grain on a slowly varying base
        n = rng.standard_normal((h, w)).astype(np.float32)
        t = cv2.GaussianBlur(n, (0, 0), 0.8)
        t = _standardise(t, 0.0, 1.0) + 0.45 * _standardise(_lowfreq(rng, h, w, 6), 0.0, 1.0)
        return _standardise(t, 0.5, 0.1)
    if kind == "cloud":  # blotchy: multi-octave value noise
        t = np.zeros((h, w), np.float32)
        for i, cells in enumerate((3, 6, 12, 24, 48)):
            t += (0.55**i) * _lowfreq(rng, h, w, cells)
        return _standardise(t, 0.5, 0.12)
    if kind == "woven":  # regular over-under weave of threads, slightly warped
        period = max(6.0, s / 18.0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        amp = period * 0.08
        xw = xx + amp * _standardise(_lowfreq(rng, h, w, 5), 0.0, 1.0)
        yw = yy + amp * _standardise(_lowfreq(rng, h, w, 5), 0.0, 1.0)
        fx, fy = xw / period, yw / period
        over = (np.floor(fx) + np.floor(fy)) % 2 == 0
        hprof = np.sin(np.pi * (fy % 1.0)) ** 0.7  # a horizontal thread across the cell
        vprof = np.sin(np.pi * (fx % 1.0)) ** 0.7
        t = np.where(over, hprof * (0.85 + 0.15 * np.cos(2 * np.pi * fx)),
                     vprof * (0.85 + 0.15 * np.cos(2 * np.pi * fy))).astype(np.float32)
        t += 0.12 * rng.standard_normal((h, w)).astype(np.float32)
        return _standardise(t, 0.5, 0.13)
    if kind == "speckle":  # smooth base with sparse dark and bright grains
        t = _standardise(_lowfreq(rng, h, w, 4), 0.0, 1.0) * 0.5
        u = rng.random((h, w), dtype=np.float32)
        dark = (u < 0.004).astype(np.uint8)
        bright = (u > 0.996).astype(np.uint8)
        ker = np.ones((2, 2), np.uint8)
        t -= 2.5 * cv2.dilate(dark, ker).astype(np.float32)
        t += 2.5 * cv2.dilate(bright, ker).astype(np.float32)
        t += 0.25 * rng.standard_normal((h, w)).astype(np.float32)
        return _standardise(cv2.GaussianBlur(t, (0, 0), 0.6), 0.5, 0.1)
    raise ValueError(f"unknown texture kind {kind!r}; choose one of {', '.join(TEXTURES)}")


def _quantise(x: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def generate_texture(kind: str, size: int | tuple[int, int] = 256, seed: int = 0) -> np.ndarray:
    """A defect-free grey texture, ``H x W`` float32 in [0.06, 0.94] on 8-bit levels.

    ``kind`` is one of :data:`TEXTURES` (``fibrous``, ``granular``, ``cloud``, ``woven``,
    ``speckle``); each class has fixed statistics, the seed draws the instance. The range is kept
    away from 0 and 1 so that dark and bright defects always change the pixels they cover.
    """
    if kind not in TEXTURES:
        raise ValueError(f"unknown texture kind {kind!r}; choose one of {', '.join(TEXTURES)}")
    h, w = _hw(size)
    rng = _seed_seq(seed, 1 + TEXTURES.index(kind))
    t = _texture_float(kind, h, w, rng)
    return _quantise(np.clip(t, 0.06, 0.94))


# --------------------------------------------------------------------------------------------
# defects
# --------------------------------------------------------------------------------------------


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, r: float, aspect: float,
                  angle: float, wobble: float) -> np.ndarray:
    th = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    rad = np.ones_like(th)
    for k in (2, 3, 4, 5):
        rad += wobble / k * rng.uniform(-1.0, 1.0) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    x = r * rad * np.cos(th)
    y = r * aspect * rad * np.sin(th)
    ca, sa = np.cos(angle), np.sin(angle)
    px = cx + ca * x - sa * y
    py = cy + sa * x + ca * y
    return np.stack([px, py], axis=1).round().astype(np.int32)


def _fill(h: int, w: int, poly: np.ndarray) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [poly], 1, lineType=cv2.LINE_8)
    return m.astype(bool)


def _random_blob(rng: np.random.Generator, h: int, w: int, r: float, margin: float, aspect: tuple[float, float],
                 jag: float) -> tuple[np.ndarray, float, float]:
    """A filled random blob of radius ``r`` centred at least ``margin * r`` from the border:
    (mask, cx, cy)."""
    cx = rng.uniform(r * margin, w - r * margin)
    cy = rng.uniform(r * margin, h - r * margin)
    mask = _fill(h, w, _blob_polygon(rng, cx, cy, r, rng.uniform(*aspect), rng.uniform(0, np.pi), jag))
    return mask, cx, cy


def _sign(rng: np.random.Generator) -> float:
    return -1.0 if rng.random() < 0.5 else 1.0


def make_defect(texture: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect on ``texture``; returns ``(image, mask)``.

    The image equals the texture exactly outside the mask, and the mask is the set of pixels the
    defect covers (the exact ground truth). Types: ``scratch`` (thin curved line), ``spot``
    (small irregular dark/bright blob), ``blur`` (texture detail lost in a region, with a slight
    shift), ``stain`` (large soft irregular intensity change that keeps the texture).
    """
    h, w = texture.shape
    s = min(h, w)
    t = texture.astype(np.float32)
    if defect == "scratch":
        length = s * rng.uniform(0.3, 0.6)
        ang = rng.uniform(0, np.pi)
        cx = rng.uniform(0.2 * w + 0.0, 0.8 * w)
        cy = rng.uniform(0.2 * h + 0.0, 0.8 * h)
        d = np.array([np.cos(ang), np.sin(ang)])
        nrm = np.array([-d[1], d[0]])
        p0 = np.array([cx, cy]) - d * length / 2
        p2 = np.array([cx, cy]) + d * length / 2
        p1 = np.array([cx, cy]) + nrm * length * rng.uniform(-0.25, 0.25)
        u = np.linspace(0.0, 1.0, 40)[:, None]
        pts = (1 - u) ** 2 * p0 + 2 * (1 - u) * u * p1 + u**2 * p2
        pts[:, 0] = np.clip(pts[:, 0], 1, w - 2)
        pts[:, 1] = np.clip(pts[:, 1], 1, h - 2)
        thick = max(1, int(round(s / 128 * rng.uniform(1.0, 2.0))))
        m8 = np.zeros((h, w), np.uint8)
        cv2.polylines(m8, [pts.round().astype(np.int32)], False, 1, thick, lineType=cv2.LINE_8)
        mask = m8.astype(bool)
        delta = _sign(rng) * rng.uniform(0.28, 0.42)
        out = np.where(mask, t + delta, t)
    elif defect == "spot":
        r = s * rng.uniform(0.03, 0.07)
        mask, cx, cy = _random_blob(rng, h, w, r, 2, (0.6, 1.0), 0.35)
        delta = _sign(rng) * rng.uniform(0.25, 0.4)
        yy = np.arange(h, dtype=np.float32)[:, None] - np.float32(cy)
        xx = np.arange(w, dtype=np.float32)[None, :] - np.float32(cx)
        prof = 1.0 - 0.3 * np.clip(np.sqrt(xx * xx + yy * yy) / np.float32(1.4 * r), 0.0, 1.0)
        out = np.where(mask, t + delta * prof, t)
    elif defect == "blur":
        r = s * rng.uniform(0.08, 0.14)
        mask, _, _ = _random_blob(rng, h, w, r, 1.6, (0.5, 0.9), 0.25)
        blurred = cv2.GaussianBlur(t, (0, 0), max(2.0, s / 48.0))
        shift = _sign(rng) * rng.uniform(0.08, 0.14)
        out = np.where(mask, blurred + shift, t)
    elif defect == "stain":
        r = s * rng.uniform(0.1, 0.17)
        mask, _, _ = _random_blob(rng, h, w, r, 1.6, (0.55, 1.0), 0.6)
        inner = _lowfreq(rng, h, w, 8)
        inner = (inner - inner.min()) / max(1e-6, float(inner.max() - inner.min()))
        alpha = 0.55 + 0.45 * inner
        delta = _sign(rng) * rng.uniform(0.16, 0.26)
        out = np.where(mask, t + alpha * delta, t)
    else:
        raise ValueError(f"unknown defect {defect!r}; choose one of {', '.join(DEFECTS)} or None")
    img = _quantise(np.clip(out, 0.0, 1.0))
    # exact mask: the covered region (outside it nothing changed, by construction)
    return img, mask.astype(np.float32)


def ellipse_label(mask: np.ndarray, rng: np.random.Generator | None = None,
                  looseness: tuple[float, float] = (1.1, 1.4), min_axis: float | None = None
                  ) -> tuple[np.ndarray, tuple[float, float, float, float, float] | None]:
    """A DAGM-style weak label: a filled ellipse that encloses every pixel of ``mask``.

    The ellipse is oriented along the mask's principal axis, circumscribes its extent, is
    enlarged by a random factor in ``looseness`` and its centre jittered (then grown again until
    every mask pixel is inside), like the hand-drawn ellipses of DAGM 2007. Returns the
    ``H x W`` float32 {0,1} ellipse and its ``(cx, cy, a, b, angle_deg)``; an empty mask gives
    zeros and ``None``.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    h, w = mask.shape
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return np.zeros((h, w), np.float32), None
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    c = pts.mean(axis=0)
    cov = np.cov((pts - c).T) if len(pts) > 1 else np.eye(2)
    evals, evecs = np.linalg.eigh(cov + 1e-9 * np.eye(2))
    u = evecs[:, 1]  # major direction
    v = np.array([-u[1], u[0]])
    # pixel corners so the rasterised square pixels are inside, not only their centres
    corners = (pts[:, None, :] + np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])[None]).reshape(-1, 2)
    du, dv = (corners - c) @ u, (corners - c) @ v
    cu = 0.5 * (du.max() + du.min())
    cv_ = 0.5 * (dv.max() + dv.min())
    c = c + cu * u + cv_ * v
    half_u = 0.5 * (du.max() - du.min())
    half_v = 0.5 * (dv.max() - dv.min())
    s = min(h, w)
    min_axis = float(min_axis if min_axis is not None else max(3.0, s / 40.0))
    a0 = max(half_u * np.sqrt(2.0), min_axis)
    b0 = max(half_v * np.sqrt(2.0), min_axis, 0.22 * a0)
    # jitter the centre a little, as a hand-drawn ellipse would be
    c = c + rng.uniform(-0.12, 0.12) * a0 * u + rng.uniform(-0.12, 0.12) * b0 * v
    du, dv = (corners - c) @ u, (corners - c) @ v
    need = float(np.sqrt((du / a0) ** 2 + (dv / b0) ** 2).max())
    k = max(need, 1.0) * rng.uniform(*looseness)
    a, b = a0 * k + 1.0, b0 * k + 1.0
    angle = float(np.degrees(np.arctan2(u[1], u[0])))
    m = mask > 0
    for _ in range(20):
        e8 = np.zeros((h, w), np.uint8)
        # cv2.ellipse takes integer geometry; use the fixed-point shift for sub-pixel accuracy
        sh = 4
        cv2.ellipse(e8, (int(round(c[0] * 2**sh)), int(round(c[1] * 2**sh))),
                    (int(round(a * 2**sh)), int(round(b * 2**sh))), angle, 0, 360, 1, -1,
                    lineType=cv2.LINE_8, shift=sh)
        if np.all(e8[m] > 0):
            break
        a, b = a + 1.0, b + 1.0
    return e8.astype(np.float32), (float(c[0]), float(c[1]), float(a), float(b), angle)


def make_sample(kind: str, size: int | tuple[int, int] = 256, seed: int = 0,
                defect: str | None = None) -> SyntheticSample:
    """One synthetic image: texture ``kind`` from ``seed``, with ``defect`` painted if not None.

    The clean texture is exactly :func:`generate_texture` ``(kind, size, seed)``; the defect and
    its ellipse come from an independent stream of the same seed, so the result is a pure
    function of ``(kind, size, seed, defect)``.
    """
    clean = generate_texture(kind, size, seed)
    h, w = clean.shape
    if defect is None:
        z = np.zeros((h, w), np.float32)
        return SyntheticSample(clean.copy(), z, z.copy(), None, kind, int(seed), clean, None)
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; choose one of {', '.join(DEFECTS)} or None")
    rng = _seed_seq(seed, 101 + DEFECTS.index(defect), 1 + TEXTURES.index(kind))
    img, mask = make_defect(clean, defect, rng)
    ell, params = ellipse_label(mask, rng)
    return SyntheticSample(img, mask, ell, defect, kind, int(seed), clean, params)


# --------------------------------------------------------------------------------------------
# writing data sets
# --------------------------------------------------------------------------------------------


def _item_seed(seed: int, kind_i: int, split_code: int, i: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, kind_i, split_code, i]).generate_state(1)[0])


def write_dataset(root: str | os.PathLike[str], kinds: Sequence[str] = ("fibrous", "granular"),
                  n_train: int = 8, n_test_good: int = 4, n_test_defect: int = 2,
                  size: int | tuple[int, int] = 256, seed: int = 0, layout: str = "mvtec",
                  defects: Sequence[str] = DEFECTS) -> Path:
    """Write a synthetic data set that the :mod:`ccad.data.layouts` loaders read back.

    Args:
        root: output folder (created).
        kinds: texture classes, one category (MVTec) or one ``ClassN`` (DAGM) each, in order.
        n_train: good training images per category.
        n_test_good: good test images per category.
        n_test_defect: defective test images per category *and defect type*.
        size: image size (int or ``(H, W)``).
        seed: master seed; the whole folder is a pure function of the arguments.
        layout: ``"mvtec"``: ``<kind>/train/good/000.png``, ``<kind>/test/{good,<defect>}/000.png``,
            ``<kind>/ground_truth/<defect>/000_mask.png`` (exact masks) and the ellipse weak
            labels in ``<kind>/weak_labels/<defect>/000_ellipse.png``.
            ``"dagm"``: the published DAGM 2007 layout, ``ClassN/{Train,Test}/0001.PNG`` with
            ``Label/Labels.txt`` and ``Label/<stem>_label.PNG`` ellipses, plus the exact masks in
            ``ClassN/Test/Exact/<stem>_mask.PNG``. ``"dagm_ccad"``: CCAD's re-annotated layout
            ``ClassN_<kind>/train/good``, ``test/{good,anomal}``,
            ``ground_truth/anomal/<stem>_mask.png`` (exact masks).
        defects: defect types to paint.

    A ``synthetic.json`` at the root records the arguments and, per written image, its
    category, split, defect type and seed. Returns ``Path(root)``.
    """
    root_p = Path(root)
    for k in kinds:
        if k not in TEXTURES:
            raise ValueError(f"unknown texture kind {k!r}; choose from {', '.join(TEXTURES)}")
    for d in defects:
        if d not in DEFECTS:
            raise ValueError(f"unknown defect {d!r}; choose from {', '.join(DEFECTS)}")
    if layout not in ("mvtec", "dagm", "dagm_ccad"):
        raise ValueError(f"unknown layout {layout!r}; choose 'mvtec', 'dagm' or 'dagm_ccad'")
    root_p.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []

    for ki, kind in enumerate(kinds):
        tki = TEXTURES.index(kind)
        train = [(None, _item_seed(seed, tki, 0, i)) for i in range(n_train)]
        test_good = [(None, _item_seed(seed, tki, 1, i)) for i in range(n_test_good)]
        test_def = [(d, _item_seed(seed, tki, 2 + DEFECTS.index(d), i))
                    for d in defects for i in range(n_test_defect)]
        if layout == "mvtec":
            cat = root_p / kind
            for i, (_, sd) in enumerate(train):
                p = save_image(cat / "train" / "good" / f"{i:03d}.png", make_sample(kind, size, sd).image)
                records.append(dict(image=str(p.relative_to(root_p)),
                                    category=kind, split="train", defect=None, seed=sd))
            for i, (_, sd) in enumerate(test_good):
                p = save_image(cat / "test" / "good" / f"{i:03d}.png", make_sample(kind, size, sd).image)
                records.append(dict(image=str(p.relative_to(root_p)),
                                    category=kind, split="test", defect=None, seed=sd))
            counters: dict[str, int] = {}
            for d, sd in test_def:
                i = counters.get(d, 0)
                counters[d] = i + 1
                smp = make_sample(kind, size, sd, d)
                p = save_image(cat / "test" / d / f"{i:03d}.png", smp.image)
                save_mask(cat / "ground_truth" / d / f"{i:03d}_mask.png", smp.mask)
                save_mask(cat / "weak_labels" / d / f"{i:03d}_ellipse.png", smp.ellipse)
                records.append(dict(image=str(p.relative_to(root_p)), category=kind, split="test", defect=d, seed=sd))
        elif layout == "dagm":
            cls = root_p / f"Class{ki + 1}"
            _write_dagm_split(cls / "Train", kind, size, train, records, root_p, "train")
            order = list(test_good) + list(test_def)
            perm = _seed_seq(seed, tki, 99).permutation(len(order))
            _write_dagm_split(cls / "Test", kind, size, [order[j] for j in perm], records, root_p, "test")
        else:  # dagm_ccad
            cls = root_p / f"Class{ki + 1}_{kind}"
            for i, (_, sd) in enumerate(train):
                p = save_image(cls / "train" / "good" / f"{i:04d}.png", make_sample(kind, size, sd).image)
                records.append(dict(image=str(p.relative_to(root_p)),
                                    category=cls.name, split="train", defect=None, seed=sd))
            for i, (_, sd) in enumerate(test_good):
                p = save_image(cls / "test" / "good" / f"{i:04d}.png", make_sample(kind, size, sd).image)
                records.append(dict(image=str(p.relative_to(root_p)),
                                    category=cls.name, split="test", defect=None, seed=sd))
            for i, (d, sd) in enumerate(test_def):
                smp = make_sample(kind, size, sd, d)
                p = save_image(cls / "test" / "anomal" / f"{i:04d}.png", smp.image)
                save_mask(cls / "ground_truth" / "anomal" / f"{i:04d}_mask.png", smp.mask)
                records.append(dict(image=str(p.relative_to(root_p)),
                                    category=cls.name, split="test", defect=d, seed=sd))

    meta = dict(
        generator="ccad.data.synthetic", layout=layout, kinds=list(kinds), defects=list(defects),
        n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect,
        size=list(_hw(size)), seed=seed, images=records,
    )
    (root_p / "synthetic.json").write_text(json.dumps(meta, indent=1))
    return root_p


def _write_dagm_split(folder: Path, kind: str, size: int | tuple[int, int],
                      items: Sequence[tuple[str | None, int]], records: list[dict],
                      root: Path, split: str) -> None:
    """One DAGM ``Train`` or ``Test`` folder: images, ``Label/Labels.txt``, ellipses, exact masks."""
    lines = ["1"]  # the published files start with a one-line header
    for i, (d, sd) in enumerate(items):
        stem = f"{i + 1:04d}"
        smp = make_sample(kind, size, sd, d)
        p = save_image(folder / f"{stem}.PNG", smp.image)
        if d is None:
            lines.append(f"{i + 1}\t0\t{stem}.PNG\t0\t0")
        else:
            save_mask(folder / "Label" / f"{stem}_label.PNG", smp.ellipse)
            save_mask(folder / "Exact" / f"{stem}_mask.PNG", smp.mask)
            lines.append(f"{i + 1}\t1\t{stem}.PNG\t1\t{stem}_label.PNG")
        records.append(dict(image=str(p.relative_to(root)), category=folder.parent.name,
                            split=split, defect=d, seed=sd))
    (folder / "Label").mkdir(parents=True, exist_ok=True)
    (folder / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
