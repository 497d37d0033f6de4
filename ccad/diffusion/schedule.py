"""Noise schedules (CCAD eq. 17: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps).

The abar tables come from diffusers' schedulers (never hand-rolled): ``DDPMScheduler`` for
training (its ``add_noise`` and ``alphas_cumprod``), ``DDIMScheduler`` for sampling. DDAD's
published defaults: T = 1000, linear beta 1e-4 ... 0.02.
"""
from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler


def make_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                   beta_start: float = 1e-4, beta_end: float = 0.02) -> DDPMScheduler:
    """A DDPM scheduler with epsilon prediction and no sample clipping (eq. 17's abar table)."""
    if int(num_train_timesteps) < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    known = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
    if beta_schedule not in known:
        raise ValueError(f"beta_schedule must be one of {known}, got {beta_schedule!r}")
    return DDPMScheduler(
        num_train_timesteps=int(num_train_timesteps),
        beta_schedule=beta_schedule,
        beta_start=float(beta_start),
        beta_end=float(beta_end),
        prediction_type="epsilon",
        clip_sample=False,
    )


def ddim_from(ddpm: DDPMScheduler) -> DDIMScheduler:
    """The DDIM scheduler (eq. 18) sharing ``ddpm``'s beta table; no clipping, final abar = 1."""
    return DDIMScheduler.from_config(ddpm.config, clip_sample=False, set_alpha_to_one=True,
                                     prediction_type="epsilon")
