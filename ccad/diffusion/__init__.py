"""Schedulers, training objectives (CCAD eq. 15) and reconstruction strategies (eq. 12-14, 18)."""
from .objectives import epsilon_loss, sample_timesteps
from .reconstruct import (
    RECONSTRUCTORS,
    ReconstructionStrategy,
    ddad_reconstruct,
    ddim_step,
    get_reconstructor,
    reconstruction_timesteps,
)
from .schedule import ddim_from, make_scheduler

__all__ = [
    "RECONSTRUCTORS", "ReconstructionStrategy", "ddad_reconstruct", "ddim_from", "ddim_step",
    "epsilon_loss", "get_reconstructor", "make_scheduler", "reconstruction_timesteps", "sample_timesteps",
]
