"""ccad.data: images, masks, samples, dataset layouts and synthetic DAGM-style textures."""

from ccad.data.io import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageReadError,
    coerce_image,
    list_images,
    load_image,
    load_mask,
    mask_to_tensor,
    to_tensor,
)
from ccad.data.sample import Sample

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "ImageReadError",
    "Sample",
    "coerce_image",
    "list_images",
    "load_image",
    "load_mask",
    "mask_to_tensor",
    "to_tensor",
]
