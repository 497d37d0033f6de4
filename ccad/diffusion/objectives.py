"""Training objectives.

CCAD(V), eq. 15: L = E_{x, eps, t} || eps - eps_Theta(x_t; B_c) ||^2 with
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 17), t ~ U{0, ..., T-1}.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn


#: a sampler's ``generator``: one for the whole batch, or one per image (:func:`image_generators`)
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; drawn on the generator's device, then moved.

    ``generator`` may be a sequence of one generator per sample (``len == x.shape[0]``): sample
    ``i`` then gets noise from its own generator only, so an image's noise (and result) does not
    depend on which other images share its batch or where it sits in it."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([_randn_like(x[i:i + 1], g) for i, g in enumerate(generator)])
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(
        device=x.device, dtype=x.dtype
    )


def image_generators(seed: int, batch: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image of a batch, every one seeded with ``seed``: passed to a sampler (as
    ``generator``), each image's noise is the draw it would get alone, so its reconstruction, map
    and score depend only on the image and the model, never on its batch or its place in it."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for _ in range(int(batch))]


def sample_timesteps(batch: int, scheduler: DDPMScheduler, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Uniform integer timesteps in [0, T) (Algorithm 1, line 2)."""
    T = int(scheduler.config.num_train_timesteps)
    gdev = generator.device if generator is not None else "cpu"
    t = torch.randint(0, T, (batch,), generator=generator, device=gdev)
    return t.to(device) if device is not None else t


def epsilon_loss(model: nn.Module, x0: torch.Tensor, bank: torch.Tensor, scheduler: DDPMScheduler,
                 generator: Optional[torch.Generator] = None, timesteps: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 15: mean squared error between the true noise and eps_Theta(x_t; B_c).

    Args:
        model: ``model(x_t, t, bank) -> eps`` (e.g. :class:`ccad.models.BankConditionedUNet`).
        x0: clean images ``B x C x H x W`` in the model range [-1, 1].
        bank: the feature bank, ``xi x d`` or ``B x xi x d``.
        scheduler: a ``DDPMScheduler`` (its ``add_noise`` implements eq. 17).
        generator: makes t and eps reproducible (drawn on the generator's device).
        timesteps / noise: override the sampled t / eps (for tests and custom samplers).

    Returns a 0-d float32 tensor (the loss is computed in fp32 even under autocast).
    """
    if x0.dim() != 4:
        raise ValueError(f"x0 must be B x C x H x W, got shape {tuple(x0.shape)}")
    return noise_prediction_loss(lambda x_t, t: model(x_t, t, bank), x0, scheduler, generator, timesteps, noise)


def training_draws(x0: torch.Tensor, scheduler: DDPMScheduler, generator: Optional[torch.Generator],
                   timesteps: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A training step's ``(t, eps)``: t ~ U{0..T-1} (long, on ``x0``'s device) and eps ~ N(0, I)
    shaped like ``x0``, drawn from ``generator`` on its own device then moved; a given
    ``timesteps`` / ``noise`` is used instead (noise as given)."""
    if timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], scheduler, generator, device=x0.device)
    if noise is None:
        noise = _randn_like(x0, generator)
    return timesteps.to(x0.device).long(), noise


def noise_prediction_loss(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                          scheduler: DDPMScheduler, generator: Optional[torch.Generator] = None,
                          timesteps: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
    """``|| eps - eps_fn(x_t, t) ||^2`` with ``x_t = scheduler.add_noise(x0, eps, t)`` (eq. 15 / 17;
    the latent variants' eq. 10-11), t ~ U{0..T-1} and eps ~ N(0, I) drawn from ``generator`` on
    its own device, then moved. Returns a 0-d float32 loss (fp32 even under autocast)."""
    timesteps, noise = training_draws(x0, scheduler, generator, timesteps, noise)
    x_t = scheduler.add_noise(x0, noise.to(x0.device, x0.dtype), timesteps)
    eps = eps_fn(x_t, timesteps)
    return F.mse_loss(eps.float(), noise.float())
