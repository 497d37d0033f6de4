"""GLAD's pieces (papers/glad.md sec. 3): the anomaly-oriented target (eq. 10), the adaptive
denoising step (sec. 3.3, eq. 2), spatial-adaptive feature fusion (eq. 6-7) and the
min-over-locations feature map (eq. 11-12).

Notation as the paper: ``x`` the (normal) image, ``x^a`` the test / synthetic-anomaly image,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (eq. 1), the noise-free estimate
``x_{t->0} = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)`` (eq. 2), a hat for the
values of the generation (denoising) path. Tensors are in the model range [-1, 1] unless said.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..scoring.anomaly_map import gaussian_blur, min_cosine_distance_map, scaled_sigma
from .objectives import Generators, _randn_like, training_draws
from .sampling import ddim_sample, noised, reconstruction_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``score_fn(x0_path, x0_input) -> (score B, map B x 1 x h x w)`` (images in [-1, 1])
ScoreFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "glad_target", "glad_training_pair", "glad_loss", "noise_free", "step_decision", "first_crossing",
    "fusion_mask", "spatial_adaptive_fusion", "glad_reconstruct", "GLADTrace", "min_cosine_distance_map",
    "topk_mean", "glad_anomaly_map",
]


# --------------------------------------------------------------------------------------------
# eq. 9-10: the anomaly-oriented training target
# --------------------------------------------------------------------------------------------

def _col(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return v.to(ref.device, torch.float32).view(-1, *([1] * (ref.dim() - 1)))


def glad_target(eps: torch.Tensor, x: torch.Tensor, x_a: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The regression target of eq. 10, ``eps + sqrt(abar_t) / sqrt(1 - abar_t) * (x^a - x)``.

    Two corrections to the printed eq. 9-10, both checked: (1) eq. 10 prints ``alpha_t`` where
    eq. 4-9 have ``abar_t``; (2) eq. 9-10 print ``eps - ...``, but the noise for which eq. 2
    applied to ``x^a_t = sqrt(abar_t) x^a + sqrt(1 - abar_t) eps`` returns the normal ``x`` is
    ``(x^a_t - sqrt(abar_t) x) / sqrt(1 - abar_t) = eps + sqrt(abar_t)/sqrt(1 - abar_t) (x^a - x)``
    (with the printed minus it would return ``2 x^a - x``); the authors' code (``predict_eps``)
    uses this plus sign too. Where ``x^a = x`` it is the plain diffusion target ``eps``.
    ``abar_t`` has one value per batch item.
    """
    a = _col(abar_t, x)
    return eps + (a.sqrt() / (1.0 - a).sqrt()) * (x_a - x)


