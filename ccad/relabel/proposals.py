"""Tight-mask proposals for weak DAGM ellipse labels (CCAD Sec. 4.2, App. D.7).

:func:`propose_mask` turns an ellipse label into a tight mask proposal from two cues, the
model's anomaly map (the eq. 16 map of the detector, when one is loaded) and the image itself
(the defect deviates from the surrounding texture, :func:`image_cues`), refined with OpenCV
GrabCut seeded by the ellipse (outside = sure background).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["ProposalSettings", "image_cues", "propose_mask"]


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2) if image.shape[2] >= 3 else image[..., 0]
    if image.size and image.max() > 1.0:  # uint8-range floats
        image = image / 255.0
    return image


@dataclass
class ProposalSettings:
    """Knobs of :func:`propose_mask` (defaults tuned on the synthetic DAGM-style set).

    smooth_sigma: Gaussian sigma (px) of the intensity cue; texture_sigma: window sigma of the
    local-contrast (texture) cue; ring_quantile: the quantile of a cue in the ring around the
    ellipse that maps to 1.0 (normal texture stays below it); min_cue: a pixel needs this
    normalised cue to be a seed at all; grabcut_iters: GrabCut iterations (0 disables it);
    map_weight: how strongly the anomaly map re-weights the image cue (0 = not at all);
    map_select: the map replaces the image cue when ``map_select`` x its contrast exceeds the
    image cue's (0 disables); gc_input: the channels GrabCut models; line_angles /
    line_length: orientations and length (fraction of the ellipse extent) of the line cue.
    """

    smooth_sigma: float = 1.0
    texture_sigma: float = 2.0
    ring_quantile: float = 0.99
    min_cue: float = 1.0
    grabcut_iters: int = 4
    map_weight: float = 1.0
    min_component: int = 6
    peak_fraction: float = 0.5
    cue_blur: float = 0.7
    threshold: str = "otsu"
    strong_fraction: float = 0.7
    bg_fraction: float = 0.0
    gc_input: str = "cues"
    line_angles: int = 12
    map_select: float = 0.15
    line_length: float = 0.2


def _normalised_blur(values: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised convolution: a Gaussian average of ``values`` over the pixels where
    ``weight`` is 1, so the defect inside the ellipse does not leak into its own background."""
    w = weight.astype(np.float32)
    num = cv2.GaussianBlur(values * w, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    den = cv2.GaussianBlur(w, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    fallback = float(np.median(values[weight > 0])) if np.any(weight > 0) else float(np.median(values))
    out = np.full_like(values, fallback)
    ok = den > 1e-4
    out[ok] = num[ok] / den[ok]
    return out


def _ring(ellipse: np.ndarray) -> np.ndarray:
    area = int(ellipse.sum())
    r = int(np.clip(0.35 * np.sqrt(max(area, 1)), 6, 40))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    ring = cv2.dilate(ellipse.astype(np.uint8), k) > 0
    return ring & ~ellipse


def _standardise(cue: np.ndarray, ring: np.ndarray, inside: np.ndarray, quantile: float,
                 two_sided: bool, floor: float = 1e-6) -> np.ndarray:
    """Centre a cue on its ring median and scale so the ring's ``quantile`` of |cue| is 1.

    ``floor`` is the smallest scale (e.g. one 8-bit grey level): on a flat surface rounding
    noise must not become a strong cue."""
    ref = cue[ring] if ring.any() else cue[inside]
    med = float(np.median(ref))
    dev = cue - med
    if two_sided:
        dev = np.abs(dev)
    scale = float(np.quantile(np.abs(ref - med), quantile)) if ref.size else 0.0
    scale = max(scale, float(floor))
    return np.maximum(dev / scale, 0.0).astype(np.float32)


def image_cues(grey: np.ndarray, ellipse: np.ndarray, settings: ProposalSettings | None = None
               ) -> dict[str, np.ndarray]:
    """Image-only defect cues inside an ellipse (no model needed).

    Returns ``{"intensity", "texture", "line", "ring"}``: the intensity cue is
    ``|G_s * I - B|`` with ``B`` the normalised-convolution background estimated from outside
    the ellipse; the texture cue is ``|log sigma_loc - B_sigma|`` with ``sigma_loc`` the local
    standard deviation (DAGM class-1 defects are texture loss); the line cue is the largest
    response of oriented line-averaging filters to ``I - B`` (thin scratches of classes 2/3 in
    a streaky texture), each orientation standardised on its own so that the texture's own
    streak direction does not dominate. Every cue is standardised on the ring around the
    ellipse so normal texture maps below 1.
    """
    s = settings or ProposalSettings()
    g = _grey(grey).astype(np.float32)
    ellipse = np.asarray(ellipse) > 0
    ring = _ring(ellipse)
    outside = ~ellipse
    bg_sigma = float(np.clip(0.5 * np.sqrt(max(int(ellipse.sum()), 1)), 4, 40))
    gs = cv2.GaussianBlur(g, (0, 0), s.smooth_sigma)
    d_int = gs - _normalised_blur(gs, outside, bg_sigma)
    mu = cv2.GaussianBlur(g, (0, 0), s.texture_sigma)
    var = np.maximum(cv2.GaussianBlur(g * g, (0, 0), s.texture_sigma) - mu * mu, 0.0)
    logsd = np.log(np.sqrt(var) + 1e-3)
    d_tex = logsd - _normalised_blur(logsd, outside, bg_sigma)
    out = {
        "intensity": _standardise(d_int, ring, ellipse, s.ring_quantile, True, 2.0 / 255),
        "texture": _standardise(d_tex, ring, ellipse, s.ring_quantile, True, 0.1),
        "ring": ring,
    }
    if s.line_angles > 0:
        d0 = g - _normalised_blur(g, outside, bg_sigma)
        ys, xs = np.nonzero(ellipse) if ellipse.any() else (np.array([0]), np.array([0]))
        extent = max(int(np.ptp(ys)) + 1, int(np.ptp(xs)) + 1)
        length = int(np.clip(s.line_length * extent, 7, 31)) | 1
        line = np.zeros_like(g)
        for k in range(s.line_angles):
            r = _standardise(cv2.filter2D(d0, -1, _line_kernel(length, np.pi * k / s.line_angles)),
                             ring, ellipse, s.ring_quantile, True, 2.0 / 255)
            np.maximum(line, r, out=line)
        out["line"] = line
    return out


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """A normalised 1-px line of ``length`` at ``angle`` (radians), for oriented averaging."""
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2.0
    dx, dy = c * np.cos(angle), c * np.sin(angle)
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))),
             1.0, 1, lineType=cv2.LINE_8)
    return k / max(float(k.sum()), 1.0)


