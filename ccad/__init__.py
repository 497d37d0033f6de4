"""ccad: diffusion-based visual anomaly inspection (CCAD, PatchCore baseline).

    from ccad import AnomalyDetector, fit_detector, train_detector, FeatureBank

Names are imported lazily so ``import ccad`` (and ``ccad --help``) stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AnomalyDetector": "ccad.pipeline",
    "Prediction": "ccad.pipeline",
    "CheckpointError": "ccad.pipeline",
    "RunFolderExistsError": "ccad.pipeline",
    "count_statuses": "ccad.pipeline",
    "fit_detector": "ccad.pipeline",
    "train_detector": "ccad.pipeline",
    "evaluate": "ccad.evaluate",
    "FeatureBank": "ccad.features",
    "Backbone": "ccad.features",
    "PatchCoreScorer": "ccad.features",
    "DetectorConfig": "ccad.config",
    "register_method": "ccad.methods",
    "get_method": "ccad.methods",
    "Method": "ccad.methods",
    "load_image": "ccad.data.io",
    "ImageReadError": "ccad.data.io",
    "load_dataset": "ccad.data.datasets",
    "compute_metrics": "ccad.metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ccad' has no attribute {name!r}")
