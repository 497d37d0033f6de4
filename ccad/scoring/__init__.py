"""Input vs reconstruction -> anomaly map -> image score -> threshold and verdict.

Names are imported lazily, so ``ccad.scoring.verdict`` / ``domain`` / ``heatmap`` load without torch
(the export runtime uses them).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {"anomaly_map": "anomaly_map", "feature_cosine_map": "anomaly_map", "gaussian_blur": "anomaly_map",
            "image_score": "anomaly_map", "pixel_distance_map": "anomaly_map", "domain_adapt": "domain_adapt",
            "render_heatmap": "heatmap", "Calibration": "threshold"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ccad.scoring.{_EXPORTS[name]}"), name)
    try:
        return importlib.import_module(f"ccad.scoring.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'ccad.scoring' has no attribute {name!r}") from None


class _Scoring(types.ModuleType):
    """``ccad.scoring.anomaly_map`` / ``domain_adapt`` stay the functions (as when they were imported
    eagerly), even after the import system set the same-named submodules as attributes."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("anomaly_map", "domain_adapt"):
            return getattr(importlib.import_module(f"ccad.scoring.{name}"), name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Scoring
