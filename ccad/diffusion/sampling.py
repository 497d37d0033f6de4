"""The one DDIM sampler every reconstruction runs on, built on diffusers' ``DDIMScheduler``.

Every method reconstructs by deterministic (or eta-stochastic) DDIM over a descending grid of
model timesteps, and differs only in (a) where it starts (the test image noised to a partial
step T', noiselessly scaled, or taken as it is) and the grid it visits, and (b) a per-step
*correction* of the network's prediction before the DDIM update:

* CCAD(V) / DDAD: eps_hat = eps - w sqrt(1 - abar_t) (xbar_t - x_t) (papers/ccad.md eq. 12-14),
  :func:`ddad_guidance`;
* D3AD: the same correction (papers/d3ad.md eq. 8, Algorithm 1 lines 6-7) after noiseless scaling;
* GLAD: the adaptive-step search and spatial-adaptive fusion replace the state and the noise at
  the step the anomaly shows (papers/glad.md sec. 3.3-3.4, eq. 2 and 6-7), see
  :func:`ccad.diffusion.glad.glad_reconstruct`;
* DeCo-Diff: its deviation process run as DDIM on an equivalent variance-preserving table, see
  :func:`ccad.diffusion.deco.deco_correct`;
* CCAD(C)/(F): none (eq. 9 / 19).

How the grid meets ``DDIMScheduler``: diffusers' ``step`` goes from ``t`` to
``t - num_train_timesteps // num_inference_steps`` and past 0 to ``final_alpha_cumprod``; the
methods' grids (``T', T' - skip, ..., skip`` then the clean image, abar = 1; GLAD's restarts;
DeCo's respacing) are not all of that form. :func:`respaced_ddim` therefore *respaces* the
table (Nichol & Dhariwal 2021, "Improved DDPM" sec. 4, the ``space_timesteps`` that DDAD's and
DeCo-Diff's reference code use): a ``DDIMScheduler`` with ``len(grid)`` training steps whose
``alphas_cumprod[k]`` is the original table at the k-th smallest grid timestep, walked by its
own ``set_timesteps(len(grid))`` (stride 1) with ``set_alpha_to_one=True``; the network is
called with the original timestep. For a grid that *is* a ``DDIMScheduler``'s own
``timesteps`` (with ``set_alpha_to_one``) the result equals a plain diffusers DDIM loop (a test
checks it). The DDIM update itself is eq. 18 of papers/ccad.md (the correct form of its
misprinted eq. 12/19): x_{t-1} = sqrt(abar_{t-1}) x0_pred + sqrt(1 - abar_{t-1} - sigma_t^2) eps
+ sigma_t z.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from diffusers import DDIMScheduler

from .objectives import Generators, _randn_like

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``correct(x_t, eps, t, abar_t) -> (x_t, eps)``: the state and the prediction the DDIM update
#: of step ``t`` uses (return them unchanged for plain DDIM).
Correction = Callable[[torch.Tensor, torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


def reconstruction_timesteps(start_step: int, steps: int, num_train_timesteps: int) -> list[int]:
    """The model-evaluation timesteps ``[T', T' - skip, ..., skip]`` (evenly spaced, descending).

    T' = 250 and 10 steps give 250, 225, ..., 25; the step after the last one lands on the clean
    image (abar = 1), so the final update returns the x_0 estimate. Raises ``ValueError`` with the
    offending field for ``start_step`` outside ``1..T-1``, ``steps < 1`` or ``steps > start_step``.
    """
    if not isinstance(start_step, int) or isinstance(start_step, bool):
        raise ValueError(f"start_step must be an int, got {start_step!r}")
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if not 1 <= start_step < num_train_timesteps:
        raise ValueError(
            f"start_step must be in 1..{num_train_timesteps - 1} (< num_train_timesteps={num_train_timesteps}), "
            f"got {start_step}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > start_step:
        raise ValueError(f"steps ({steps}) must be <= start_step ({start_step}): timesteps would repeat")
    # round(start_step * (1 - k/steps)) for k = 0..steps-1: exactly T' - k*skip when skip divides T'
    return [int(round(start_step * (steps - k) / steps)) for k in range(steps)]


def respaced_ddim(abar_grid: Sequence[float] | torch.Tensor, prediction_type: str = "epsilon") -> DDIMScheduler:
    """A ``DDIMScheduler`` over a respaced table (see the module docstring).

    ``abar_grid`` holds abar at the grid's timesteps in sampling order (descending t, so
    ascending abar); the scheduler's step ``k`` (``timesteps = [n-1, ..., 0]`` after
    ``set_timesteps(n)``, already called) has abar ``abar_grid[n-1-k]`` and the step after index
    0 lands on abar = 1. Betas are derived from the table for the constructor; its
    ``alphas_cumprod`` is then the table itself (float32, as the training table holds it, not
    re-multiplied from the betas)."""
    a = torch.as_tensor(abar_grid, dtype=torch.float32).flatten().flip(0)  # ascending t
    n = int(a.numel())  # a plain int, also while ccad export traces the graph
    if n < 1 or not bool(((a > 0) & (a <= 1)).all()):
        raise ValueError(f"abar values must be in (0, 1], got {a.tolist()}")
    a64 = a.double()
    prev = torch.cat([a64.new_ones(1), a64[:-1]])
    betas = (1.0 - a64 / prev).clamp(0.0, 1.0)
    ddim = DDIMScheduler(num_train_timesteps=n, trained_betas=betas.tolist(), clip_sample=False,
                         set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                         prediction_type=prediction_type)
    ddim.alphas_cumprod = a.clone()
    ddim.set_timesteps(n)
    return ddim


def _table(scheduler, alphas_cumprod: Optional[torch.Tensor]) -> torch.Tensor:
    table = scheduler.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    return torch.as_tensor(table).detach().float().cpu()


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, x_start: torch.Tensor, scheduler, timesteps: Sequence[int], *,
                correct: Optional[Correction] = None, eta: float = 0.0, generator: Generators = None,
                alphas_cumprod: Optional[torch.Tensor] = None, prediction_type: str = "epsilon") -> torch.Tensor:
    """DDIM from ``x_start`` (the state at ``timesteps[0]``) over the descending ``timesteps`` to abar = 1.

    Per step t: ``eps = eps_fn(x_t, t)`` (a ``B`` long tensor of t), ``(x_t, eps) = correct(x_t,
    eps, t, abar_t)`` when given, then ``DDIMScheduler.step(eps, k, x_t, eta)`` of the respaced
    scheduler (:func:`respaced_ddim`): eq. 18, sigma_t = eta sqrt((1 - abar_prev)/(1 - abar_t))
    sqrt(1 - abar_t/abar_prev). With ``eta > 0`` the sigma noise of every step but the last (sigma
    = 0 there) is drawn from ``generator`` (CPU generators give the same draw on every device).
    ``alphas_cumprod`` replaces the scheduler's table (DeCo-Diff's equivalent table). Returns
    the x0 estimate of the last step, float32, ``x_start``'s shape and device.
    """
    ts = [int(t) for t in timesteps]
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be a non-empty strictly descending list, got {ts}")
    if not math.isfinite(float(eta)) or eta < 0:
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    table = _table(scheduler, alphas_cumprod)
    if ts[0] >= table.numel() or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in 0..{table.numel() - 1}, got {ts}")
    ddim = respaced_ddim(table[ts], prediction_type)
    x = x_start.float()
    b = x.shape[0]
    for k, t in zip(ddim.timesteps.tolist(), ts):
        eps = eps_fn(x, torch.full((b,), t, device=x.device, dtype=torch.long)).float()
        if correct is not None:
            x, eps = correct(x, eps, t, float(table[t]))
        noise = None
        if eta > 0:
            noise = _randn_like(x, generator) if k > 0 else torch.zeros_like(x)
        x = ddim.step(eps, k, x, eta=float(eta), variance_noise=noise).prev_sample
    return x


@torch.no_grad()
def partial_ddim(eps_fn: EpsFn, x0: torch.Tensor, scheduler, start_step: int, steps: int, *,
                 noise: Optional[torch.Tensor] = None, generator: Generators = None,
                 correct: Optional[Correction] = None, eta: float = 0.0) -> torch.Tensor:
    """Reconstruct ``x0`` by a partial DDIM run: noise it to ``start_step`` T' (CCAD eq. 17,
    :func:`noised`), then ``steps`` DDIM updates (eq. 18) over :func:`reconstruction_timesteps`
    ``[T', T' - skip, ..., skip]`` to abar = 1 (:func:`ddim_sample`); returns the x0 estimate,
    float32.

    The start noise eps is ``noise`` when given (any shape that broadcasts to ``x0``'s, e.g. one
    fixed ``C x h x w`` field for every image), else drawn from ``generator`` (one per image from
    :func:`ccad.diffusion.objectives.image_generators` keeps every image's result independent of
    its batch). Each call builds its own respaced ``DDIMScheduler`` (:func:`ddim_sample`), so
    calls from several threads never share a timestep grid. ``eps_fn`` is called with ``x_t`` in
    ``x0``'s dtype. Serves CCAD(V)/(C)/(F) (:func:`ccad.diffusion.reconstruct.guided_ddim`) and
    feat-diff (:meth:`ccad.methods.feat_diff.FeatDiff.denoise`)."""
    T = int(scheduler.config.num_train_timesteps)
    timesteps = reconstruction_timesteps(int(start_step), int(steps), T)
    if x0.dim() < 2:
        raise ValueError(f"x0 must be B x ..., got shape {tuple(x0.shape)}")
    target = x0.float()
    eps = _randn_like(target, generator) if noise is None else noise.to(target.device, torch.float32).expand_as(target)
    # what eps_fn predicts is the scheduler's prediction_type (feat-diff may train x0- or v-prediction)
    prediction_type = str(getattr(scheduler.config, "prediction_type", None) or "epsilon")
    return ddim_sample(lambda x, t: eps_fn(x.to(x0.dtype), t), noised(target, scheduler, timesteps[0], eps),
                       scheduler, timesteps, correct=correct, eta=float(eta), generator=generator,
                       prediction_type=prediction_type)


def noised(x0: torch.Tensor, scheduler, t: int, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (CCAD eq. 17, diffusers ``add_noise``);
    ``noise=None`` is D3AD's noiseless scaling ``sqrt(abar_t) x0`` (papers/d3ad.md Algorithm 1
    line 4). float32.

    The arithmetic of diffusers' ``add_noise`` on the scheduler's table, without calling it:
    ``add_noise`` assigns ``scheduler.alphas_cumprod`` (moved to the sample's device), a write to
    the method's shared scheduler, and inference runs from several threads at once."""
    x0 = x0.float()
    eps = torch.zeros_like(x0) if noise is None else noise.to(x0.device, torch.float32)
    abar = torch.as_tensor(scheduler.alphas_cumprod).to(device=x0.device, dtype=x0.dtype)[int(t)]
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps


