"""DeCo-Diff: deviation-correction diffusion in latent space (papers/deco-diff.md section 4, supp. D).

Pieces (all pure tensor functions; every random draw comes from a passed CPU
``torch.Generator`` and is moved to the tensor's device, so a training step is a function of
(seed, step)):

* ``deco_scheduler``      - the abar table (T = 10, squared-cosine betas, section 5.1).
* ``random_patch_mask``   - which latent patches are noised (eq. 7; r_mask ~ U[0, 0.7], patch
                            sizes {1, 2, 4, 8} latent cells, section 5.1).
* ``shuffle_patches``     - patch shuffling (section 4.2, supp. D.2): other images' patches
                            used instead of Gaussian noise on r_shuffle ~ U[0, 0.3] of the
                            noised patches.
* ``deco_forward``        - eq. 10-11 for given (z0, t, eps, mask): z_t and the target eta.
* ``deco_training_pair``  - draws (t, mask, eps) and applies ``deco_forward``.
* ``deco_loss``           - eq. 12, MSE between eta and eta_theta(z_t, t) (fp32).
* ``deco_correct``        - eq. 13-14, deterministic DDIM correction started from the test
                            latent itself (no forward noising), on ``deviation_vp_table``.
* ``deco_anomaly_map``    - eq. 15, geometric mean of clipped latent and pixel deviations.

Timestep convention: ``t`` is the 0-based index into ``scheduler.alphas_cumprod`` (``0 .. T-1``);
the paper's step ``t`` (``1 .. T``) is ``index + 1``, and ``abar`` "at t - 1 = 0" is 1.

Sources besides the paper: where the paper is silent, the authors' public implementation
(github.com/farzad-bz/DeCo-Diff, train_DeCo_Diff.py / evaluation_DeCo_Diff.py) was read and its
choice is followed and flagged "reference implementation" below.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ccad.scoring.anomaly_map import gaussian_blur, scaled_sigma

from .sampling import ddim_sample

PATCH_SIZES = (1, 2, 4, 8)


# --------------------------------------------------------------------------- schedule
def deco_scheduler(T: int = 10, beta_schedule: str = "squaredcos_cap_v2") -> DDPMScheduler:
    """DDPM scheduler giving DeCo-Diff's abar table (eq. 2 / eq. 9).

    Section 5.1: "a squared-cosine beta scheduler [18]" (Nichol & Dhariwal's cosine schedule,
    diffusers ``squaredcos_cap_v2``) with T = 10 training steps. For T = 10 this gives
    abar = 0.972, 0.899, 0.787, 0.647, 0.494, 0.341, 0.203, 0.094, 0.024, 2.4e-5 (the last beta is
    capped at 0.999). Only ``alphas_cumprod`` is used; no sampling method of the scheduler is.
    (The reference implementation's training script builds its schedule by respacing a default
    1000-step ADM schedule to 10 steps while its evaluation builds a native 10-step one; the
    paper's statement - squared cosine, T = 10 - is followed here.)
    """
    if int(T) < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return DDPMScheduler(num_train_timesteps=int(T), beta_schedule=beta_schedule,
                         prediction_type="epsilon", clip_sample=False)


def _abar(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(torch.float64)


def _num_steps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


# --------------------------------------------------------------------------- masks
def _as_patch_sizes(patch_sizes, batch: int, generator: torch.Generator,
                    patch_probs: Sequence[float] | None) -> torch.Tensor:
    """Per-image patch sizes: a given ``[B]`` tensor is used as is, a tuple is sampled from."""
    if torch.is_tensor(patch_sizes):
        ks = patch_sizes.to("cpu", torch.long).reshape(-1)
        if ks.numel() != batch:
            raise ValueError(f"patch_sizes tensor must have {batch} entries, got {ks.numel()}")
        return ks
    choices = torch.tensor([int(k) for k in patch_sizes], dtype=torch.long)
    if choices.numel() == 0 or bool((choices < 1).any()):
        raise ValueError(f"patch_sizes must be positive integers, got {patch_sizes}")
    if patch_probs is None:
        idx = torch.randint(0, choices.numel(), (batch,), generator=generator, device=generator.device)
    else:
        probs = torch.tensor([float(p) for p in patch_probs], dtype=torch.float64)
        if probs.numel() != choices.numel():
            raise ValueError("patch_probs must match patch_sizes")
        idx = torch.multinomial(probs.to(generator.device), batch, replacement=True, generator=generator)
    return choices[idx.cpu()]


def _patch_grid_mask(h: int, w: int, k: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``h x w`` {0,1} mask made of ``round(ratio * n)`` of the ``n`` aligned k x k patches."""
    gh, gw = math.ceil(h / k), math.ceil(w / k)
    n = gh * gw
    m = round(float(ratio) * n)
    grid = torch.zeros(n, dtype=torch.float32)
    if m > 0:
        perm = torch.randperm(n, generator=generator, device=generator.device).cpu()
        grid[perm[:m]] = 1.0
    grid = grid.view(gh, gw).repeat_interleave(k, 0).repeat_interleave(k, 1)
    return grid[:h, :w]


def random_patch_mask(shape: Sequence[int], generator: torch.Generator, r_mask_max: float = 0.7,
                      patch_sizes=PATCH_SIZES, *, patch_probs: Sequence[float] | None = None,
                      device: torch.device | str | None = None, return_info: bool = False):
    """Random patch mask of eq. 7: ``B x 1 x h x w`` in {0, 1}, 1 = noised ("non-masked" z^n).

    Section 5.1: for each training sample a masking ratio r_mask ~ U[0, r_mask_max] (0.7) and a
    latent patch size from ``patch_sizes`` ({1, 2, 4, 8} cells = {8, 16, 32, 64} px at f8) are
    drawn; ``round(r_mask * n)`` of the ``n`` aligned k x k patches are noised (r_mask is the
    noised fraction, as in the reference implementation, where the rest stays visible). Patch
    sizes are drawn uniformly unless ``patch_probs`` is given (the reference implementation draws
    one size per batch with p = 0.4 / 0.3 / 0.2 / 0.1; the paper says per sample and gives no
    probabilities, so uniform per image is the default here). ``patch_sizes`` may also be a
    ``[B]`` tensor fixing each image's size. Patches at a ragged border are cropped.

    ``shape`` is ``(B, ..., h, w)``. With ``return_info`` returns ``(mask, patch_size[B] long,
    r_mask[B] float)``.
    """
    if not 0.0 <= float(r_mask_max) <= 1.0:
        raise ValueError(f"r_mask_max must be in [0, 1], got {r_mask_max}")
    b, h, w = int(shape[0]), int(shape[-2]), int(shape[-1])
    ks = _as_patch_sizes(patch_sizes, b, generator, patch_probs)
    ratios = torch.rand(b, generator=generator, device=generator.device, dtype=torch.float64).cpu() * float(r_mask_max)
    mask = torch.stack([_patch_grid_mask(h, w, int(ks[i]), float(ratios[i]), generator) for i in range(b)])
    mask = mask.unsqueeze(1)
    if device is not None:
        mask = mask.to(device)
    if return_info:
        return mask, ks, ratios.to(torch.float32)
    return mask


def shuffle_patches(z0: torch.Tensor, generator: torch.Generator, r_shuffle_max: float = 0.3,
                    patch_sizes=PATCH_SIZES, *, patch_probs: Sequence[float] | None = None):
    """Patch shuffling (section 4.2; supp. D.2): other images' latent patches as structured "noise".

    Returns ``(z_src, shuffle_mask)``: ``shuffle_mask`` (``B x 1 x h x w``, {0,1}) marks k x k
    patches, r_shuffle ~ U[0, r_shuffle_max] of all patches per image, and ``z_src`` holds there
    a k x k patch copied from a random position of a *different* image of the batch (the
    reference implementation permutes all patches of the batch, so a patch may come from the
    same image; the paper says "other patches taken from images in the same batch", so the
    source image here is always another one when B > 1; with B = 1 it is the same image at a
    random position). Outside the mask ``z_src = z0``.

    How the target treats them (followed from the reference implementation, which the paper's
    wording "instead of adding Gaussian noise, we can replace them" matches): the shuffled
    patch replaces the Gaussian noise eps in eq. 9-11, i.e. on a noised cell
    ``z_t = sqrt(abar) z0 + sqrt(1 - abar) z_src`` and ``eta = z_src - c_t z0``; it only acts
    where the patch is also noised by ``random_patch_mask``. Since the shuffle mask is drawn
    independently, r_shuffle is (in expectation) the fraction of *noised* patches that are
    shuffled, as supp. D.2 states. ``patch_sizes`` should be the noise mask's per-image sizes
    (a ``[B]`` tensor), as in the reference implementation (one size for both).
    """
    b, _, h, w = z0.shape
    ks = _as_patch_sizes(patch_sizes, b, generator, patch_probs)
    smask, ks, _ = random_patch_mask(z0.shape, generator, r_shuffle_max, ks, return_info=True)
    src_b = torch.empty(b, h, w, dtype=torch.long)
    src_y = torch.empty(b, h, w, dtype=torch.long)
    src_x = torch.empty(b, h, w, dtype=torch.long)
    ys = torch.arange(h).view(h, 1).expand(h, w)
    xs = torch.arange(w).view(1, w).expand(h, w)
    for i in range(b):
        k = int(ks[i])
        gh, gw = math.ceil(h / k), math.ceil(w / k)

        def g(v: torch.Tensor, gh: int = gh, gw: int = gw, k: int = k) -> torch.Tensor:
            return v.cpu().view(gh, gw).repeat_interleave(k, 0).repeat_interleave(k, 1)[:h, :w]

        if b > 1:
            other = torch.randint(1, b, (gh * gw,), generator=generator, device=generator.device)
            sb = (i + g(other)) % b
        else:
            sb = torch.zeros(h, w, dtype=torch.long)
        sgy = g(torch.randint(0, gh, (gh * gw,), generator=generator, device=generator.device))
        sgx = g(torch.randint(0, gw, (gh * gw,), generator=generator, device=generator.device))
        src_b[i] = sb
        src_y[i] = (sgy * k + ys % k).clamp_(max=h - 1)
        src_x[i] = (sgx * k + xs % k).clamp_(max=w - 1)
    dev = z0.device
    gathered = z0[src_b.to(dev), :, src_y.to(dev), src_x.to(dev)]  # B x h x w x C
    gathered = gathered.permute(0, 3, 1, 2)
    smask = smask.to(dev, z0.dtype)
    z_src = smask * gathered + (1 - smask) * z0
    return z_src, smask


# --------------------------------------------------------------------------- training
def _coef(scheduler, t: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sqrt(abar_t), sqrt(1 - abar_t), (1 - sqrt(abar_t)) / sqrt(1 - abar_t)) as B x 1 x 1 x 1."""
    ab = _abar(scheduler)[t.cpu().long()]
    sa, s = ab.sqrt(), (1.0 - ab).sqrt()
    c = (1.0 - sa) / s
    shape = (-1,) + (1,) * (ref.dim() - 1)
    return tuple(v.to(ref.device, torch.float32).view(shape) for v in (sa, s, c))


def deco_forward(z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor,
                 scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked forward process as a deviation, eq. 7 + 10-11: returns ``(z_t, eta)``.

    ``eta = mask * (eps - (1 - sqrt(abar_t)) / sqrt(1 - abar_t) * z0)`` (eq. 11; 0 on untouched
    cells, where the paper's visible patches z^v stay equal to z0) and
    ``z_t = z0 + sqrt(1 - abar_t) * eta`` (eq. 11), which on noised cells equals
    ``sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`` (eq. 9) - METHOD.md's summary agrees with the paper
    here. ``t`` holds 0-based scheduler indices (``[B]``). Computed in fp32.
    """
    _, s, c = _coef(scheduler, t, z0)
    z0f = z0.float()
    eta = mask.to(z0.device).float() * (eps.to(z0.device).float() - c * z0f)
    z_t = z0f + s * eta
    return z_t.to(z0.dtype), eta


def deco_training_pair(z0: torch.Tensor, scheduler, generator: torch.Generator, *,
                       r_mask_max: float = 0.7, r_shuffle_max: float = 0.3, patch_sizes=PATCH_SIZES,
                       patch_probs: Sequence[float] | None = None):
    """One DeCo-Diff training example per image (section 5.1, eq. 7 and 10-12).

    Draws t ~ U{1..T} (returned 0-based, ``[B]`` long on z0's device), the patch mask
    (``random_patch_mask``), eps ~ N(0, I), and replaces eps by other images' patches on a
    shuffle mask of the same patch size (``shuffle_patches``; skipped if ``r_shuffle_max`` is 0
    or B = 1). Returns ``(z_t, t, eta, mask)`` from ``deco_forward``; ``eta`` is the fp32 target.
    """
    b = z0.shape[0]
    T = _num_steps(scheduler)
    t = torch.randint(0, T, (b,), generator=generator, device=generator.device).cpu()
    mask, ks, _ = random_patch_mask(z0.shape, generator, r_mask_max, patch_sizes,
                                    patch_probs=patch_probs, return_info=True)
    eps = torch.randn(tuple(z0.shape), generator=generator, device=generator.device, dtype=torch.float32)
    eps = eps.to(z0.device)
    mask = mask.to(z0.device)
    if r_shuffle_max > 0 and b > 1:
        z_src, smask = shuffle_patches(z0, generator, r_shuffle_max, ks)
        eps = torch.where(smask.bool().expand_as(eps), z_src.float(), eps)
    z_t, eta = deco_forward(z0, t, eps, mask, scheduler)
    return z_t, t.to(z0.device), eta, mask


def _predict(net: Callable, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = net(z_t, t)
    return out.sample if hasattr(out, "sample") else out


def deco_loss(net: Callable, z0: torch.Tensor, scheduler, generator: torch.Generator, **pair_kwargs) -> torch.Tensor:
    """Eq. 12: ``mean ||eta - eta_theta(z_t, t)||^2`` over all cells (noised and untouched), fp32.

    ``net(z_t, t)`` returns eta (a tensor or an object with ``.sample``, e.g. a diffusers
    ``UNet2DModel``). ``pair_kwargs`` go to ``deco_training_pair``.
    """
    z_t, t, eta, _ = deco_training_pair(z0, scheduler, generator, **pair_kwargs)
    pred = _predict(net, z_t, t)
    return F.mse_loss(pred.float(), eta.float())


# --------------------------------------------------------------------------- inference
def deco_timesteps(T: int, steps: int = 5, start_t: int | None = None) -> list[int]:
    """The 0-based scheduler indices visited by ``deco_correct``, descending.

    Default (``start_t=None``): the reference implementation's respacing (ADM ``"ddim{steps}"``
    on T = 10, i.e. stride ``T // steps`` from 0, identical to diffusers' ``DDIMScheduler``
    "leading" spacing): steps=5 -> [8, 6, 4, 2, 0] (paper t = 9, 7, 5, 3, 1), steps=10 ->
    [9 .. 0], steps=2 -> [5, 0], steps=1 -> [0]. The paper's "starting from time-step T" is thus
    the top of the respaced schedule. With ``start_t`` given: ``steps`` indices evenly spaced
    from ``start_t`` down to 0 (rounded, deduplicated).
    """
    T, steps = int(T), int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if start_t is None:
        stride = max(1, T // steps)
        return [i * stride for i in range(min(steps, T))][::-1]
    start_t = int(start_t)
    if not 0 <= start_t < T:
        raise ValueError(f"start_t must be in [0, {T - 1}], got {start_t}")
    ts = torch.linspace(start_t, 0, steps).round().long().tolist()
    out: list[int] = []
    for v in ts:
        if not out or v < out[-1]:
            out.append(int(v))
    return out


@torch.no_grad()
def deco_correct(net: Callable, z: torch.Tensor, scheduler, steps: int = 5, start_t: int | None = None,
                 strategy: str = "z_t-1") -> torch.Tensor:
    """Deviation correction, eq. 13-14: the test latent itself is z_T (no forward noising).

    For each index t of ``deco_timesteps(T, steps, start_t)`` (default [8, 6, 4, 2, 0]):
    ``z0_tilde = z_t - sqrt(1 - abar_t) * eta_theta(z_t, t)`` (eq. 13) and
    ``z_prev = z0_tilde + sqrt(1 - abar_prev) * eta_theta(z_t, t)`` (eq. 14, DDIM with eta = 0;
    ``abar_prev`` is the next visited index's, 1 after the last), so the result is the last
    z0_tilde. ``strategy="z0"`` is the table-3 alternative ``z_prev = z0_tilde``. 5 steps with
    the z_{t-1} strategy is the paper's default (table 3: best image-level metrics).

    The loop is :func:`ccad.diffusion.sampling.ddim_sample` on the equivalent variance-preserving
    table of :func:`deviation_vp_table` (the network still sees z_t); ``"z0"`` is its per-step
    correction. Returns z0_tilde in ``z``'s dtype.
    """
    if strategy not in ("z_t-1", "z0"):
        raise ValueError(f"strategy must be 'z_t-1' or 'z0', got {strategy!r}")
    ts = deco_timesteps(_num_steps(scheduler), steps, start_t)
    vp = deviation_vp_table(scheduler)
    scale = vp.sqrt()

    def eta_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the network sees z_t = x / sqrt(abar'_t)
        return _predict(net, (x / float(scale[int(t[0])])).to(z.dtype), t)

    def keep_z0(x: torch.Tensor, eta: torch.Tensor, t: int, a: float) -> tuple[torch.Tensor, torch.Tensor]:
        # table 3's z_prev = z0_tilde: the step sees sqrt(abar') z0_tilde with no deviation left
        return x - math.sqrt(1.0 - a) * eta, torch.zeros_like(eta)

    out = ddim_sample(eta_fn, float(scale[ts[0]]) * z.float(), scheduler, ts, alphas_cumprod=vp,
                      correct=keep_z0 if strategy == "z0" else None)
    return out.to(z.dtype)


def deviation_vp_table(scheduler) -> torch.Tensor:
    """DeCo-Diff's deviation process as a variance-preserving one: ``abar'_t = 1 / (2 - abar_t)``.

    Eq. 11's ``z_t = z0 + sqrt(1 - abar_t) eta`` is a variance-exploding process with sigma_t =
    sqrt(1 - abar_t); the scaled state ``x_t = sqrt(abar'_t) z_t`` with ``abar'_t = 1 / (1 +
    sigma_t^2)`` is ``sqrt(abar'_t) z0 + sqrt(1 - abar'_t) eta``, and DDIM (eta = 0, epsilon =
    eta) on ``abar'`` divided back by ``sqrt(abar'_{t-1})`` is exactly eq. 13-14:
    x0_pred = z_t - sigma_t eta = z0_tilde, z_{t-1} = z0_tilde + sigma_{t-1} eta.
    float32, one value per 0-based index."""
    return (1.0 / (2.0 - _abar(scheduler))).float()


def deco_anomaly_map(z0: torch.Tensor, z0_tilde: torch.Tensor, x0: torch.Tensor, x0_tilde: torch.Tensor,
                     gamma_l: float = 0.2, gamma_p: float = 0.4, *, pixel_reduce: str = "max",
                     pixel_scale: float = 2.0, sigma_l: float = 1.0, sigma_p: float = 3.0) -> torch.Tensor:
    """Eq. 15: ``a = sqrt(min(d_l, gamma_l) * min(d_p, gamma_p) / (gamma_l * gamma_p))``, B x 1 x H x W.

    * ``d_l = mean_c |z0_tilde - z0|`` on the latent grid (reference implementation: mean over
      latent channels), bilinearly upsampled to the image size.
    * ``d_p = reduce_c |x0_tilde - x0| * pixel_scale``. The paper writes only ``||.||``; the
      reference implementation takes the *max* over RGB of images in [-1, 1]. Images here are in
      [0, 1], so ``pixel_scale=2.0`` expresses the difference in the [-1, 1] units gamma_p = 0.4
      was tuned in (i.e. saturation at a 0.2 difference in [0, 1] units); ``pixel_reduce``
      "max" (default) or "mean". The reference implementation compares the decoder's
      reconstructions of *both* latents (x0 = decode(z0), x0_tilde = decode(z0_tilde)); pass
      those for a like-for-like map.
    * gamma_l = 0.2, gamma_p = 0.4: supp. D.2's best pair (section 4.3 / METHOD.md).
    * Smoothing (the paper states no sigma; reference implementation): each clipped term is
      Gaussian-smoothed before the product, ``sigma_l = 1`` latent cell on the latent grid and
      ``sigma_p = 3`` pixels (given for a 256-px image, scaled to the actual width with
      ``scaled_sigma``), via ``ccad.scoring.anomaly_map.gaussian_blur``; 0 disables either.

    The result is in [0, 1]: 0 where the input equals its correction, 1 where both deviations
    reach their thresholds. The image score of the reference implementation is the map's max.
    """
    if pixel_reduce not in ("max", "mean"):
        raise ValueError(f"pixel_reduce must be 'max' or 'mean', got {pixel_reduce!r}")
    if gamma_l <= 0 or gamma_p <= 0:
        raise ValueError("gamma_l and gamma_p must be > 0")
    H, W = x0.shape[-2:]
    d_l = (z0_tilde.float() - z0.float()).abs().mean(dim=1, keepdim=True)
    d_l = d_l.clamp(max=float(gamma_l)) / float(gamma_l)
    d_l = gaussian_blur(d_l, float(sigma_l))
    if tuple(d_l.shape[-2:]) != (H, W):
        d_l = F.interpolate(d_l, size=(H, W), mode="bilinear", align_corners=False)
    d_p = deco_pixel_term(x0, x0_tilde, gamma_p, pixel_reduce=pixel_reduce, pixel_scale=pixel_scale, sigma_p=sigma_p)
    return (d_l.clamp(0, 1) * d_p.clamp(0, 1)).sqrt()


def deco_pixel_term(x0: torch.Tensor, x0_tilde: torch.Tensor, gamma_p: float = 0.4, *, pixel_reduce: str = "max",
                    pixel_scale: float = 2.0, sigma_p: float = 3.0) -> torch.Tensor:
    """Eq. 15's clipped, smoothed pixel term ``min(d_p, gamma_p) / gamma_p`` alone (B x 1 x H x W,
    in [0, 1]; see :func:`deco_anomaly_map` for the reduction, scale and smoothing). With zero
    correction steps (``z0_tilde = z0``) eq. 15's latent term is 0 everywhere, so DeCo-Diff's ablation
    view is this term between the input and its autoencoder round trip."""
    if pixel_reduce not in ("max", "mean"):
        raise ValueError(f"pixel_reduce must be 'max' or 'mean', got {pixel_reduce!r}")
    W = int(x0.shape[-1])
    diff = (x0_tilde.float() - x0.float()).abs() * float(pixel_scale)
    d_p = diff.amax(dim=1, keepdim=True) if pixel_reduce == "max" else diff.mean(dim=1, keepdim=True)
    d_p = d_p.clamp(max=float(gamma_p)) / float(gamma_p)
    return gaussian_blur(d_p, scaled_sigma(float(sigma_p), W) if sigma_p > 0 else 0.0)
