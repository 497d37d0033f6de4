"""Input vs reconstruction -> anomaly map -> image score.

Implements CCAD eq. 16: ``M = sum_l up(1 - cos(psi_l(x), psi_l(x_hat)))``, Gaussian-smoothed,
plus DDAD's optional pixel term ``v * (max f_d / max p_d) * p_d`` (METHOD.md item 6).
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


class LayerExtractor(Protocol):
    def layer_maps(self, x: torch.Tensor) -> list[torch.Tensor]: ...


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``B x 1 x H x W`` maps (reflect padding); sigma <= 0 is a no-op."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    if torch.jit.is_tracing():  # ONNX export: the kernel as a constant of known shape (same values)
        k = torch.tensor(k.tolist(), dtype=maps.dtype, device=maps.device)
    r = (k.numel() - 1) // 2
    c = int(maps.shape[1])
    h, w = maps.shape[-2:]
    mode = "reflect" if r < min(h, w) else "replicate"
    out = F.pad(maps, (r, r, 0, 0), mode=mode)
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, r, r), mode=mode)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def scaled_sigma(sigma: float, size: int, reference: int = 256) -> float:
    """Sigma is given in pixels of a 256 x 256 image (the papers' setting) and scaled to ``size``."""
    return float(sigma) * float(size) / float(reference)


def neighbourhood_cosine_distance(a: torch.Tensor, b: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """``1 - max over the (2r+1)^2 window around (i, j) of cos(a^(i,j), b^(u,v))``, ``B x 1 x h x w``.

    The local form of GLAD eq. 11 (which takes the minimum over all locations): a reconstruction
    that is right but shifted by a pixel or two is not scored as an anomaly."""
    r = int(radius)
    n, c, h, w = a.shape
    an = F.normalize(a.float(), dim=1, eps=1e-6).view(n, c, 1, h * w)
    bn = F.unfold(F.normalize(b.float(), dim=1, eps=1e-6), kernel_size=2 * r + 1, padding=r)
    sim = (an * bn.view(n, c, (2 * r + 1) ** 2, h * w)).sum(1)  # B x k^2 x hw (0 outside the image)
    return (1.0 - sim.amax(1)).view(n, 1, h, w)


def min_cosine_distance_map(f_t: torch.Tensor, f_r: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """GLAD (papers/glad.md) eq. 11: ``M^(i,j) = min over all locations (u, v) of 1 - cos(F_t^(i,j), F_r^(u,v))``.

    ``f_t`` (test image) and ``f_r`` (reconstruction) are ``B x C x h x w`` maps of one layer;
    returns ``B x 1 x h x w``. The similarity matrix is computed ``chunk`` query locations at a
    time (a 64 x 64 grid would otherwise be a 4096 x 4096 matrix per image)."""
    b, c, h, w = f_t.shape
    a = F.normalize(f_t.float().flatten(2), dim=1, eps=1e-6)  # B x C x N
    r = F.normalize(f_r.float().flatten(2), dim=1, eps=1e-6)  # B x C x M
    out = []
    for s in range(0, a.shape[-1], int(chunk)):
        sim = torch.bmm(a[:, :, s:s + int(chunk)].transpose(1, 2), r)  # B x n x M
        out.append(1.0 - sim.amax(-1))
    return torch.cat(out, dim=1).view(b, 1, h, w)


def layer_distance(a: torch.Tensor, b: torch.Tensor, match: str = "same", radius: int = 1) -> torch.Tensor:
    """Cosine distance map of one layer's features ``B x C x h x w`` -> ``B x 1 x h x w``.

    ``same``: at the same location (CCAD eq. 16); ``neighbourhood``: the best match within
    ``radius``; ``all``: the best match anywhere (GLAD eq. 11)."""
    if match == "same":
        return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=1, eps=1e-6).unsqueeze(1)
    if match == "neighbourhood":
        return neighbourhood_cosine_distance(a, b, radius)
    if match == "all":
        return min_cosine_distance_map(a, b)
    raise ValueError(f"feature match must be 'same', 'neighbourhood' or 'all', got {match!r}")


def feature_cosine_map(
    x: torch.Tensor, x_hat: torch.Tensor, extractor: LayerExtractor, size: Sequence[int] | None = None,
    match: str = "same", radius: int = 1,
) -> torch.Tensor:
    """Sum over layers of the upsampled cosine distance ``1 - cos(psi_l(x), psi_l(x_hat))`` (eq. 16);
    ``match`` / ``radius`` pair each input location with a neighbourhood (:func:`layer_distance`)."""
    size = tuple(size) if size is not None else tuple(x.shape[-2:])
    both = extractor.layer_maps(torch.cat([x, x_hat], dim=0))
    n = x.shape[0]
    total = torch.zeros(n, 1, *size, device=x.device, dtype=torch.float32)
    for fmap in both:
        d = layer_distance(fmap[:n], fmap[n:], match, radius)
        total += F.interpolate(d, size=size, mode="bilinear", align_corners=False)
    return total


def pixel_distance_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel difference over channels, ``B x 1 x H x W``."""
    return (x.float() - x_hat.float()).abs().mean(dim=1, keepdim=True)


def anomaly_map(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    extractor: LayerExtractor,
    pixel_weight: float = 0.0,
    sigma: float = 4.0,
    match: str = "same",
    radius: int = 1,
) -> torch.Tensor:
    """CCAD eq. 16 (+ DDAD's pixel term): ``B x 1 x H x W`` map at the input's resolution.

    ``x`` and ``x_hat`` are images in [0, 1]. With ``pixel_weight = v > 0`` the map is
    ``f_d + v * (max f_d / max p_d) * p_d`` per image (DDAD); ``sigma`` is in pixels at 256 px;
    ``match`` / ``radius`` as :func:`layer_distance` (``scoring.feature_match``).
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"input {tuple(x.shape)} and reconstruction {tuple(x_hat.shape)} differ in shape")
    fmap = feature_cosine_map(x, x_hat, extractor, match=match, radius=radius)
    if pixel_weight > 0:
        pmap = pixel_distance_map(x, x_hat)
        fmax = fmap.flatten(1).amax(1).view(-1, 1, 1, 1)
        pmax = pmap.flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
        fmap = fmap + pixel_weight * (fmax / pmax) * pmap
    return gaussian_blur(fmap, scaled_sigma(sigma, x.shape[-1]))


def image_score(maps: torch.Tensor, mode: str = "max", topk_ratio: float = 0.01,
                topk_count: int | None = None) -> torch.Tensor:
    """Image score from ``B x 1 x H x W`` maps: the maximum, or the mean of the top-k values.

    ``topk``: k is ``topk_ratio`` of the map's pixels, or, when ``topk_count`` is given, that fixed
    count (capped at the number of pixels; GLAD scores the mean of the top 250)."""
    flat = maps.flatten(1)
    if mode == "max":
        return flat.amax(1)
    if mode == "topk":
        if topk_count is not None:
            k = max(1, min(int(topk_count), flat.shape[1]))
        else:
            k = max(1, int(round(flat.shape[1] * float(topk_ratio))))
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"score mode must be 'max' or 'topk', got {mode!r}")
