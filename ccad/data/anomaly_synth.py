"""Synthetic anomalies for GLAD's anomaly-oriented training (papers/glad.md sec. 3.5, eq. 10).

GLAD "follow[s] MemSeg to synthesize abnormal samples with normal ones"; its reference code does
it the DRAEM way, and so does this module:

1. a 2-D Perlin noise field (Perlin's gradient noise with the quintic fade
   ``6t^5 - 15t^4 + 10t^3``, implemented here in torch) with ``2**kx x 2**ky`` lattice cells,
   ``kx, ky ~ U{0 .. perlin_scale_max-1}`` (GLAD / DRAEM: 0 .. 5), rotated by a random angle in
   [-90, 90] degrees (DRAEM's ``iaa.Affine(rotate=(-90, 90))``; zero fill outside), thresholded
   at ``threshold`` (GLAD's code: 0.3; DRAEM: 0.5) -> the binary mask ``m``;
2. a *foreign* texture: DRAEM / GLAD paste DTD images; no texture set is downloaded here, the
   texture comes from the project's own procedural generator
   (:func:`ccad.data.synthetic.generate_texture`) of a texture class other than ``avoid_kind``
   (the image's own class, when known), with a random seed and a per-channel gamma in
   [0.5, 2] (a stand-in for the colour augmentations GLAD applies to its DTD source);
3. the blend with opacity ``beta ~ U[0, beta_max)`` (``beta_max = 0.8`` as GLAD / DRAEM):
   ``x^a = x (1 - m) + (1 - beta) * tex * m + beta * x * m``.

So ``x^a`` differs from ``x`` only inside ``m``. Every random choice is drawn from the given
``torch.Generator`` (a pure function of its seed); :func:`synthesize_anomaly` returns
``(x_a, mask)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .synthetic import TEXTURES, generate_texture

__all__ = ["perlin_noise_2d", "perlin_mask", "foreign_texture", "synthesize_anomaly", "synthesize_batch"]


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).cpu()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=generator, device=generator.device).item())


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise_2d(shape: Sequence[int], res: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """2-D Perlin gradient noise ``H x W`` (float32, roughly in [-1, 1]) with ``res = (ry, rx)``
    lattice cells along each side: random unit gradients on the ``(ry+1) x (rx+1)`` lattice, dot
    products with the offsets to the four corners, blended with the quintic fade (as DRAEM's
    ``rand_perlin_2d_np``; sizes that are not a multiple of ``res`` are computed on the next
    multiple and cropped)."""
    h, w = int(shape[0]), int(shape[1])
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    hp, wp = math.ceil(h / ry) * ry, math.ceil(w / rx) * rx
    angles = 2.0 * math.pi * _rand(generator, ry + 1, rx + 1)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (ry+1) x (rx+1) x 2
    ys = torch.arange(hp, dtype=torch.float32) * (ry / hp)
    xs = torch.arange(wp, dtype=torch.float32) * (rx / wp)
    yi, xi = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]
    Y, X = yi[:, None], xi[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[Y + dy, X + dx]  # hp x wp x 2
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    n0 = torch.lerp(corner(0, 0), corner(1, 0), u)
    n1 = torch.lerp(corner(0, 1), corner(1, 1), u)
    return (math.sqrt(2.0) * torch.lerp(n0, n1, v))[:h, :w].contiguous()


def _rotate(field: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate an ``H x W`` field about its centre (bilinear, zero outside)."""
    h, w = field.shape
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a) * h / w, 0.0],
                          [math.sin(a) * w / h, math.cos(a), 0.0]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    return F.grid_sample(field[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]


def perlin_mask(size: Sequence[int], generator: torch.Generator, threshold: float = 0.3,
                perlin_scale_max: int = 6, min_cell: int = 4) -> torch.Tensor:
    """The binary ``H x W`` anomaly mask: rotated Perlin noise above ``threshold`` (DRAEM / GLAD).

    Lattice resolution ``2**k`` with ``k ~ U{0 .. perlin_scale_max-1}`` per axis, capped so that a
    cell keeps at least ``min_cell`` pixels (at 32-64 px the papers' 32 cells would put every
    pixel on a lattice point, where Perlin noise is 0)."""
    h, w = int(size[0]), int(size[1])
    ky, kx = _randint(generator, 0, perlin_scale_max), _randint(generator, 0, perlin_scale_max)
    ry = min(2 ** ky, max(1, h // min_cell))
    rx = min(2 ** kx, max(1, w // min_cell))
    noise = perlin_noise_2d((h, w), (ry, rx), generator)
    angle = float(_rand(generator, 1)) * 180.0 - 90.0
    return (_rotate(noise, angle) > float(threshold)).float()


def foreign_texture(size: Sequence[int], generator: torch.Generator, avoid_kind: Optional[str] = None,
                    channels: int = 3) -> torch.Tensor:
    """A ``channels x H x W`` texture in [0, 1] from :func:`generate_texture` of a class other than
    ``avoid_kind``, random seed, per-channel gamma in [0.5, 2]."""
    kinds = [k for k in TEXTURES if k != avoid_kind] or list(TEXTURES)
    kind = kinds[_randint(generator, 0, len(kinds))]
    seed = _randint(generator, 0, 2 ** 31 - 1)
    tex = torch.from_numpy(generate_texture(kind, (int(size[0]), int(size[1])), seed=seed))
    gamma = 2.0 ** (_rand(generator, channels) * 2.0 - 1.0)  # 0.5 .. 2
    return tex[None].clamp_min(1e-4) ** gamma.view(-1, 1, 1)


def synthesize_anomaly(image: torch.Tensor, generator: torch.Generator, *, avoid_kind: Optional[str] = None,
                       threshold: float = 0.3, beta_max: float = 0.8, perlin_scale_max: int = 6,
                       tries: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_a, mask)`` for one image ``C x H x W`` in [0, 1]: a Perlin mask filled with a foreign
    texture at opacity ``beta ~ U[0, beta_max)`` (module docstring). The mask is ``1 x H x W``
    {0, 1}; a draw with an empty mask is redrawn (up to ``tries`` times, from the same generator,
    so the result stays a pure function of the seed)."""
    if image.dim() != 3:
        raise ValueError(f"image must be C x H x W, got shape {tuple(image.shape)}")
    c, h, w = image.shape
    mask = torch.zeros(h, w)
    for _ in range(max(1, int(tries))):
        mask = perlin_mask((h, w), generator, threshold=threshold, perlin_scale_max=perlin_scale_max)
        if mask.any():
            break
    tex = foreign_texture((h, w), generator, avoid_kind=avoid_kind, channels=c)
    beta = float(_rand(generator, 1)) * float(beta_max)
    x = image.detach().float().cpu()
    m = mask[None]
    x_a = x * (1.0 - m) + (1.0 - beta) * tex * m + beta * x * m
    return x_a.to(image.device, image.dtype), m.to(image.device, image.dtype)


def synthesize_batch(images: torch.Tensor, generator: torch.Generator, ratio: float = 0.5,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomalous versions of a batch ``B x C x H x W``: each image is given a synthetic anomaly
    with probability ``ratio`` (GLAD's code: 0.5) and kept as is otherwise (mask all zeros)."""
    out, masks = images.clone(), torch.zeros_like(images[:, :1])
    pick = _rand(generator, images.shape[0]) < float(ratio)
    for i in range(images.shape[0]):
        if pick[i]:
            out[i], masks[i] = synthesize_anomaly(images[i], generator, **kwargs)
    return out, masks
