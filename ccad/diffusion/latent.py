"""Training loss and reconstruction of the latent variants CCAD(C) / CCAD(F).

Both take ``eps_fn(z_t, t) -> eps``, a closure over the networks and conditions, e.g.
``lambda z, t: latent_eps(unet, controlnet, projector, z, t, bank, image)`` with ``bank`` = B_c
(CCAD(C), eq. 11, 19) or ``fcm(latent_patch_features(z0), B_c)`` (CCAD(F), eq. 9-10), so one
loss / one sampler serves both. Tensors are latents ``B x C x h x w`` (unit variance).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from .objectives import Generators, noise_prediction_loss
from .reconstruct import guided_ddim

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def latent_eps_loss(eps_fn: EpsFn, z0: torch.Tensor, scheduler: Union[DDPMScheduler, DDIMScheduler],
                    generator: Optional[torch.Generator] = None, timesteps: Optional[torch.Tensor] = None,
                    noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 10 (CCAD(F)) / eq. 11 (CCAD(C)): E ||eps - eps_Theta^t(z_t; x; bank)||^2.

    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (eq. 2, ``scheduler.add_noise``), t ~ U{0..T-1}
    (Algorithms 1-2 line 2 write U(1, T) in 1-based steps), eps ~ N(0, I). t and eps are drawn
    from ``generator`` on its own device and moved to ``z0``'s device (the same CPU generator
    gives the same draw on CPU and GPU). ``timesteps`` / ``noise`` override the draws.
    Returns a 0-d float32 loss (computed in fp32).
    """
    if z0.dim() != 4:
        raise ValueError(f"z0 must be B x C x h x w latents, got shape {tuple(z0.shape)}")
    return noise_prediction_loss(eps_fn, z0, scheduler, generator, timesteps, noise)


def latent_start_step(scheduler: Union[DDPMScheduler, DDIMScheduler]) -> int:
    """The paper's start step for the latent variants: T - 1 (the last trained timestep).

    Algorithms 1-2 (lines 7-9) start every reconstruction from z_T ~ N(0, I) and run t = T..1,
    the content being carried by the image condition x through the ControlNet (as in DiAD).
    We noise the test latent to the last 0-based timestep T - 1 instead of drawing pure noise:
    in distribution it is the same start (sqrt(abar_{999}) is 0.068 for SD's scaled_linear
    table, 0.006 for the linear 1e-4..0.02 one), and a smaller ``start_step`` gives the
    partial-noising variant used by DDAD / CCAD(V).
    """
    return int(scheduler.config.num_train_timesteps) - 1


@torch.no_grad()
def latent_ddim_reconstruct(eps_fn: EpsFn, z0: torch.Tensor, scheduler: Union[DDPMScheduler, DDIMScheduler],
                            start_step: Optional[int] = None, steps: int = 10, eta: float = 0.0,
                            generator: Generators = None) -> torch.Tensor:
    """Reconstruct the normal latent z0_hat (eq. 9 CCAD(F), eq. 19 CCAD(C); DDIM step of eq. 18).

    1. z_{T'} = sqrt(abar_{T'}) z0 + sqrt(1 - abar_{T'}) eps, eps from ``generator``
       (T' = ``start_step``, default :func:`latent_start_step` = T - 1, the paper's z_T).
    2. For t in ``[T', T' - skip, ..., skip]`` (``steps`` values, :func:`reconstruction_timesteps`):
       eps_t = eps_fn(z_t, t); z_{t-skip} = sqrt(abar_prev) z0_pred + sqrt(1 - abar_prev - sigma_t^2) eps_t
       + sigma_t noise (eq. 18: the paper's eq. 9/19 print the direction coefficient as
       sqrt(1 - abar_{t-1}) sigma_t^2 / a misplaced radical; eq. 18 is the DDIM update),
       sigma_t = eta * sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev).
       The last step goes to abar = 1 and returns the x0 prediction.

    ``eta = 0`` (default) is deterministic DDIM after the initial noising. The loop is the one
    sampler :func:`ccad.diffusion.sampling.ddim_sample` (diffusers' ``DDIMScheduler.step``, the
    same one CCAD(V)'s sampler uses, the noise from our generator).

    Returns z0_hat, ``B x C x h x w`` float32 (same device as ``z0``).
    """
    if z0.dim() != 4:
        raise ValueError(f"z0 must be B x C x h x w latents, got shape {tuple(z0.shape)}")
    if start_step is None:
        start_step = latent_start_step(scheduler)
    return guided_ddim(eps_fn, z0.float(), scheduler, start_step=int(start_step), steps=int(steps), guidance=0.0,
                       eta=float(eta), generator=generator)


def latent_distance_map(z0: torch.Tensor, z0_hat: torch.Tensor,
                        size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Latent distance term: mean over channels of |z0 - z0_hat|, bilinearly upsampled -> ``B x 1 x H x W``.

    The optional latent-space companion of the feature map of eq. 16 (D3AD / DeCo-Diff use an
    L1 latent distance the same way). ``size``: int (square) or ``(H, W)``.
    """
    if z0.shape != z0_hat.shape or z0.dim() != 4:
        raise ValueError(f"z0 and z0_hat must both be B x C x h x w, got {tuple(z0.shape)} and {tuple(z0_hat.shape)}")
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    d = (z0.float() - z0_hat.float()).abs().mean(dim=1, keepdim=True)
    return F.interpolate(d, size=hw, mode="bilinear", align_corners=False)
