"""DDAD-conditioned reconstruction: test image -> its "normal" counterpart x_hat_0.

CCAD(V) uses DDAD's conditioned DDIM sampling (papers/ccad.md eq. 12-14 with the DDIM step of
eq. 18); the latent variants the same sampler without the conditioning. The other methods'
reconstructions (D3AD, DeCo-Diff, GLAD) live in their own modules, on the same sampler
(:mod:`ccad.diffusion.sampling`). All tensors are in the model range [-1, 1].
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from .objectives import Generators
from .sampling import ddad_guidance, ddim_step, partial_ddim, reconstruction_timesteps

__all__ = ["ddad_reconstruct", "ddim_step", "guided_ddim", "reconstruction_timesteps"]


@torch.no_grad()
def ddad_reconstruct(model: nn.Module, x0: torch.Tensor, bank: torch.Tensor,
                     scheduler: DDPMScheduler | DDIMScheduler, start_step: int = 250, steps: int = 10,
                     guidance: float = 2.0, eta: float = 1.0,
                     generator: Generators = None) -> torch.Tensor:
    """DDAD-conditioned reconstruction of CCAD(V) (eq. 12-14, DDIM direction term of eq. 18).

    1. x_{T'} = sqrt(abar_{T'}) x0 + sqrt(1 - abar_{T'}) eps  (x0 noised to ``start_step``).
    2. For each t in ``[T', T' - skip, ..., skip]`` (``steps`` values, skip = T'/steps):
       eps_t = eps_Theta(x_t; B);  xbar_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_t  (eq. 14);
       eps_hat = eps_t - w sqrt(1 - abar_t) (xbar_t - x_t)  (eq. 13, w = ``guidance``);
       x_{t-skip} = DDIM update with eps_hat (eq. 18; sigma_t = eta * ...).
       The last step goes to abar = 1, so it returns x0_hat = (x_t - sqrt(1-abar_t) eps_hat)/sqrt(abar_t).

    The loop is :func:`ccad.diffusion.sampling.ddim_sample` (diffusers' ``DDIMScheduler.step``
    on the respaced grid, the sigma noise drawn from ``generator``) with the correction
    :func:`ccad.diffusion.sampling.ddad_guidance`. Differences from
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
                eta: float = 0.0, generator: Generators = None) -> torch.Tensor:
    """Noise ``x0`` to ``start_step``, then ``steps`` DDIM updates (eq. 18) back to abar = 1.

    ``guidance`` > 0 applies DDAD's conditioning toward ``x0`` (CCAD eq. 13-14); 0 is plain DDIM
    (the latent variants' eq. 9 / 19). ``eps_fn(x_t, t) -> eps`` closes over the network and its
    conditions. Serves :func:`ddad_reconstruct` and
    :func:`ccad.diffusion.latent.latent_ddim_reconstruct`; the loop is
    :func:`ccad.diffusion.sampling.partial_ddim` (noising + :func:`ccad.diffusion.sampling.ddim_sample`).
    """
    reconstruction_timesteps(start_step, steps, int(scheduler.config.num_train_timesteps))  # names a bad field
    if x0.dim() != 4:
        raise ValueError(f"x0 must be B x C x h x w, got shape {tuple(x0.shape)}")
    if not math.isfinite(float(guidance)) or not math.isfinite(float(eta)) or eta < 0:
        raise ValueError(f"guidance must be finite and eta >= 0, got guidance={guidance}, eta={eta}")
    return partial_ddim(eps_fn, x0, scheduler, start_step, steps, generator=generator,
                        correct=ddad_guidance(x0, guidance) if guidance else None, eta=float(eta))