def ddad_guidance(target: torch.Tensor, weight: float) -> Correction:
    """DDAD's conditioning toward ``target`` (x̄_0, the test image or latent):
    ``xbar_t = sqrt(abar_t) x̄_0 + sqrt(1 - abar_t) eps`` (papers/ccad.md eq. 14) and
    ``eps_hat = eps - w sqrt(1 - abar_t) (xbar_t - x_t)`` (eq. 13); D3AD's eq. 8 / Algorithm 1
    lines 6-7 are the same correction (temperature w)."""
    target = target.float()
    w = float(weight)

    def correct(x_t: torch.Tensor, eps: torch.Tensor, t: int, abar_t: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = math.sqrt(1.0 - abar_t)
        xbar_t = math.sqrt(abar_t) * target + s * eps  # eq. 14
        return x_t, eps - w * s * (xbar_t - x_t)  # eq. 13

    return correct


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float, eta: float,
              noise: Optional[torch.Tensor]) -> torch.Tensor:
    """One DDIM update (eq. 18) from abar ``abar_t`` to ``abar_prev`` (1.0: the clean image),
    through ``DDIMScheduler.step`` of a two-entry respaced table. ``noise`` may be None when
    sigma_t is 0 (eta = 0 or the final step to abar = 1)."""
    last = float(abar_prev) >= 1.0
    ddim = respaced_ddim([abar_t] if last else [abar_t, abar_prev])
    k = int(ddim.timesteps[0])
    if eta > 0 and not last and noise is None:
        raise ValueError("ddim_step: sigma_t > 0 needs a noise tensor")
    if eta > 0 and noise is None:
        noise = torch.zeros_like(x_t)
    return ddim.step(eps, k, x_t, eta=float(eta), variance_noise=noise).prev_sample

