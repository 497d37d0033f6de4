"""Schedulers, training objectives (CCAD eq. 15) and reconstruction strategies (eq. 12-14, 18)."""
from .objectives import epsilon_loss, sample_timesteps
from .reconstruct import (
    ddad_reconstruct,
    ddim_step,
    reconstruction_timesteps,
)
from .schedule import ddim_from, make_scheduler

__all__ = [
    "ddad_reconstruct", "ddim_from", "ddim_step",
    "epsilon_loss", "make_scheduler", "reconstruction_timesteps", "sample_timesteps",
]
