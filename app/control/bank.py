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
from ..errors import UserError, hide_paths
from .base import ControllerBase


class BankMixin(ControllerBase):
    """Building, summarising and saving feature banks and detectors."""

    def build_bank(self, folder: Optional[str], zip_file: Optional[str], backbone: str, layers: Sequence[int],
                   xi: int, image_size: int, progress: ProgressFn = None,
                   cancel: Optional[Callable[[], bool]] = None,
                   owner: Optional[str] = None,
                   memory_percent: Optional[float] = None) -> tuple[str, dict[str, Any], Any, str]:
        """Build the feature bank + PatchCore detector (``ccad.fit_detector``); register it as a model.
        An uploaded zip is extracted for this request only and removed when the build is done.

        ``xi`` is the Coarse Feature Bank's size (what the diffusion methods are conditioned on);
        ``memory_percent`` the PatchCore detector's memory (the coreset ratio, in % of all patches:
        what its scores are measured against; None: the method's default).

        The build is listed server-side (:meth:`bank_jobs_text`) under ``owner`` (the browser that
        asked for it), so a reloaded page still shows it and can cancel it (:meth:`cancel_bank`)."""
        label = Path(str(zip_file)).name if zip_file else (folder or "")
        job = {"owner": owner, "label": label, "state": "running", "done": 0, "total": 0,
               "started": time.time(), "message": "", "cancel": False}
        with self._bank_lock:
            self._bank_jobs[owner] = job

        def prog(done: int, total: int) -> None:
            job["done"], job["total"] = int(done), int(total)
            if progress is not None:
                progress(done, total)

        def stop() -> bool:
            return bool(job["cancel"]) or (cancel is not None and bool(cancel()))

        try:
            with ExitStack() as stack:
                out = self._build_bank(self._data_folder(folder, zip_file, stack), backbone, layers, xi, image_size,
                                       prog, stop, memory_percent)
        except Exception as exc:
            job["state"] = "cancelled" if job["cancel"] or "cancelled" in str(exc) else "failed"
            job["message"] = str(exc)
            raise
        job["state"], job["message"] = "finished", out[3]
        return out

    def cancel_bank(self, owner: Optional[str] = None) -> str:
        """Cancel the bank build this browser (``owner``) started, also after a page reload."""
        with self._bank_lock:
            job = self._bank_jobs.get(owner)
            if job is None or job["state"] != "running":
                return "No bank build of this browser is running."
            job["cancel"] = True
        return f"Cancelling the bank build from {job['label']}..."

    def bank_jobs_text(self, owner: Optional[str] = None) -> str:
        """The bank builds of this server as the Feature bank tab lists them (after a reload too):
        this browser's running or last build with its progress, and how many other browsers are
        building one."""
        with self._bank_lock:
            jobs = list(self._bank_jobs.values())
        lines = []
        for job in jobs:
            if job["owner"] != owner:
                continue
            took = views.format_seconds(time.time() - job["started"])
            if job["state"] == "running":
                n = f" ({job['done']}/{job['total']} batches)" if job["total"] else ""
                stopping = "; cancelling" if job["cancel"] else ""
                lines.append(f"Bank build from {job['label']}: running{n}, {took}{stopping}.")
            else:
                lines.append(f"Last bank build from {job['label']}: {job['state']}. {hide_paths(job['message'])}")
        others = sum(1 for j in jobs if j["owner"] != owner and j["state"] == "running")
        if others:
            lines.append(f"{others} bank build(s) started in other browser sessions are running (read-only here).")
        return "\n\n".join(lines)

    def _build_bank(self, path: Path, backbone: str, layers: Sequence[int], xi: int, image_size: int,
                    progress: ProgressFn = None, cancel: Optional[Callable[[], bool]] = None,
                    memory_percent: Optional[float] = None) -> tuple[str, dict[str, Any], Any, str]:
        layers = tuple(int(v) for v in layers)
        if not layers:
            raise UserError("choose at least one backbone layer")
        if not 1 <= int(xi) <= 1000:
            raise UserError(f"bank size xi must be in 1..1000, got {xi}")
        extra: dict[str, Any] = {}
        if memory_percent is not None:
            if not 0.0 < float(memory_percent) <= 100.0:
                raise UserError(f"PatchCore memory must be in (0, 100] % of the patches, got {memory_percent}")
            from ccad.methods import get_method

            extra["method"] = get_method("patchcore").Config(ratio=float(memory_percent) / 100.0)
        t0 = time.perf_counter()
        try:
            det = self.engine.fit(str(path), backbone=backbone, layers=layers, bank_size=int(xi),
                                  image_size=int(image_size), progress=progress, cancel=cancel, **extra)
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
        scorer = getattr(getattr(det, "method", None), "scorer", None)
        memory = getattr(scorer, "memory_bank", None)
        mem = (f" (its memory: {int(memory.shape[0])} of {int(getattr(scorer, 'n_patches', 0))} patches)"
               if memory is not None else "")
        return name, summary, fig, (f"Built a {built}-vector bank and a PatchCore detector{mem} from {path.name} in "
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