def _otsu(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float32).ravel()
    if v.size == 0:
        return 0.0
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-8:
        return hi
    u8 = np.clip((v - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8).reshape(-1, 1)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return lo + float(t) / 255.0 * (hi - lo)


def _clean(mask: np.ndarray, seeds: np.ndarray, min_component: int) -> np.ndarray:
    """Keep the connected components of ``mask`` that touch a seed and are not specks."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    seeded = np.unique(lab[seeds & mask])
    keep[seeded] = True
    keep[0] = False
    keep &= stats[:, cv2.CC_STAT_AREA] >= min_component
    return keep[lab]


def propose_mask(image: np.ndarray, ellipse: np.ndarray, anomaly_map: np.ndarray | None = None,
                 settings: ProposalSettings | None = None) -> np.ndarray:
    """Propose a tight defect mask inside a weak ellipse label (CCAD Sec. 4.2 re-annotation).

    Steps: (1) cues inside the ellipse, each standardised on a ring around it so that normal
    texture stays below 1: the image cues of :func:`image_cues` (intensity, texture loss,
    oriented lines), of which the one that stands out most (99.5 % quantile) is kept, and the
    detector's anomaly map (eq. 16; optional), which re-weights that cue by the model's
    agreement, or replaces it where the image shows nothing or far less than the model;
    (2) seeds are the pixels above both the cue's Otsu threshold inside the ellipse and
    ``min_cue``; (3) GrabCut
    (``cv2.grabCut``, mask init) on a cue image with outside-ellipse = sure background, inside =
    probable background, seeds = probable foreground, strong seeds = sure foreground; (4) the
    result is constrained to the ellipse and cleaned (components touching a seed). When GrabCut
    fails or collapses, the cleaned seed mask is returned; with no cue above normal texture at
    all (a uniform region) the ellipse itself is returned unchanged.

    Args:
        image: ``H x W`` or ``H x W x C``, float in [0, 1] (uint8 range accepted).
        ellipse: ``H x W`` bool, the weak label.
        anomaly_map: ``H x W`` float at the image's size, or None (image cue only).
    Returns:
        ``H x W`` bool, a subset of ``ellipse``.
    """
    s = settings or ProposalSettings()
    grey = _grey(image)
    ellipse = np.asarray(ellipse) > 0
    if ellipse.shape != grey.shape:
        raise ValueError(f"propose_mask: ellipse shape {ellipse.shape} != image shape {grey.shape}")
    if not ellipse.any():
        return np.zeros_like(ellipse)
    if anomaly_map is not None:
        anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
        if anomaly_map.ndim == 3:
            anomaly_map = anomaly_map.squeeze()
        if anomaly_map.shape != grey.shape:
            anomaly_map = cv2.resize(anomaly_map, (grey.shape[1], grey.shape[0]),
                                     interpolation=cv2.INTER_LINEAR)

    # Work on a crop around the ellipse (GrabCut cost scales with pixels).
    ys, xs = np.nonzero(ellipse)
    h, w = grey.shape
    pad = int(np.clip(0.5 * max(np.ptp(ys) + 1, np.ptp(xs) + 1), 16, 96))
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, h)
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)
    g = grey[y0:y1, x0:x1]
    e = ellipse[y0:y1, x0:x1]

    cues = image_cues(g, e, s)
    ring = cues["ring"]
    cand = {k: cues[k] for k in ("intensity", "texture", "line") if k in cues}
    if s.cue_blur > 0:
        cand = {k: cv2.GaussianBlur(v, (0, 0), s.cue_blur) for k, v in cand.items()}
    # Pick the image cue that stands out most above normal texture inside the ellipse.
    contrast = {k: float(np.quantile(v[e], 0.995)) for k, v in cand.items()}
    best = max(contrast, key=contrast.get)
    combined = cand[best]
    if anomaly_map is not None:
        m = anomaly_map[y0:y1, x0:x1]
        if np.isfinite(m).all() and float(m.max() - m.min()) > 1e-12:
            m_cue = _standardise(m, ring, e, s.ring_quantile, False,
                                 1e-3 * float(np.ptp(anomaly_map)))
            m_in = m_cue[e]
            m_rel = np.clip((m_cue - float(m_in.min())) / max(float(m_in.max() - m_in.min()), 1e-6), 0, 1)
            m_contrast = float(np.quantile(m_in, 0.995))
            if contrast[best] < 1.5 and m_contrast > 1.5:
                combined = s.map_weight * m_cue  # the image shows nothing, the model does
            elif s.map_select > 0 and s.map_select * m_contrast > contrast[best]:
                combined = m_cue  # the model's evidence is far stronger than the image's
            else:  # weigh image evidence by the model's agreement
                combined = combined * (1.0 - 0.5 * s.map_weight + s.map_weight * m_rel)
    inside = combined[e]
    peak = float(inside.max())
    otsu = _otsu(inside)
    if s.threshold == "otsu":
        t = otsu
    elif s.threshold == "halfmax":
        t = s.peak_fraction * peak
    elif s.threshold == "min":
        t = min(otsu, s.peak_fraction * peak)
    elif s.threshold == "mean":
        t = 0.5 * (otsu + s.peak_fraction * peak)
    else:
        t = max(otsu, s.peak_fraction * peak)
    t = max(t, s.min_cue)
    seeds = (combined > t) & e
    if seeds.sum() < s.min_component:
        return ellipse.copy()  # no evidence above normal texture: keep the label as it is
    cleaned = _clean(seeds, seeds, s.min_component)
    if cleaned.any():
        seeds = cleaned
    strong = seeds & (combined > max(t, s.strong_fraction * peak))
    weak = e & (combined < s.bg_fraction * t)
    fallback = seeds
    result = fallback
    if s.grabcut_iters > 0:
        gc_mask = np.full(e.shape, cv2.GC_BGD, np.uint8)
        gc_mask[e] = cv2.GC_PR_BGD
        gc_mask[weak] = cv2.GC_BGD
        gc_mask[seeds] = cv2.GC_PR_FGD
        gc_mask[strong] = cv2.GC_FGD
        cue_u8 = np.clip(combined / max(float(np.quantile(inside, 0.995)), 1e-6) * 255, 0, 255)
        gs = cv2.GaussianBlur(g, (0, 0), s.smooth_sigma)
        gs_u8 = np.clip((gs - gs.min()) / max(float(gs.max() - gs.min()), 1e-6) * 255, 0, 255)
        tex_u8 = np.clip(cand["texture"] * 64.0, 0, 255)
        int_u8 = np.clip(cand["intensity"] * 64.0, 0, 255)
        chans = {"default": [cue_u8, gs_u8, tex_u8], "cue": [cue_u8, cue_u8, cue_u8],
                 "cues": [cue_u8, int_u8, tex_u8], "grey": [gs_u8, gs_u8, gs_u8]}[s.gc_input]
        gc_img = np.ascontiguousarray(np.stack(chans, axis=2).astype(np.uint8))
        try:
            bgd = np.zeros((1, 65), np.float64)
            fgd = np.zeros((1, 65), np.float64)
            cv2.grabCut(gc_img, gc_mask, None, bgd, fgd, int(s.grabcut_iters),
                        cv2.GC_INIT_WITH_MASK)
            gc = ((gc_mask == cv2.GC_FGD) | (gc_mask == cv2.GC_PR_FGD)) & e
            gc = _clean(gc, seeds, s.min_component)
            area, e_area, seed_area = int(gc.sum()), int(e.sum()), int(fallback.sum())
            # GrabCut collapsed (nothing) or flooded the ellipse: keep the seed mask.
            if area >= max(s.min_component, seed_area // 4) and area < 0.97 * e_area:
                result = gc
        except cv2.error:
            result = fallback
    if not result.any():
        return ellipse.copy()
    out = np.zeros_like(ellipse)
    out[y0:y1, x0:x1] = result
    return out & ellipse
