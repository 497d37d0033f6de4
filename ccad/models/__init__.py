"""Denoisers: the bank-conditioned diffusers UNet of CCAD(V) (later FCM and autoencoders)."""
from .denoiser import (
    BankConditionedUNet,
    DenoiserConfig,
    images_to_model,
    model_to_images,
)

__all__ = ["BankConditionedUNet", "DenoiserConfig", "images_to_model", "model_to_images"]
