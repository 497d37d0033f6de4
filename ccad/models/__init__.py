"""Denoisers: the bank-conditioned diffusers UNet of CCAD(V) (later FCM and autoencoders)."""
from .denoiser import (
    BankConditionedUNet,
    DenoiserConfig,
    images_to_model,
    model_to_images,
)

__all__ = ["BankConditionedUNet", "DenoiserConfig", "images_to_model", "model_to_images"]
from .autoencoder import AutoencoderNotFound, LatentAutoencoder  # noqa: E402
from .autoencoder_load import load_autoencoder  # noqa: E402
from .taef2 import TAEF2  # noqa: E402

__all__ += ["AutoencoderNotFound", "LatentAutoencoder", "load_autoencoder", "TAEF2"]