def glad_training_pair(x: torch.Tensor, x_a: torch.Tensor, scheduler, generator: torch.Generator,
                       schedule: str = "linear", timesteps: Optional[torch.Tensor] = None,
                       noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x^a_t, t, target)`` for eq. 10: ``t ~ U{0..T-1}``, ``eps ~ N(0, I)`` from ``generator``.

    ``schedule="constant"`` uses ``x^a`` as given (eq. 10 read literally). ``"linear"`` (default;
    the authors' code, not in the paper) mixes ``x^s = (t/T) x^a + (1 - t/T) x`` and uses it as
    ``x^a``: the anomaly is faint at small t, where eq. 10's ``sqrt(abar)/sqrt(1-abar)`` (~100 at
    t = 0) would otherwise make the target explode.
    """
    if schedule not in ("linear", "constant"):
        raise ValueError(f"schedule must be 'linear' or 'constant', got {schedule!r}")
    T = int(scheduler.config.num_train_timesteps)
    timesteps, noise = training_draws(x, scheduler, generator, timesteps, noise)
    noise = noise.to(x.device, torch.float32)
    x, x_a = x.float(), x_a.float()
    if schedule == "linear":
        w = _col(timesteps.float() / T, x)
        x_a = w * x_a + (1.0 - w) * x
    abar = scheduler.alphas_cumprod.to(x.device, torch.float32)[timesteps]
    x_t = _col(abar, x).sqrt() * x_a + (1.0 - _col(abar, x)).sqrt() * noise  # eq. 4
    return x_t, timesteps, glad_target(noise, x, x_a, abar)


def glad_loss(eps_fn: EpsFn, x: torch.Tensor, x_a: torch.Tensor, scheduler, generator: torch.Generator,
              schedule: str = "linear") -> torch.Tensor:
    """L_ATP (eq. 10) as a mean squared error: ``|| target - eps_theta(x^a_t, t) ||^2`` (0-d fp32;
    the paper writes the L2 norm, the authors' code and every diffusion loss here use the MSE)."""
    x_t, t, target = glad_training_pair(x, x_a, scheduler, generator, schedule=schedule)
    return F.mse_loss(eps_fn(x_t, t).float(), target)


# --------------------------------------------------------------------------------------------
# sec. 3.3-3.4: adaptive denoising step + spatial-adaptive feature fusion
# --------------------------------------------------------------------------------------------

def noise_free(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float) -> torch.Tensor:
    """Eq. 2: ``x_{t->0} = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    return (x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)


def step_decision(score: torch.Tensor, t: int, delta: float, t_min: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of sec. 3.3 at one step: ``(fire, floor)`` per item. ``fire``: the difference
    between the two noise-free estimates exceeds ``delta`` (the anomaly shows at this t: stop
    here and fuse); ``floor``: it did not, but ``t <= t_min`` (sec. 4.2's minimum step "to avoid
    missing anomalies"): stop here without an anomaly (restart from the input's estimate)."""
    fire = score > float(delta)
    floor = ~fire & torch.full_like(fire, int(t) <= int(t_min))
    return fire, floor


def first_crossing(scores: Sequence[float] | torch.Tensor, timesteps: Sequence[int], delta: float,
                   t_min: int = 0, redundancy: int = 0) -> int:
    """The start step the adaptive rule picks from one image's per-step scores (sec. 3.3).

    ``scores[i]`` is the score at ``timesteps[i]`` (descending, as denoised). The first i whose
    score exceeds ``delta``, or the first with ``t <= t_min``, or the last, then ``redundancy``
    (the paper's n) grid steps back towards T: returns ``timesteps[max(i - n, 0)]``.
    """
    s = torch.as_tensor(scores, dtype=torch.float32)
    i = len(timesteps) - 1
    for j, t in enumerate(timesteps):
        fire, floor = step_decision(s[j:j + 1], int(t), delta, t_min)
        if bool(fire[0] | floor[0]):
            i = j
            break
    return int(timesteps[max(i - int(redundancy), 0)])


def fusion_mask(score_map: torch.Tensor, size: Sequence[int], kind: str = "sigmoid") -> torch.Tensor:
    """The mask m of eq. 6-7 ("the possibility for the pixels to be part of the anomalies") from the
    step's anomaly map ``B x 1 x h x w``, upsampled to ``size``. The paper does not say how m is
    made; ``"sigmoid"`` is the authors' code (``sigmoid(map)``: values in [0.5, 0.88] for a cosine
    distance map, i.e. the generated path always keeps at least half); ``"minmax"`` normalises each
    image's map to [0, 1]."""
    if kind == "sigmoid":
        m = torch.sigmoid(score_map.float())
    elif kind == "minmax":
        flat = score_map.float().flatten(1)
        lo, hi = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
        m = (score_map.float() - lo) / (hi - lo).clamp_min(1e-8)
    else:
        raise ValueError(f"fusion mask must be 'sigmoid' or 'minmax', got {kind!r}")
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)


