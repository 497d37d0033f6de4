"""ccad.data: images, masks, samples, dataset layouts and synthetic DAGM-style textures.

Modules: `io` (reading and writing image and mask files), `convert` (arrays to the float image
convention and to model tensors), `coerce` (anything a user hands over -> an image), `sample`
(the Sample record, `summarize`), `tree` (folder helpers the loaders share, DatasetLayoutError),
`skips` (files left out for their extension), `layouts/` (one loader module per layout family),
`detect` (layout detection, `load_dataset`), `dataset` (samples as tensors: ImageDataset,
iter_batches), `synthetic`.

Names are imported lazily (on first use), so reading images (``ccad.data.io`` / ``coerce``) does not
import torch: the export runtime (``ccad.runtime``) reads images through them without it.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "coerce_image": "coerce",
    "mask_to_tensor": "convert", "to_tensor": "convert",
    "ImageDataset": "dataset", "iter_batches": "dataset", "load_item": "dataset", "load_sample_mask": "dataset",
    "LAYOUTS": "detect", "detect_layout": "detect", "load_dataset": "detect",
    "IMAGE_EXTENSIONS": "io", "MAX_PIXELS": "io", "ImageReadError": "io", "list_images": "io", "load_image": "io",
    "load_mask": "io", "save_image": "io", "save_mask": "io",
    "load_anomalib_folder": "layouts", "load_csv_manifest": "layouts", "load_dagm": "layouts",
    "load_dagm_ccad": "layouts", "load_folder": "layouts", "load_mvtec": "layouts", "load_mvtec3d": "layouts",
    "load_mvtec_loco": "layouts", "load_visa": "layouts",
    "Sample": "sample", "summarize": "sample",
    "DEFECTS": "synthetic", "TEXTURES": "synthetic", "SyntheticSample": "synthetic", "generate_texture": "synthetic",
    "make_sample": "synthetic", "write_dataset": "synthetic",
    "DatasetLayoutError": "tree",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ccad.data.{_EXPORTS[name]}"), name)
    try:  # a submodule reached as an attribute (ccad.data.io)
        return importlib.import_module(f"ccad.data.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'ccad.data' has no attribute {name!r}") from None
