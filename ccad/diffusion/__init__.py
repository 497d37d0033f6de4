"""Schedulers, training objectives (CCAD eq. 15), the one DDIM sampler (eq. 18) and the
reconstruction strategies on it (eq. 12-14)."""
from .objectives import epsilon_loss, sample_timesteps
from .reconstruct import ddad_reconstruct
from .sampling import ddad_guidance, ddim_sample, ddim_step, reconstruction_timesteps, respaced_ddim
from .schedule import ddim_from, make_scheduler

__all__ = [
    "ddad_guidance", "ddad_reconstruct", "ddim_from", "ddim_sample", "ddim_step", "epsilon_loss", "make_scheduler",
    "reconstruction_timesteps", "respaced_ddim", "sample_timesteps",
]
