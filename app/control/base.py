"""The state and shared helpers of :class:`app.controller.AppController`; each tab's callbacks are a
mixin over this base in the modules beside it."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Optional

from ..engine import Engine
from ..errors import UserError, register_private_root
from ..hub import hub_reachable
from ..jobs import JobManager
from ..paths import PathError, count_images, extracted_zip, remove_stale, resolve_in_root, safe_extract_zip
from ..state import DEMO_MODEL_DIR, SAMPLES_DIR, ModelRegistry


class ControllerBase:
    """The state every section of the controller reads: the data root, the state folder, the model
    registry, the job manager and the engine; and the helpers more than one section calls."""

    def __init__(self, data_root: str | os.PathLike = ".", state_dir: Optional[str | os.PathLike] = None,
                 registry: Optional[ModelRegistry] = None, jobs: Optional[JobManager] = None,
                 engine: Optional[Engine] = None, samples_dir: Optional[str | os.PathLike] = SAMPLES_DIR,
                 demo_dir: Optional[str | os.PathLike] = DEMO_MODEL_DIR) -> None:
        self.data_root = Path(data_root).expanduser().resolve()
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="ccad-app-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        register_private_root(self.state_dir)  # its paths (uploads, runs) never reach the page
        # uploaded zips are extracted into per-request folders here, removed when the request is done
        self.uploads_dir = self.state_dir / "uploads"
        remove_stale(self.uploads_dir)
        self.zip_budget: Optional[int] = None  # bytes; None: app.paths.MAX_ZIP_BYTES
        self._train_uploads: list[Path] = []
        self.registry = registry or ModelRegistry()
        self.jobs = jobs or JobManager()
        self.engine = engine or Engine()
        self.samples_dir = Path(samples_dir) if samples_dir else None
        self.demo_dir = Path(demo_dir) if demo_dir else None
        self.startup_message = ""
        self._model_lines: dict[str, str] = {}  # model name -> how it was loaded (model_status_line)
        self._last_train: Optional[dict[str, Any]] = None
        self._step_times: dict[tuple, dict[str, Any]] = {}  # measured s/step per training setting (estimate)
        self.hub_probe: Callable[[], bool] = hub_reachable
        self.hub_cache_dir: Optional[str] = None  # the local Hub cache (None: huggingface_hub's default)
        self._hub_seen: Optional[tuple[float, bool]] = None
        self._bank_jobs: dict[Optional[str], dict[str, Any]] = {}  # browser id -> its running / last bank build
        self._bank_lock = threading.Lock()


    def _detector(self, name: Optional[str]) -> Any:
        det = self.registry.detector(name) if name else None
        if det is None:
            raise UserError("no model is loaded: pick one in the model list, build a feature bank "
                            "(Feature bank tab) or load a model")
        self.registry.set_active(name)
        return det

    def _in_root(self, path: Optional[str], kind: str = "folder", must_exist: bool = True) -> Path:
        """``path`` resolved inside the data root (:func:`app.paths.resolve_in_root`); a path that
        is empty, missing or outside it is a :class:`UserError` saying so."""
        try:
            return resolve_in_root(path or "", self.data_root, must_exist=must_exist, kind=kind)
        except PathError as exc:
            raise UserError(str(exc)) from None

    def _detector_no_activate(self, name: str) -> Any:
        det = self.registry.detector(name)
        if det is None:
            raise UserError(f"model {name!r} is not loaded")
        return det

    def _data_folder(self, folder: Optional[str], zip_file: Optional[str],
                     stack: Optional[ExitStack] = None) -> Path:
        """A good-image folder from a server path (confined to the data root) or an uploaded zip.

        A zip is extracted into a per-request folder: removed when ``stack`` closes, or (no
        ``stack``: a training job reads it in the background and a resume reads it again) kept
        until the next training upload while no job runs."""
        if zip_file:
            try:
                if stack is not None:
                    path = stack.enter_context(extracted_zip(zip_file, self.uploads_dir, "data-", self.zip_budget))
                else:
                    if not self.jobs.busy():
                        for old in self._train_uploads:
                            shutil.rmtree(old, ignore_errors=True)
                        self._train_uploads = []
                    self.uploads_dir.mkdir(parents=True, exist_ok=True)
                    work = Path(tempfile.mkdtemp(prefix="train-data-", dir=self.uploads_dir))
                    self._train_uploads.append(work)
                    try:
                        path = safe_extract_zip(zip_file, work, max_bytes=self.zip_budget)
                    except PathError:
                        shutil.rmtree(work, ignore_errors=True)
                        raise
            except PathError as exc:
                raise UserError(str(exc)) from None
            label = Path(str(zip_file)).name
        else:
            path = self._in_root(folder)
            label = folder or str(path)
        n = count_images(path)
        if n == 0:
            raise UserError(f"{label}: the folder holds no images (.png/.jpg/.bmp/.tif)")
        return path
