"""D3AD: dynamic implicit conditioning and noiseless-scaling reconstruction (papers/d3ad.md sec. 4, App. A).

- **Initial anomaly estimate** (sec. 4.1, Algorithm 2 lines 3-6): one feature vector per image,
  ``y0 = phi_j(x0)`` (the feature map of block j, flattened; App. A.1: j = 2), and the mean L1
  distance to its K = 20 nearest training images, ``ybar0 = 1/K sum_j ||y0 - y_sj||_1``. The
  paper's KNN is over whole images (``Y_Train`` holds one ``y0`` per training image, "we compute
  the average distance for each sample in the training set"), not over patches.
  :func:`image_features` optionally average-pools the map to a ``pool x pool`` grid first to
  cap the memory (the paper keeps the full map; at 128 px and pool 16 the two coincide).
- **Bins** (sec. 4.1 "Bin construction", Fig. 3 "equally sized predefined bins"): |B| = 10
  *equal-width* ("equidistant", "evenly spaced") bins over the range [min, max] of the training
  distances (not equal-count quantiles); :func:`fit_bins` returns the |B| + 1 edges.
- **Start step** (Algorithm 2 lines 7-8, sec. 5 "Implementation details"): ``b = psi(ybar0)``
  by binary search (1-based, values past the training range go to the outer bins), the minimum
  bin is 2, ``T_hat = floor(b / |B| * T_max)``, rounded to the nearest multiple of 10 (the DDIM
  skip), :func:`start_steps`.
- **Noiseless scaling** (sec. 4, Algorithm 1 line 4, App. A.2.1 eq. 11 with omega = 0):
  ``z_T_hat = sqrt(abar_T_hat) * z0``, no noise; then DDIM (eq. 7, sigma = 0) with the optional
  DDAD error correction (eq. 8 / Algorithm 1 lines 6-7, temperature ``guidance``) back to z0_hat,
  :func:`d3ad_reconstruct`. Images of one batch with different T_hat are grouped: one DDIM run
  per distinct start step, results scattered back into batch order.
- **Map** (eq. 9): ``A = lambda * l_map + (1 - lambda) * f_map``, ``l_map = ||z0 - z0_hat||_1``
  per latent cell (upsampled), ``f_map`` the summed feature cosine distance (sec. 4.2),
  :func:`d3ad_anomaly_map`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from .sampling import ddad_guidance, ddim_sample, noised, reconstruction_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Dynamic implicit conditioning (sec. 4.1, Algorithm 2)
# --------------------------------------------------------------------------------------------
def image_features(extractor: object, x: torch.Tensor, layer_index: int = 0, pool: int = 0) -> torch.Tensor:
    """``y0 = phi_j(x0)`` of Algorithm 2 line 4: the ``layer_index``-th map of
    ``extractor.layer_maps(x)``, average-pooled to ``pool x pool`` when ``pool > 0`` (0 = the
    full map, as the paper), flattened: ``B x D`` float32."""
    fmap = extractor.layer_maps(x)[int(layer_index)].float()  # type: ignore[attr-defined]
    if pool and (fmap.shape[-2] > pool or fmap.shape[-1] > pool):
        fmap = F.adaptive_avg_pool2d(fmap, int(pool))
    return fmap.flatten(1)


def knn_mean_distance(queries: torch.Tensor, memory: torch.Tensor, k: int = 20, leave_one_out: bool = False,
                      chunk: int = 256) -> torch.Tensor:
    """Algorithm 2 lines 5-6: the mean L1 distance of each query to its ``k`` nearest memory rows.

    ``leave_one_out=True`` means ``queries`` *is* ``memory`` (the training set against itself):
    each row's distance to itself is excluded. ``k`` is capped at the available neighbours.
    Returns ``B`` float32 (on the queries' device).
    """
    if queries.dim() != 2 or memory.dim() != 2 or queries.shape[1] != memory.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and memory {tuple(memory.shape)} must be N x D, same D")
    if leave_one_out and queries.shape[0] != memory.shape[0]:
        raise ValueError("leave_one_out needs queries to be the memory itself")
    n_mem = memory.shape[0] - int(leave_one_out)
    if n_mem < 1 or int(k) < 1:
        raise ValueError(f"need k >= 1 and at least one neighbour, got k={k} with {memory.shape[0]} memory rows")
    kk = min(int(k), n_mem)
    memory = memory.float().to(queries.device)
    out = []
    for s in range(0, queries.shape[0], int(chunk)):
        q = queries[s:s + int(chunk)].float()
        d = torch.cdist(q, memory, p=1.0)
        if leave_one_out:
            rows = torch.arange(q.shape[0], device=d.device)
            d[rows, rows + s] = float("inf")
        out.append(d.topk(kk, dim=1, largest=False).values.mean(1))
    return torch.cat(out)


def fit_bins(train_distances: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """Sec. 4.1 "Bin construction": |B| = ``n_bins`` equidistant (equal-width) bins over the range
    of the training set's mean KNN distances; returns the ``n_bins + 1`` edges (float64)."""
    d = torch.as_tensor(train_distances, dtype=torch.float64).flatten()
    if d.numel() == 0 or not torch.isfinite(d).all():
        raise ValueError("fit_bins needs at least one finite training distance")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return torch.linspace(float(d.min()), float(d.max()), int(n_bins) + 1, dtype=torch.float64)


def assign_bins(distances: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """psi of Algorithm 2 line 7: the 1-based bin of each distance by binary search on the edges;
    a value on an inner edge belongs to the upper bin; values outside the training range go to
    bin 1 / bin |B|."""
    inner = torch.as_tensor(edges, dtype=torch.float64).cpu()[1:-1].contiguous()
    d = torch.as_tensor(distances, dtype=torch.float64).cpu().flatten()
    return torch.bucketize(d, inner, right=True) + 1


def start_steps(distances: torch.Tensor, edges: torch.Tensor, T_max: int, min_bin: int = 2,
                round_to: int = 10) -> torch.Tensor:
    """Algorithm 2 line 8: ``T_hat = floor(b / |B| * T_max)`` with ``b = max(psi(ybar0), min_bin)``
    (sec. 5: minimum bin 2, "so that we don't rely solely on prior information"), then rounded to
    the nearest multiple of ``round_to`` (sec. 5: "the DIC step rounded to the nearest multiple of
    10"; at least ``round_to``; 1 = no rounding). Monotone non-decreasing in the distance.
    Returns a CPU LongTensor of per-image start steps."""
    n_bins = int(torch.as_tensor(edges).numel()) - 1
    return bin_start_step(assign_bins(distances, edges), n_bins, T_max, min_bin, round_to)


def bin_start_step(bins: torch.Tensor, n_bins: int, T_max: int, min_bin: int = 2, round_to: int = 10) -> torch.Tensor:
    """T_hat of 1-based bins (Algorithm 2 line 8 with the minimum bin and rounding of sec. 5)."""
    if not 1 <= int(min_bin) <= int(n_bins):
        raise ValueError(f"min_bin must be in 1..{n_bins}, got {min_bin}")
    b = torch.as_tensor(bins).long().clamp(int(min_bin), int(n_bins))
    t = (b * int(T_max)) // int(n_bins)
    r = int(round_to)
    if r > 1:
        t = ((t + r // 2) // r * r).clamp_min(r)
    return t.clamp(1, max(1, int(T_max))).long()  # rounding never passes T_max


# --------------------------------------------------------------------------------------------
# Noiseless-scaling reconstruction (sec. 4, Algorithm 1)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def d3ad_reconstruct(eps_fn: EpsFn, z0: torch.Tensor, scheduler: Union[DDPMScheduler, DDIMScheduler],
                     start_steps: torch.Tensor, steps: Optional[int] = None, skip: int = 10,
                     guidance: float = 0.0) -> torch.Tensor:
    """Algorithm 1 for a batch with per-image start steps ``T_hat`` (``start_steps``, B ints).

    For every distinct T_hat: ``z_T_hat = sqrt(abar_T_hat) z0`` (no noise: sec. 4, App. A.2.1
    eq. 11 with omega = 0), then deterministic DDIM (eq. 7, sigma = 0) over the timesteps
    ``T_hat, T_hat - skip, ..., skip`` (``steps`` None: ``T_hat // skip`` evaluations, the paper's
    skip of 10 in T = 1000; an int fixes the count, capped at T_hat), with DDAD's correction
    (eq. 8, Algorithm 1 lines 6-7) when ``guidance`` > 0; the last update lands on abar = 1 and
    returns z0_hat. The loop is :func:`ccad.diffusion.sampling.ddim_sample` with the correction
    :func:`ccad.diffusion.sampling.ddad_guidance` (eq. 8). One run per distinct start step;
    results are scattered back to batch order, so an image gets the same reconstruction alone or
    in any batch (up to float rounding). No random number is drawn. Returns z0_hat, ``B x C x h x w`` float32.
    """
    if z0.dim() != 4:
        raise ValueError(f"z0 must be B x C x h x w latents, got shape {tuple(z0.shape)}")
    starts = torch.as_tensor(start_steps).flatten().long().cpu()
    if starts.numel() != z0.shape[0]:
        raise ValueError(f"start_steps has {starts.numel()} entries for a batch of {z0.shape[0]}")
    if int(skip) < 1:
        raise ValueError(f"skip must be >= 1, got {skip}")
    T = int(scheduler.config.num_train_timesteps)
    z0f = z0.float()
    out = torch.empty_like(z0f)
    for s in torch.unique(starts).tolist():
        n = int(steps) if steps is not None else max(1, int(s) // int(skip))
        timesteps = reconstruction_timesteps(int(s), min(n, int(s)), T)
        idx = (starts == s).nonzero().flatten().to(z0.device)
        z = z0f[idx]
        z_start = noised(z, scheduler, timesteps[0], None)  # Algorithm 1 line 4: sqrt(abar) z0, no noise
        out[idx] = ddim_sample(eps_fn, z_start, scheduler, timesteps,  # line 8: eq. 7, sigma = 0
                               correct=ddad_guidance(z, guidance) if guidance else None)  # lines 6-7 (eq. 8)
    return out


# --------------------------------------------------------------------------------------------
# The anomaly map (sec. 4.2, eq. 9)
# --------------------------------------------------------------------------------------------
def latent_l1_map(z0: torch.Tensor, z0_hat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``l_map = ||z0 - z0_hat||_1`` per latent cell (the L1 norm over channels, sec. 4.2),
    bilinearly upsampled to ``size``: ``B x 1 x H x W``."""
    d = (z0.float() - z0_hat.float()).abs().sum(dim=1, keepdim=True)
    return F.interpolate(d, size=tuple(size), mode="bilinear", align_corners=False)


def d3ad_anomaly_map(l_map: torch.Tensor, f_map: torch.Tensor, lam: float = 0.85, l_norm: Optional[float] = None,
                     f_norm: Optional[float] = None) -> torch.Tensor:
    """Eq. 9: ``A = lam * l_map + (1 - lam) * f_map`` (lambda = 0.85, App. A.1), each map first
    divided by its normaliser when given (the paper combines "the normalized feature-based
    distance and the latent pixel-wise distance" without saying how; the method divides each by
    its mean over good training images)."""
    if l_map.shape != f_map.shape:
        raise ValueError(f"l_map {tuple(l_map.shape)} and f_map {tuple(f_map.shape)} differ in shape")
    if l_norm:
        l_map = l_map / float(l_norm)
    if f_norm:
        f_map = f_map / float(f_norm)
    return float(lam) * l_map + (1.0 - float(lam)) * f_map
