"""The ``ccad`` entry points the app calls. Imports are lazy (``import app`` stays cheap) and
tests inject fakes through :class:`Engine`."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

ProgressFn = Optional[Callable[[int, int], None]]


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name(*a, **k)``, the module imported on the first call."""
    def call(*a: Any, **k: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*a, **k)
    return call


# attribute -> (module, function) of the real entry point, imported on first use
DEFAULTS = {"fit": ("ccad.pipeline", "fit_detector"), "train": ("ccad.pipeline", "train_detector"),
            "evaluate": ("ccad.evaluate", "evaluate"), "load_dataset": ("ccad.data.detect", "load_dataset"),
            "load_image": ("ccad.data.io", "load_image"), "export": ("ccad.export", "export_detector"),
            "measure_steps": ("ccad.train_probe", "measure_step_seconds")}


@dataclass
class Engine:
    """The ``ccad`` entry points the app calls. Defaults are the real ones."""

    load: Callable[..., Any] = None  # type: ignore[assignment]
    fit: Callable[..., Any] = None  # type: ignore[assignment]
    train: Callable[..., Any] = None  # type: ignore[assignment]
    evaluate: Callable[..., Any] = None  # type: ignore[assignment]
    load_dataset: Callable[..., Any] = None  # type: ignore[assignment]
    load_image: Callable[..., Any] = None  # type: ignore[assignment]
    export: Callable[..., Any] = None  # type: ignore[assignment]
    measure_steps: Callable[..., Any] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.load is None:
            self.load = lambda path, revision=None, **kw: _pipeline().AnomalyDetector.from_pretrained(
                path, revision=revision, **kw)
        for attr, (module, name) in DEFAULTS.items():
            if getattr(self, attr) is None:
                setattr(self, attr, _lazy(module, name))


def _pipeline() -> Any:
    import ccad.pipeline as p

    return p


def train_config(**wanted: Any) -> Any:
    """A :class:`ccad.training.TrainConfig` with the app's settings."""
    from ccad.training import TrainConfig

    return TrainConfig(**wanted)


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch missing is an install problem
        return False
