"""Models tab: load a model (bundled demo, folder, zip, Hub id), show its card, threshold range
and false-alarm rate."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import views
from ..batch import Batch
from ..errors import UserError
from ..hub import is_hub_unreachable
from ..paths import PathError, extracted_zip
from .base import ControllerBase


class ModelsMixin(ControllerBase):
    """Loading models and reading what they say about themselves."""

    def load_startup(self, model: Optional[str] = None) -> str:
        """Load ``model`` (folder or Hub id) or, by default, the bundled demo; returns a status line.

        Never raises: a missing or broken demo leaves the app usable (build a bank instead).
        """
        if model:
            try:
                if Path(model).expanduser().is_dir():
                    name, msg = self._load_path(Path(model).expanduser().resolve(), "folder")
                else:
                    name, msg = self.load_from_hub(model, None)
                self.startup_message = msg
            except UserError as exc:
                self.startup_message = f"Could not load {model}: {exc}"
            return self.startup_message
        if self.demo_dir is None or not (self.demo_dir / "config.json").is_file():
            where = f" in {self.demo_dir}" if self.demo_dir is not None else ""
            self.startup_message = (f"No bundled demo model found{where}. Build a detector in the "
                                    "Feature bank tab, or load one below (folder, zip or Hub id).")
            return self.startup_message
        try:
            det = self.engine.load(str(self.demo_dir))
        except Exception as exc:
            self.startup_message = (f"The bundled demo model in {self.demo_dir} could not be loaded ({exc}). "
                                    "Build a detector in the Feature bank tab or load another model.")
            return self.startup_message
        name = self.registry.add(f"demo ({det.variant})", det, "bundled demo model", folder=str(self.demo_dir))
        self.startup_message = self._said(name, f"Loaded the bundled demo model: {name}.")
        return self.startup_message

    def _said(self, name: str, line: str) -> str:
        """Remember ``line`` (how model ``name`` was loaded) for :meth:`model_status_line`."""
        self._model_lines[name] = line
        return line

    def model_status_line(self, name: Optional[str]) -> str:
        """The line under the model list: how the model in use (``name``) was loaded, never the
        line of another model (the demo's "Loaded the bundled demo model" goes when it is not in use);
        a startup problem (no demo, a demo that would not load) while no model is in use."""
        if name and name in self._model_lines:
            return self._model_lines[name]
        entry = self.registry.get(name) if name else None
        if entry is not None:  # built or trained in this app: its source says how
            return f"Model in use: {entry.name} ({entry.source})."
        if not name and self.startup_message and not self._model_lines:
            return self.startup_message
        return ""

    def _load_path(self, path: Path, how: str) -> tuple[str, str]:
        try:
            det = self.engine.load(str(path))
        except Exception as exc:
            raise UserError(f"{path.name or path}: not a loadable ccad model ({exc})") from None
        name = self.registry.add(f"{path.name} ({det.variant})", det, f"{how} {path}", folder=str(path))
        return name, self._said(name, f"Loaded {name} from {how} {path}.")

    def load_from_folder(self, folder: str) -> tuple[str, str]:
        """Load a saved model folder (confined to the data root)."""
        path = self._in_root(folder)
        if not (path / "config.json").is_file():
            raise UserError(f"{folder}: no config.json in this folder; pick a folder written by "
                            "save_pretrained / `ccad bank` / `ccad train`")
        return self._load_path(path, "folder")

    def export_zip(self, name: Optional[str]) -> tuple[str, str]:
        """Export a loaded model (``ccad export``: ONNX + verdict.json + parity.json) and zip the folder;
        returns ``(zip path, status line)``."""
        import json
        import re
        import shutil

        det = self.registry.detector(name)
        if det is None:
            raise UserError("no model loaded to export")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name or det.variant)).strip("_") or "model"
        out = self.state_dir / "exports" / stem
        try:
            self.engine.export(det, out, overwrite=True)
        except Exception as exc:
            raise UserError(f"{name}: cannot be exported ({exc})") from None
        par = json.loads((out / "parity.json").read_text())
        zipped = shutil.make_archive(str(out), "zip", root_dir=str(out))
        return zipped, (f"Exported {name} to ONNX ({Path(zipped).name}): run it with `ccad.runtime.load(folder)` or "
                        f"`ccad predict folder images/`; parity with this model on {par['n_images']} images: "
                        f"largest score difference {par['max_score_abs_diff']:.2g}, "
                        f"{par['verdicts_differ']} verdicts differ.")

    def load_from_zip(self, zip_file: Optional[str]) -> tuple[str, str]:
        """Load a model from an uploaded zip of a saved model folder."""
        if not zip_file:
            raise UserError("no zip uploaded")
        label = Path(str(zip_file)).name
        try:
            with extracted_zip(zip_file, self.uploads_dir, "model-", self.zip_budget) as path:
                if not (path / "config.json").is_file():
                    found = [p.parent for p in path.rglob("config.json")]
                    if len(found) != 1:
                        raise UserError(f"{label}: the zip holds no saved model (config.json not found)")
                    path = found[0]
                try:  # the detector is read into memory; the extracted folder is removed afterwards
                    det = self.engine.load(str(path))
                except Exception as exc:
                    raise UserError(f"{label}: not a loadable ccad model ({exc})") from None
        except PathError as exc:
            raise UserError(str(exc)) from None
        name = self.registry.add(f"{Path(label).stem} ({det.variant})", det, f"zip {label}")
        return name, self._said(name, f"Loaded {name} from the uploaded zip {label}.")

    def load_from_hub(self, repo_id: str, revision: Optional[str]) -> tuple[str, str]:
        """Download and load a model from the Hugging Face Hub; offline says so clearly."""
        repo_id = (repo_id or "").strip()
        revision = (revision or "").strip() or None
        if not repo_id:
            raise UserError("type a Hub repo id such as user/ccad-tiles")
        try:
            from huggingface_hub.utils import validate_repo_id

            validate_repo_id(repo_id)
        except Exception as exc:
            raise UserError(f"{repo_id!r} is not a valid Hub repo id ({exc})") from None
        if Path(repo_id).expanduser().exists():  # the loader would read it as a server folder, outside the root
            raise UserError(f"{repo_id!r} names a folder on the server, not a Hub repo: load server folders with "
                            "the folder box (inside the data root)")
        online = self.hub_probe()
        try:
            if online:
                det = self.engine.load(repo_id, revision=revision)
            else:  # a copy in the local Hub cache still loads offline
                det = self.engine.load(repo_id, revision=revision, local_files_only=True)
        except Exception as exc:
            names = {c.__name__ for c in type(exc).__mro__}
            if "RepositoryNotFoundError" in names:
                raise UserError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private)") from None
            if "RevisionNotFoundError" in names:
                raise UserError(f"{repo_id}: revision {revision!r} not found on the Hub") from None
            if not online or is_hub_unreachable(exc):
                raise UserError(f"The Hugging Face Hub is unreachable (offline?): cannot download {repo_id}. "
                                "Everything else keeps working; load a local folder or a zip instead.") from None
            raise UserError(f"{repo_id}: could not load ({type(exc).__name__}: {exc})") from None
        tag = f"{repo_id}@{revision}" if revision else repo_id
        name = self.registry.add(f"{tag} ({det.variant})", det, f"hub {tag}")
        return name, self._said(name, f"Loaded {name} from the Hugging Face Hub.")

    def _card(self, name: Optional[str]) -> tuple[Any, Any, str]:
        """``(registry entry, its card, "")`` of model ``name``; ``(None, None, "")`` when it is not
        loaded; ``(entry, None, message)`` when its card cannot be read."""
        entry = self.registry.get(name)
        if entry is None:
            return None, None, ""
        try:
            return entry, entry.detector.card(), ""
        except Exception as exc:
            return entry, None, f"**{name}**: the card could not be read ({exc})"

    def model_card(self, name: Optional[str]) -> str:
        entry, card, problem = self._card(name)
        if entry is None:
            return views.card_markdown(None) + ("\n\n" + self.startup_message if self.startup_message else "")
        return problem or views.card_markdown(card, entry.name, entry.source)

    def model_card_line(self, name: Optional[str]) -> str:
        """The card in one line (shown above the closed full-card accordion)."""
        entry, card, problem = self._card(name)
        if entry is None:
            return views.card_summary(None)
        return problem or views.card_summary(card, entry.name)

    def threshold_range(self, name: Optional[str], batch: Optional[Batch] = None) -> dict[str, float]:
        """Slider settings: the model's calibrated threshold and a range covering good and batch scores."""
        det = self.registry.detector(name) if name else None
        thr = float(getattr(det, "threshold", float("nan"))) if det is not None else float("nan")
        values = [thr]
        cal = getattr(det, "calibration", None) if det is not None else None
        if cal is not None and len(cal.good_scores):
            values += [float(np.max(cal.good_scores)), float(np.min(cal.good_scores))]
        if batch is not None:
            values += [float(p.score) for p in batch.predictions]
        finite = [v for v in values if math.isfinite(v)]
        hi = max(finite) * 1.5 if finite and max(finite) > 0 else 1.0
        lo = min(0.0, min(finite)) if finite else 0.0
        if not math.isfinite(thr):
            thr = (lo + hi) / 2
        hi = float(f"{hi:.3g}")
        lo = float(f"{lo:.3g}")
        step = float(f"{(hi - lo) / 1000:.2g}") if hi > lo else 0.001
        thr = float(f"{thr:.6g}")  # shown rounded (6 significant digits); the verdicts use this value
        return {"value": thr, "minimum": min(lo, thr), "maximum": max(hi, thr), "step": step}

    def false_alarm_text(self, name: Optional[str], threshold: Optional[float]) -> str:
        det = self.registry.detector(name) if name else None
        cal = getattr(det, "calibration", None) if det is not None else None
        if cal is None or not len(cal.good_scores) or threshold is None:
            return "No calibration good scores stored with this model."
        n = int(cal.false_alarms(float(threshold)))
        total = int(len(cal.good_scores))
        return (f"At threshold {float(threshold):.4g}: {n} of {total} calibration good images would be false "
                f"alarms ({100.0 * n / max(total, 1):.1f} %). Calibrated threshold: {cal.threshold:.4g}.")
