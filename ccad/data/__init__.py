"""ccad.data: images, masks, samples, dataset layouts and synthetic DAGM-style textures.

Modules: `io` (reading and writing image and mask files), `convert` (arrays to the float image
convention and to model tensors), `coerce` (anything a user hands over -> an image), `sample`
(the Sample record, `summarize`), `tree` (folder helpers the loaders share, DatasetLayoutError),
`skips` (files left out for their extension), `layouts/` (one loader module per layout family),
`detect` (layout detection, `load_dataset`), `dataset` (samples as tensors: ImageDataset,
iter_batches), `synthetic`.
"""

from ccad.data.coerce import coerce_image
from ccad.data.convert import mask_to_tensor, to_tensor
from ccad.data.dataset import ImageDataset, iter_batches, load_item, load_sample_mask
from ccad.data.detect import LAYOUTS, detect_layout, load_dataset
from ccad.data.io import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageReadError,
    list_images,
    load_image,
    load_mask,
    save_image,
    save_mask,
)
from ccad.data.layouts import (
    load_anomalib_folder,
    load_csv_manifest,
    load_dagm,
    load_dagm_ccad,
    load_folder,
    load_mvtec,
    load_mvtec3d,
    load_mvtec_loco,
    load_visa,
)
from ccad.data.sample import Sample, summarize
from ccad.data.synthetic import (
    DEFECTS,
    TEXTURES,
    SyntheticSample,
    generate_texture,
    make_sample,
    write_dataset,
)
from ccad.data.tree import DatasetLayoutError

__all__ = [
    "DEFECTS",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "MAX_PIXELS",
    "TEXTURES",
    "DatasetLayoutError",
    "ImageDataset",
    "ImageReadError",
    "Sample",
    "SyntheticSample",
    "coerce_image",
    "detect_layout",
    "generate_texture",
    "iter_batches",
    "list_images",
    "load_anomalib_folder",
    "load_csv_manifest",
    "load_dagm",
    "load_dagm_ccad",
    "load_dataset",
    "load_folder",
    "load_image",
    "load_item",
    "load_mask",
    "load_mvtec",
    "load_mvtec3d",
    "load_mvtec_loco",
    "load_sample_mask",
    "load_visa",
    "make_sample",
    "mask_to_tensor",
    "save_image",
    "save_mask",
    "summarize",
    "to_tensor",
    "write_dataset",
]
