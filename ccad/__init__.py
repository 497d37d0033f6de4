"""ccad: diffusion-based visual anomaly inspection (CCAD, PatchCore baseline).

    from ccad import AnomalyDetector, fit_detector, train_detector, FeatureBank

Names are imported lazily so ``import ccad`` (and ``ccad --help``) stay fast.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

# OpenMP threads that busy-wait between parallel regions burn the cores that other threads of the
# process (a web server's workers, image decoding) or other processes need, and a small model's
# batch-1 forward is thousands of short regions: on the shared 2-core machine the bundled demo took
# 15.9 s per inspection with the default (active) policy and 1.07 s with PASSIVE (issue 13 item 14,
# python -m benchmarks speed --model). Read by libgomp when torch is first imported, so it only takes
# effect when ccad is imported before torch; an explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_EXPORTS = {
    "AnomalyDetector": "ccad.detector",
    "Prediction": "ccad.prediction",
    "CheckpointError": "ccad.errors",
    "RunFolderExistsError": "ccad.errors",
    "count_statuses": "ccad.prediction",
    "fit_detector": "ccad.pipeline",
    "train_detector": "ccad.pipeline",
    "evaluate": "ccad.evaluate",
    "calibrate_labelled": "ccad.evaluate",
    "FeatureBank": "ccad.features",
    "Backbone": "ccad.features",
    "PatchCoreScorer": "ccad.features",
    "DetectorConfig": "ccad.detector_config",
    "register_method": "ccad.methods",
    "get_method": "ccad.methods",
    "Method": "ccad.methods",
    "load_image": "ccad.data.io",
    "ImageReadError": "ccad.data.io",
    "load_dataset": "ccad.data.detect",
    "compute_metrics": "ccad.metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ccad' has no attribute {name!r}")