def spatial_adaptive_fusion(x0_path: torch.Tensor, x0_input: torch.Tensor, m: torch.Tensor, abar_t: float,
                            eps: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``x^f_t = sqrt(abar_t) (m * x^_{t->0} + (1 - m) * x^a_{t->0}) + sqrt(1 - abar_t) eps``:
    the generated path where m says anomaly, the input's own estimate elsewhere, re-noised with
    the same eps as the directly-noised input (consistent noise)."""
    return math.sqrt(abar_t) * (m * x0_path + (1.0 - m) * x0_input) + math.sqrt(1.0 - abar_t) * eps


@dataclass
class GLADTrace:
    """What the adaptive reconstruction decided per image: the step it stopped the search at
    (``start_steps``, the paper's t), whether the anomaly fired there (``fired``; False = reached
    t_min) and the score there (``scores``)."""

    start_steps: torch.Tensor
    fired: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def glad_reconstruct(eps_fn: EpsFn, x0: torch.Tensor, scheduler, score_fn: ScoreFn, start_step: int = 750,
                     steps: int = 15, delta: float = 0.15, t_min: int = 350, fusion: str = "saff",
                     mask: str = "sigmoid", redundancy: int = 0,
                     generator: Generators = None) -> tuple[torch.Tensor, GLADTrace]:
    """GLAD's reconstruction (Fig. 2): adaptive denoising step + spatial-adaptive fusion.

    1. ``x^a_T = sqrt(abar_T) x^a + sqrt(1 - abar_T) eps`` (eq. 1, ``T = start_step``; one eps).
    2. For each t of the DDIM grid ``[T, T - T/steps, ...]`` while an image is still searching:
       the generated path's estimate ``x^_{t->0}`` and the directly-noised input's
       ``x^a_{t->0}`` (both eq. 2, ``x^a_t`` noised with the same eps) are compared by
       ``score_fn`` (sec. 3.6's map; sec. 4.2: last layer, mean of the top 10).
       - score > delta (sec. 3.3): with ``fusion="saff"`` the state becomes eq. 7's ``x^f_t``
         (mask m from that map, :func:`fusion_mask`) and denoising continues from t; with
         ``fusion="none"`` (sec. 3.3 alone) the image restarts from ``x^a_{t+n}`` (n =
         ``redundancy`` grid steps) and is denoised from there;
       - else if t <= t_min: restart from the input at t (``x^a_t``; the authors' code);
       - else: one DDIM step (eq. 3, eta = 0) along the generated path.
    3. Deterministic DDIM down to abar = 1.

    The loop is :func:`ccad.diffusion.sampling.ddim_sample` (eq. 3 as diffusers' DDIM step, eta =
    0); the search and the fusion are its per-step correction, which at the stopping step hands
    the step eq. 7's ``x^f_t`` and the consistent noise eps. Images that stopped searching cost
    one network call per step; searching ones two.
    The authors' code reuses the path's eps for the input's estimate; this follows eq. 2 and
    evaluates the network on ``x^a_t``. Returns ``(x_hat_0, GLADTrace)``.
    """
    if fusion not in ("saff", "none"):
        raise ValueError(f"fusion must be 'saff' or 'none', got {fusion!r}")
    T = int(scheduler.config.num_train_timesteps)
    ts = reconstruction_timesteps(int(start_step), int(steps), T)
    position = {t: i for i, t in enumerate(ts)}
    target = x0.float()
    b = target.shape[0]
    eps = _randn_like(target, generator)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps_fn(x.to(x0.dtype), t).float()

    searching = torch.ones(b, dtype=torch.bool)
    start = torch.full((b,), ts[-1], dtype=torch.long)
    start_index = torch.full((b,), len(ts) - 1, dtype=torch.long)
    fired_all = torch.zeros(b, dtype=torch.bool)
    score_at = torch.zeros(b)

    def search(x_t: torch.Tensor, e_path: torch.Tensor, t: int, a_t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-step correction: the adaptive-step rule and, where it stops, eq. 7's state."""
        idx = searching.nonzero().flatten()
        if not len(idx):
            return x_t, e_path  # plain DDIM (eq. 3)
        x_in = noised(target, scheduler, t, eps)[idx]
        e_in = call(x_in, torch.full((len(idx),), t, device=x_in.device, dtype=torch.long))
        x0_path = noise_free(x_t, e_path, a_t)  # eq. 2, generated path
        x0_in = noise_free(x_in, e_in, a_t)  # eq. 2, directly-noised input
        score, smap = score_fn(x0_path[idx], x0_in)
        score = score.float().cpu()
        fire, floor = step_decision(score, t, delta, t_min)
        stop = fire | floor
        if not stop.any():
            return x_t, e_path
        sel = idx[stop]
        start[sel], start_index[sel], fired_all[sel], score_at[sel] = t, position[t], fire[stop], score[stop]
        searching[sel] = False
        m = torch.zeros_like(x0_in[:, :1])  # m = 0: the input's own estimate (t_min floor)
        if fusion == "saff" and fire.any():
            m[fire] = fusion_mask(smap[fire], target.shape[-2:], mask).to(m)
        # the DDIM step from x^f_t (eq. 7) with its own decomposition: x0 = the fused estimate, noise = eps
        x_t, e_path = x_t.clone(), e_path.clone()
        x_t[sel] = spatial_adaptive_fusion(x0_path[sel], x0_in[stop], m[stop], a_t, eps[sel])
        e_path[sel] = eps[sel]
        return x_t, e_path

    x_t = ddim_sample(call, noised(target, scheduler, ts[0], eps), scheduler, ts, correct=search)
    if fusion == "none" and int(redundancy) > 0 and fired_all.any():
        # sec. 3.3 alone: an image whose anomaly showed at t restarts from x^a_{t+n}, n grid steps back
        for back in sorted(set((start_index[fired_all] - int(redundancy)).clamp_min(0).tolist())):
            sel = (fired_all & ((start_index - int(redundancy)).clamp_min(0) == back)).nonzero().flatten()
            x_t[sel] = ddim_sample(call, noised(target, scheduler, ts[back], eps)[sel], scheduler, ts[back:])
            start[sel] = ts[back]
    return x_t, GLADTrace(start, fired_all, score_at)


# --------------------------------------------------------------------------------------------
# sec. 3.6: eq. 11-12
# --------------------------------------------------------------------------------------------

def topk_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values of each map (``B``)."""
    flat = maps.flatten(1)
    return flat.topk(max(1, min(int(k), flat.shape[1])), dim=1).values.mean(1)


def glad_anomaly_map(x: torch.Tensor, x_hat: torch.Tensor, extractor, sigma: float = 6.0,
                     layers: Optional[Sequence[int]] = None, match: str = "all", radius: int = 1) -> torch.Tensor:
    """Eq. 11-12 + sec. 4.2's smoothing: ``M = sum_l up(M_l(F_t^l, F_r^l))``, Gaussian sigma in
    pixels at 256 px (:func:`scaled_sigma`). ``x``, ``x_hat`` are images in [0, 1]
    ``B x 3 x S x S``; ``extractor.layer_maps`` gives the layers (``layers`` picks some of them by
    position). ``match="all"`` is the paper's eq. 11; ``same`` / ``neighbourhood`` (``radius``)
    are the narrower pairings of :func:`ccad.scoring.anomaly_map.layer_distance`. Returns
    ``B x 1 x S x S``."""
    if x.shape != x_hat.shape:
        raise ValueError(f"input {tuple(x.shape)} and reconstruction {tuple(x_hat.shape)} differ in shape")
    n, size = x.shape[0], tuple(x.shape[-2:])
    both = extractor.layer_maps(torch.cat([x, x_hat], dim=0))
    if layers is not None:
        both = [both[i] for i in layers]
    total = torch.zeros(n, 1, *size, device=x.device, dtype=torch.float32)
    for fmap in both:
        if match == "all":
            d = min_cosine_distance_map(fmap[:n], fmap[n:])
        else:
            from ..scoring.anomaly_map import layer_distance

            d = layer_distance(fmap[:n], fmap[n:], match, radius)
        total += F.interpolate(d, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(total, scaled_sigma(sigma, size[-1]))


@torch.no_grad()
def fixed_start_reconstruct(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                            scheduler, start_step: int, steps: int, generator=None) -> torch.Tensor:
    """GLAD's fixed-start baseline (the arm sec. 3.3's adaptive step is compared with): noise the
    input to ``start_step`` (eq. 1, with the same eps draw as :func:`glad_reconstruct` from the same
    ``generator``), then deterministic DDIM (eq. 3, eta = 0) down ``reconstruction_timesteps(start_step,
    steps)`` to abar = 1: no adaptive search, no spatial fusion. Images in model range ``[-1, 1]``."""
    T = int(scheduler.config.num_train_timesteps)
    ts = reconstruction_timesteps(int(start_step), int(steps), T)
    target = x0.float()
    eps = _randn_like(target, generator)
    return ddim_sample(lambda x, t: eps_fn(x.to(x0.dtype), t).float(), noised(target, scheduler, ts[0], eps),
                       scheduler, ts)
