"""Reconstruction strategies: test image -> its "normal" counterpart x_hat_0.

CCAD(V) uses DDAD's conditioned DDIM sampling (papers/ccad.md eq. 12-14 with the DDIM step of
eq. 18): :func:`ddad_reconstruct`, the one strategy (``diffusion.strategy = "ddad"``); the other
methods' samplers live in their own modules (d3ad, deco, glad). All tensors are in the model
range [-1, 1].
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from .objectives import _randn_like


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


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float, eta: float,
              noise: Optional[torch.Tensor]) -> torch.Tensor:
    """One DDIM update, eq. 18 (the correct form of CCAD eq. 12/19):

    x_{t-1} = sqrt(abar_{t-1}) * x0_pred + sqrt(1 - abar_{t-1} - sigma_t^2) * eps + sigma_t * noise,
    x0_pred = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t),
    sigma_t = eta * sqrt((1 - abar_{t-1}) / (1 - abar_t)) * sqrt(1 - abar_t / abar_{t-1}).

    ``noise`` may be None when sigma_t is 0 (eta = 0 or the final step to abar = 1).
    """
    sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * math.sqrt(max(0.0, 1.0 - abar_t / abar_prev))
    x0_pred = (x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
    direction = math.sqrt(max(0.0, 1.0 - abar_prev - sigma ** 2)) * eps
    out = math.sqrt(abar_prev) * x0_pred + direction
    if sigma > 0.0:
        if noise is None:
            raise ValueError("ddim_step: sigma_t > 0 needs a noise tensor")
        out = out + sigma * noise
    return out


@torch.no_grad()
def ddad_reconstruct(model: nn.Module, x0: torch.Tensor, bank: torch.Tensor,
                     scheduler: DDPMScheduler | DDIMScheduler, start_step: int = 250, steps: int = 10,
                     guidance: float = 2.0, eta: float = 1.0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DDAD-conditioned reconstruction of CCAD(V) (eq. 12-14, DDIM direction term of eq. 18).

    1. x_{T'} = sqrt(abar_{T'}) x0 + sqrt(1 - abar_{T'}) eps  (x0 noised to ``start_step``).
    2. For each t in ``[T', T' - skip, ..., skip]`` (``steps`` values, skip = T'/steps):
       eps_t = eps_Theta(x_t; B);  xbar_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_t  (eq. 14);
       eps_hat = eps_t - w sqrt(1 - abar_t) (xbar_t - x_t)  (eq. 13, w = ``guidance``);
       x_{t-skip} = DDIM update with eps_hat (eq. 18; sigma_t = eta * ...), see :func:`ddim_step`.
       The last step goes to abar = 1, so it returns x0_hat = (x_t - sqrt(1-abar_t) eps_hat)/sqrt(abar_t).

    The update is written out here against the scheduler's ``alphas_cumprod`` table rather than
    through ``DDIMScheduler.step``: DDAD evaluates arbitrary (T'-relative) timesteps with a
    guided eps_hat and draws the sigma noise from our generator; bending ``set_timesteps`` /
    ``step`` to that (its timestep grid starts at 0 with ``steps_offset`` and it expects to own
    the noise) is harder to read and verify than the three lines of eq. 18. Differences from
    DDAD's code (which noises to T' but first evaluates the model at T' - skip): we evaluate the
    model at the timestep x_t was noised to. ``eta = 1`` is DDAD's stochastic DDIM; ``eta = 0``
    is deterministic.

    Args:
        model: ``model(x_t, t, bank) -> eps`` in the model range; put it in ``eval()`` mode first.
        x0: the test images (the guidance target xbar_0), ``B x C x H x W`` in [-1, 1].
        bank: ``xi x d`` or ``B x xi x d``.
        scheduler: any diffusers scheduler with ``alphas_cumprod`` / ``num_train_timesteps``.
        generator: a ``torch.Generator``; the same seed gives the same output.

    Returns x0_hat, same shape as ``x0`` (float32, not clamped).
    """
    return guided_ddim(lambda x_t, t: model(x_t, t, bank), x0, scheduler, start_step=start_step, steps=steps,
                       guidance=guidance, eta=eta, generator=generator)


def guided_ddim(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                scheduler: DDPMScheduler | DDIMScheduler, start_step: int, steps: int, guidance: float = 0.0,
                eta: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Noise ``x0`` to ``start_step``, then ``steps`` DDIM updates (eq. 18) back to abar = 1.

    ``guidance`` > 0 applies DDAD's conditioning toward ``x0`` (CCAD eq. 13-14); 0 is plain DDIM
    (the latent variants' eq. 9 / 19). ``eps_fn(x_t, t) -> eps`` closes over the network and its
    conditions. The one sampler loop of :func:`ddad_reconstruct` and
    :func:`ccad.diffusion.latent.latent_ddim_reconstruct`.
    """
    T = int(scheduler.config.num_train_timesteps)
    timesteps = reconstruction_timesteps(start_step, steps, T)
    if x0.dim() != 4:
        raise ValueError(f"x0 must be B x C x H x W, got shape {tuple(x0.shape)}")
    if not math.isfinite(float(guidance)) or not math.isfinite(float(eta)) or eta < 0:
        raise ValueError(f"guidance must be finite and eta >= 0, got guidance={guidance}, eta={eta}")
    abar = scheduler.alphas_cumprod.double().cpu()
    target = x0.float()
    b = x0.shape[0]
    a0 = float(abar[timesteps[0]])
    x_t = math.sqrt(a0) * target + math.sqrt(1.0 - a0) * _randn_like(target, generator)
    for i, t in enumerate(timesteps):
        a_t = float(abar[t])
        a_prev = float(abar[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        t_batch = torch.full((b,), t, device=x0.device, dtype=torch.long)
        eps = eps_fn(x_t.to(x0.dtype), t_batch).float()
        if guidance:
            xbar_t = math.sqrt(a_t) * target + math.sqrt(1.0 - a_t) * eps  # eq. 14
            eps = eps - guidance * math.sqrt(1.0 - a_t) * (xbar_t - x_t)  # eq. 13
        noise = _randn_like(target, generator) if (eta > 0 and a_prev < 1.0) else None
        x_t = ddim_step(x_t, eps, a_t, a_prev, eta, noise)  # eq. 18
    return x_t

