"""Frozen backbones -> patch features -> streaming coreset -> FeatureBank; PatchCore.

Modules: `backbone` (frozen ImageNet extractors), `stream` (image sources -> batches -> features),
`coreset` (greedy k-center, streaming), `bank` (FeatureBank: build, save, load, summary),
`projection` (the bank's 2-D PCA view), `patchcore` (nearest-neighbour patch scoring).

CCAD sec. 3.2 (eq. 5-6): the coarse feature bank ``B_c`` is a greedy k-center coreset of fixed
size ``xi`` of the locally aware patch features of all good images; PatchCore (Roth et al. 2022)
scores patches by their nearest-neighbour distance to a coreset memory bank.
"""

from .backbone import (
    DEFAULT_LAYERS,
    SUPPORTED_BACKBONES,
    Backbone,
    WeightsNotFound,
    clear_backbone_cache,
    get_backbone,
)
from .bank import Cancelled, FeatureBank
from .coreset import (
    MAX_BANK_SIZE,
    StreamingCoreset,
    covering_radius,
    greedy_coreset,
    validate_bank_size,
)
from .patchcore import PatchCoreScorer, nearest_distances
from .projection import project_2d
from .stream import ImageStream

__all__ = [
    "Backbone",
    "WeightsNotFound",
    "get_backbone",
    "clear_backbone_cache",
    "DEFAULT_LAYERS",
    "SUPPORTED_BACKBONES",
    "greedy_coreset",
    "StreamingCoreset",
    "covering_radius",
    "validate_bank_size",
    "MAX_BANK_SIZE",
    "FeatureBank",
    "Cancelled",
    "ImageStream",
    "project_2d",
    "PatchCoreScorer",
    "nearest_distances",
]
