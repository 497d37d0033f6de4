"""Feature bank tab: build the bank + PatchCore detector, its summary and projection, and save a
model."""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import views
from ..batch import left_out_files, name_list
from ..engine import ProgressFn
from ..errors import UserError
from .base import ControllerBase


class BankMixin(ControllerBase):
    """Building, summarising and saving feature banks and detectors."""

    def build_bank(self, folder: Optional[str], zip_file: Optional[str], backbone: str, layers: Sequence[int],
                   xi: int, image_size: int, progress: ProgressFn = None,
                   cancel: Optional[Callable[[], bool]] = None) -> tuple[str, dict[str, Any], Any, str]:
        """Build the feature bank + PatchCore detector (``ccad.fit_detector``); register it as a model.
        An uploaded zip is extracted for this request only and removed when the build is done."""
        with ExitStack() as stack:
            return self._build_bank(self._data_folder(folder, zip_file, stack), backbone, layers, xi, image_size,
                                    progress, cancel)

    def _build_bank(self, path: Path, backbone: str, layers: Sequence[int], xi: int, image_size: int,
                    progress: ProgressFn = None,
                    cancel: Optional[Callable[[], bool]] = None) -> tuple[str, dict[str, Any], Any, str]:
        layers = tuple(int(v) for v in layers)
        if not layers:
            raise UserError("choose at least one backbone layer")
        if not 1 <= int(xi) <= 1000:
            raise UserError(f"bank size xi must be in 1..1000, got {xi}")
        t0 = time.perf_counter()
        try:
            det = self.engine.fit(str(path), backbone=backbone, layers=layers, bank_size=int(xi),
                                  image_size=int(image_size), progress=progress, cancel=cancel)
        except Exception as exc:
            if type(exc).__name__ == "Cancelled":
                raise UserError("bank building cancelled") from None
            raise UserError(f"building the bank from {path.name} failed ({type(exc).__name__}: {exc})") from None
        seconds = time.perf_counter() - t0
        name = self.registry.add(f"bank {path.name} ({getattr(det, 'variant', 'bank')})", det,
                                 f"bank built from {path}")
        summary = self.bank_summary(det)
        fig = self.bank_projection(det, path)
        built = int(det.bank.features.shape[0]) if getattr(det, "bank", None) is not None else int(xi)
        skipped = left_out_files(det)
        return name, summary, fig, (f"Built a {built}-vector bank and a PatchCore detector from {path.name} in "
                                    f"{seconds:.1f} s; it is now the active model in the Inspect tab."
                                    + (f" Left out {len(skipped)} file(s): {name_list(skipped)}." if skipped else ""))

    def bank_summary(self, det: Any) -> dict[str, Any]:
        bank = getattr(det, "bank", None)
        if bank is None:
            return {}
        try:
            return dict(bank.summary())
        except Exception as exc:
            return {"error": f"summary unavailable ({exc})"}

    def bank_projection(self, det: Any, folder: Optional[Path] = None) -> Any:
        """PCA projection of the bank against a sample of all patch features (``ccad.features.projection``)."""
        try:
            from ccad.features.projection import project_2d
        except Exception:
            return views.projection_figure(np.zeros((0, 2)), None)
        try:
            proj = project_2d(det.bank, samples=str(folder) if folder else None)
        except TypeError:
            proj = project_2d(det.bank)
        except Exception:
            return views.projection_figure(np.zeros((0, 2)), None)
        if isinstance(proj, dict):
            return views.projection_figure(np.asarray(proj.get("bank")), proj.get("all"))
        if isinstance(proj, tuple):
            return views.projection_figure(np.asarray(proj[0]), None if len(proj) < 2 or proj[1] is None
                                           else np.asarray(proj[1]))
        return views.projection_figure(np.asarray(proj), None)

    def save_model(self, name: Optional[str], dest: str, what: str = "detector") -> str:
        """Save the detector (or only its bank) to a folder inside the data root."""
        det = self._detector_no_activate(name) if name else None
        if det is None:
            raise UserError("no model selected to save")
        path = self._in_root(dest, must_exist=False)
        if path.exists() and not path.is_dir():
            raise UserError(f"{dest}: exists and is not a folder")
        if what == "bank" and getattr(det, "bank", None) is None:
            raise UserError(f"{name} has no feature bank to save (its method builds none); save the detector")
        try:
            if what == "bank":
                path.mkdir(parents=True, exist_ok=True)
                det.bank.save(path)
            else:
                det.save_pretrained(path)
        except Exception as exc:
            raise UserError(f"saving to {dest} failed ({type(exc).__name__}: {exc})") from None
        return f"Saved the {'bank' if what == 'bank' else 'detector'} of {name} to {path}."
