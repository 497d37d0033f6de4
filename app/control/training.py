"""Train tab: device-aware defaults, the autoencoder box, and the one background training job
(start, resume, stop, status)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import views
from ..batch import left_out_files, name_list, to_uint8
from ..engine import cuda_available, train_config
from ..errors import UserError, hide_paths
from ..forms import DEFAULT_VARIANT, default_variant, method_class, method_config, method_info
from ..jobs import FAILED, RUNNING, STOPPED, JobBusy, JobHandle
from .base import ControllerBase

CPU_PRESET = "tiny"
FIT_MINUTES = 10  # without CUDA, the estimate says which preset / steps fit in this many minutes
ESTIMATE_PROBE_STEPS = 3
PREVIEW_LABEL = "Reconstruction preview"
CPU_MAX_IMAGE_SIZE = 128
AUTOENCODER_HINT = ("taef2:/path/to/folder (the folder holding taef2_encoder.pth and taef2_decoder.pth); "
                    "kl:/path/to/folder or tiny:/path/to/folder (a diffusers folder); or a Hub id such as "
                    "kl:stabilityai/sd-vae-ft-mse or tiny:madebyollin/taesd (it needs the Hub, or the local Hub "
                    "cache: huggingface-cli download stabilityai/sd-vae-ft-mse); taef2:random or kl:random: "
                    "random init, for tests only.")


class TrainingMixin(ControllerBase):
    """The Train tab's callbacks."""

    def device_note(self) -> str:
        if cuda_available():
            return "A CUDA GPU is available: training uses it (mixed precision)."
        return (f"No GPU found: training runs on the CPU, so the defaults are small (the smallest preset, at most "
                f"{CPU_MAX_IMAGE_SIZE} px, a few hundred steps): expect minutes, not seconds; the rest of the app "
                "stays usable.")

    def _hub_online(self) -> bool:
        """Whether the Hub answers (``hub_probe``), asked at most once a minute."""
        now = time.time()
        if self._hub_seen is None or now - self._hub_seen[0] > 60:
            try:
                self._hub_seen = (now, bool(self.hub_probe()))
            except Exception:
                self._hub_seen = (now, False)
        return self._hub_seen[1]

    def autoencoder_problem(self, spec: str) -> Optional[str]:
        """Why the autoencoder ``spec`` would not load on this server (None: it loads), checked
        without loading it (:func:`ccad.models.autoencoder_check.autoencoder_problem`); the Hub is asked
        only for a Hub id that is not in the local cache."""
        from ccad.models.autoencoder_check import autoencoder_problem

        offline = autoencoder_problem(spec, online=False, cache_dir=self.hub_cache_dir)
        if offline is None:
            return None
        online = autoencoder_problem(spec, online=True, cache_dir=self.hub_cache_dir)
        if online is not None or not self._hub_online():
            return offline if online is None else online
        return None

    def autoencoder_field(self, variant: Optional[str] = None) -> dict[str, Any]:
        """The Train tab's Autoencoder box for ``variant``: ``visible`` (its config has the field),
        ``value`` (the method's default when it loads here, else the first spec that loads
        offline), ``offline`` (specs that load without the network, best first: TAEF2 folders
        inside the data root, then Hub autoencoders in the local cache) and the ``info`` hint."""
        from ccad.models.autoencoder_check import offline_autoencoders

        info = method_info(variant or default_variant())
        if not info["has_autoencoder"]:
            return {"visible": False, "value": "", "offline": [], "info": AUTOENCODER_HINT}
        offline = offline_autoencoders([self.data_root], cache_dir=self.hub_cache_dir)
        default = info["autoencoder"]
        works = default in offline or not offline or self.autoencoder_problem(default) is None
        value = default if works else offline[0]
        if offline:
            head = "Loads offline here: " + ", ".join(offline) + ". "
        else:
            head = (f"Nothing loads offline here yet (no TAEF2 folder inside {self.data_root}, no autoencoder "
                    "in the local Hub cache). ")
        return {"visible": True, "value": value, "offline": offline, "info": head + AUTOENCODER_HINT}

    def _local_or_hub(self, target: str, field: str, kind: str = "any") -> str:
        """``target`` as a browser user typed it (a path or a Hub id) made safe:
        a path is resolved inside the data root (relative paths from the root; ``..``, a missing
        path and anything outside, symlinks included, are a :class:`UserError` naming ``field``); a
        Hub id is kept when no such folder exists under the root, and refused when it would be
        read as a folder relative to the server's working directory (the loaders try a path first)."""
        from ccad.models.autoencoder_load import _looks_like_hub_id

        text = target.strip()
        if _looks_like_hub_id(text) and not (self.data_root / text).exists():
            if Path(text).exists() and not Path(text).resolve().is_relative_to(self.data_root):
                raise UserError(f"{field} {text!r} names a folder on the server outside the data root; give a "
                                f"folder inside the data root {self.data_root} or a Hub id")
            return text
        try:
            return str(self._in_root(text, kind=kind))
        except UserError as exc:
            raise UserError(f"{field}: {exc}. Nothing was started.") from None

    def _confine_method_paths(self, cfg: Any) -> None:
        """Confine every path a browser user can type into the method's config to the data root, in
        place (issue 20 item 7): the autoencoder spec's path part (``kind:path``; a bare path is a
        saved autoencoder folder; ``kind:random`` and Hub ids stay), ``pretrained_unet`` (a folder or
        a Hub id) and ``feature_weights`` (a file). Relative paths are read from the data root."""
        spec = getattr(cfg, "autoencoder", None)
        if isinstance(spec, str) and spec.strip():
            ae_kind, sep, target = spec.strip().partition(":")
            if not sep:
                cfg.autoencoder = str(self._root_path(spec, "Autoencoder", kind="any"))
            elif target.strip() and target.strip().lower() != "random":
                cfg.autoencoder = f"{ae_kind}:{self._local_or_hub(target, 'Autoencoder')}"
        unet = getattr(cfg, "pretrained_unet", None)
        if isinstance(unet, str) and unet.strip():
            cfg.pretrained_unet = self._local_or_hub(unet, "pretrained_unet", kind="folder")
        weights = getattr(cfg, "feature_weights", None)
        if isinstance(weights, str) and weights.strip():
            cfg.feature_weights = str(self._root_path(weights, "feature_weights", kind="file"))

    def _root_path(self, text: str, field: str, kind: str = "folder") -> Path:
        """A path (never a Hub id) inside the data root, or a :class:`UserError` naming ``field``."""
        try:
            return self._in_root(text.strip(), kind=kind)
        except UserError as exc:
            raise UserError(f"{field}: {exc}. Nothing was started.") from None

    def _check_autoencoder(self, variant: str, cfg: Any) -> None:
        """A :class:`UserError` naming the Autoencoder field when its spec would not load here
        (after its path is confined to the data root, :meth:`_confine_method_paths`)."""
        self._confine_method_paths(cfg)
        spec = getattr(cfg, "autoencoder", None)
        if spec is None:
            return
        problem = self.autoencoder_problem(str(spec))
        if problem is None:
            return
        from ccad.models.autoencoder_check import offline_autoencoders

        offline = offline_autoencoders([self.data_root], cache_dir=self.hub_cache_dir)
        there = (f"Loads offline here: {', '.join(offline)}. Or enter" if offline else "Enter")
        raise UserError(f"Autoencoder {spec!r} of {method_class(variant).title or variant} will not load: "
                        f"{problem}. Nothing was started. {there} in the Autoencoder box {AUTOENCODER_HINT}")

    def default_train_settings(self, variant: Optional[str] = None) -> dict[str, Any]:
        """The Train tab's defaults for this device. On a GPU: the method's own preset and image
        size (from the registry) and full-length training. On the CPU: the smallest preset the
        method offers (``tiny`` when it has one), an image size of at most ``CPU_MAX_IMAGE_SIZE``
        and few steps, so a run takes minutes."""
        info = method_info(variant or default_variant())
        if cuda_available():
            return {"variant": info["name"], "preset": info["preset"], "image_size": info["image_size"],
                    "autoencoder": info["autoencoder"], "steps": 5000, "batch_size": 16, "device": "cuda"}
        preset = info["preset"]
        if preset is not None and info["presets"]:
            preset = CPU_PRESET if CPU_PRESET in info["presets"] else info["presets"][0]
        return {"variant": info["name"], "preset": preset, "image_size": min(info["image_size"], CPU_MAX_IMAGE_SIZE),
                "autoencoder": info["autoencoder"], "steps": 300, "batch_size": 4, "device": "cpu"}

    def training_estimate(self, variant: Optional[str], preset: Optional[str], image_size: Any, steps: Any,
                          batch_size: Any, options: Optional[str] = None, autoencoder: Optional[str] = None,
                          measure: bool = True) -> str:
        """The Train tab's line before Start (issue 24): how long ``steps`` steps of ``variant`` at
        ``preset`` / ``image_size`` / ``batch_size`` would train on this machine. The seconds per
        step are measured (:func:`ccad.train_probe.measure_step_seconds`: a few real steps of the
        same method on synthetic images; cached per setting, so changing the steps only multiplies);
        ``measure=False`` only uses a cached measurement. Without CUDA it also says how many steps
        fit in :data:`FIT_MINUTES` minutes, and with a smaller preset when this one does not fit."""
        from ccad.train_budget import estimate_text, format_seconds, steps_that_fit

        variant = variant or default_variant()
        mcls = method_class(variant)
        title = mcls.title or variant
        if not mcls.trainable:
            return f"{title} is fitted, not trained: it needs no training time (build it in the Feature bank tab)."
        try:
            size, n_steps, bs = int(image_size), int(steps or 0), int(batch_size or 0)
        except (TypeError, ValueError):
            return "Estimated training time: give a whole number of pixels, steps and batch size."
        if size < 8 or n_steps < 1 or bs < 1:
            return "Estimated training time: steps, batch size and image size must be positive."
        presets = list(method_info(variant)["presets"] or [])
        preset = preset if preset in presets else (presets[0] if presets else None)
        device = "cuda" if cuda_available() else "cpu"

        def per_step(p: Optional[str], run: bool) -> Optional[dict[str, Any]]:
            key = (variant, p, size, bs, options or "", (autoencoder or "").strip(), device)
            cached = self._step_times.get(key)
            if cached is not None or not run:
                return cached
            cfg = method_config(variant, p or "", options, autoencoder)
            self._check_autoencoder(variant, cfg)
            got = self.engine.measure_steps(variant, cfg, size, bs, probe_steps=ESTIMATE_PROBE_STEPS)
            self._step_times[key] = got
            return got

        busy = self.jobs.busy()
        try:
            got = per_step(preset, measure and not busy)
        except UserError as exc:
            return f"Estimated training time: not measured: {hide_paths(str(exc))}"
        except Exception as exc:
            return f"Estimated training time: the measurement failed ({type(exc).__name__}: {hide_paths(str(exc))})."
        what = f"{title}" + (f", {preset} preset" if preset else "") + f", {size} px, batch {bs}"
        if got is None:
            if busy:
                return (f"Estimated training time ({what}): not measured while a training job runs on this server "
                        "(it would slow the job and read high); the job's status shows its own estimate.")
            return f"Estimated training time ({what}): press **Estimate** to measure it on this machine."
        s = float(got["per_step"])
        line = estimate_text(s, n_steps, int(got["steps"]), "of this method and setting ")
        text = (f"**{line.replace('estimated', 'Estimated training time:', 1)}** ({what}). An estimate: "
                f"{int(got['steps'])} real training steps were timed here on synthetic images of this size "
                f"(the first step left out); other work on this machine changes it, and reading your images, the "
                f"bank or latents and the calibration after training add time beyond it.")
        if device == "cpu":
            budget = FIT_MINUTES * 60.0
            fit_here = steps_that_fit(s, budget)
            if s * n_steps <= budget:
                text += f" Without a GPU this run fits in {FIT_MINUTES} minutes."
            else:
                which = f"{preset} preset" if preset else "current setting"
                text += f" Without a GPU: {fit_here} steps of the {which} fit in {FIT_MINUTES} minutes."
                smaller = presets[:presets.index(preset)] if preset in presets else []
                if smaller:
                    try:
                        small = per_step(smaller[0], measure and not busy)
                    except Exception:
                        small = None
                    if small is not None:
                        n_small = steps_that_fit(float(small["per_step"]), budget)
                        text += (f" The {smaller[0]} preset: {float(small['per_step']):.2f} s/step measured, "
                                 f"{n_small} steps fit in {FIT_MINUTES} minutes "
                                 f"({format_seconds(float(small['per_step']) * n_steps)} for {n_steps} steps).")
        return text

    def start_training(self, folder: Optional[str], zip_file: Optional[str], bank_model: Optional[str],
                       preset: str, image_size: int, steps: int, batch_size: int, preview_every: int = 50,
                       resume: bool = False, variant: str = DEFAULT_VARIANT, options: Optional[str] = None,
                       autoencoder: Optional[str] = None, fuse_bank: bool = False,
                       owner: Optional[str] = None) -> str:
        """Start training a detector of ``variant`` in the background job manager (one job per server).

        ``owner`` is the browser session starting it (:data:`app.tabs.common` ``browser id``): the job
        belongs to it; other sessions see it read-only (they can neither stop nor resume it). None
        (a caller that is no browser session: tests, scripts) owns every job.

        ``options`` are ``KEY=VALUE`` lines for the method's config and ``autoencoder`` its
        autoencoder spec (methods with that field); both are validated before anything starts.
        ``fuse_bank`` fuses the method's map with the bank's nearest-neighbour map, both normalised
        on held-out good images (``scoring.fusion = "bank"``, :mod:`ccad.scoring.fusion`).
        Resume re-uses the last job's variant, options and run folder.
        """
        if self.jobs.busy():
            snap = self.jobs.snapshot() or {}
            raise UserError(f"A training job is already running on this server ({snap.get('id')}, step "
                            f"{snap.get('step')}/{snap.get('total_steps')}). Only one job runs at a time: "
                            "stop it or wait for it to finish.")
        if resume:
            last = self._last_train
            if last is None:
                raise UserError("nothing to resume: no stopped training job on this server")
            if not self._owns(owner, last.get("owner")):
                raise UserError("The stopped job was started in another browser session: only that session can "
                                "resume it. Start a new job instead.")
            params = dict(last, resume=True)
        else:
            variant = variant or DEFAULT_VARIANT
            mcls = method_class(variant)
            if not mcls.trainable:
                raise UserError(f"{mcls.title or variant} is not trained (it is fitted): build it in the "
                                "Feature bank tab")
            # refuse a bad option, a path outside the data root, or an autoencoder that would not load,
            # before anything starts
            self._check_autoencoder(variant, method_config(variant, preset, options, autoencoder))
            path = self._data_folder(folder, zip_file)
            bank = None
            if bank_model and mcls.uses_bank:
                det = self._detector_no_activate(bank_model)
                bank = getattr(det, "bank", None)
                if bank is None:
                    raise UserError(f"{bank_model} has no feature bank to reuse; leave 'Reuse the bank' empty")
            if int(steps) < 1 or int(batch_size) < 1:
                raise UserError("steps and batch size must be positive")
            run_dir = self._new_run_dir()
            params = {"data": str(path), "out_dir": str(run_dir), "bank": bank,
                      "bank_model": (bank_model or "") if bank is not None else "",
                      "preset": preset or "", "image_size": int(image_size or mcls.default_image_size),
                      "steps": int(steps), "batch_size": int(batch_size),
                      "preview_every": min(max(1, int(preview_every)), int(steps)), "resume": False,
                      "variant": variant,
                      "options": options or "", "autoencoder": (autoencoder or "").strip(),
                      "fuse_bank": bool(fuse_bank), "owner": owner}
        # the typed config, rebuilt from the recipe (a resumed job gets a fresh copy of the same config)
        method_cfg = method_config(params["variant"], params["preset"], params["options"], params["autoencoder"])
        self._check_autoencoder(params["variant"], method_cfg)  # confines its paths (what the job reads)
        self._last_train = dict(params, resume=False)
        train_fn = self.engine.train
        last = self.jobs.snapshot() if resume else None
        last_preview = (last or {}).get("preview") if (last or {}).get("params", {}).get("out_dir") == \
            params["out_dir"] else None
        scoring = None
        if params.get("fuse_bank"):
            scoring = method_class(params["variant"]).default_scoring()
            scoring.fusion = "bank"

        def target(handle: JobHandle) -> Any:
            handle.update(total_steps=params["steps"], message="reading the images", step=0)
            if params["resume"]:  # the curve, step and loss go on from the checkpoint
                from ccad.training import saved_progress

                saved = saved_progress(params["out_dir"])
                if saved is not None:
                    hist = saved["losses"]
                    handle.update(losses=[(i + 1, v) for i, v in enumerate(hist)], step=saved["step"],
                                  epoch=saved["epoch"], loss=hist[-1] if hist else float("nan"),
                                  **({"preview": last_preview} if last_preview is not None else {}))
            current = {"phase": "reading the images"}

            def phase(text: str) -> None:  # the engine says what runs now (bank, latents, training ...)
                current["phase"] = text
                handle.update(message=text)

            def progress(done: int, total: int) -> None:
                handle.update(message=f"{current['phase']} ({done}/{total})")

            def on_state(st: Any) -> bool:
                upd: dict[str, Any] = {"step": int(getattr(st, "step", 0)),
                                       "total_steps": int(getattr(st, "total_steps", params["steps"])),
                                       "epoch": int(getattr(st, "epoch", 0)),
                                       "loss": float(getattr(st, "loss", float("nan"))),
                                       "lr": float(getattr(st, "lr", float("nan"))),
                                       "eta_seconds": float(getattr(st, "eta_seconds", float("nan")) or float("nan")),
                                       "message": "training"}
                prev = getattr(st, "preview", None)
                if prev is not None:
                    upd["preview"] = to_uint8(np.asarray(prev))
                handle.update(**upd)
                return handle.should_stop()

            return train_fn(params["data"], params["out_dir"], bank=params["bank"], variant=params["variant"],
                            method=method_cfg, image_size=params["image_size"] or None,
                            train=train_config(steps=params["steps"], batch_size=params["batch_size"],
                                               preview_every=params["preview_every"], show_progress=False),
                            callbacks=(on_state,), resume=params["resume"], cancel=handle.should_stop,
                            phase=phase, progress=progress, **({"scoring": scoring} if scoring is not None else {}))

        def on_done(job: Any) -> None:
            det = job.result
            if det is None:
                return
            label = "stopped" if job.state == STOPPED else "trained"
            # one name per run (method + run folder): a resumed run replaces its entry
            name = self.registry.add(f"{params['variant']} {Path(params['out_dir']).name}", det,
                                     f"{label} in this app ({params['data']})",
                                     folder=str(Path(params["out_dir"]) / "model"), activate=False, replace=True)
            job.params["model_name"] = name
            job.params["skipped"] = left_out_files(det)

        try:
            job = self.jobs.start("train", target, {k: v for k, v in params.items() if k != "bank"}, on_done)
        except JobBusy as exc:
            raise UserError(str(exc)) from None
        title = method_class(params["variant"]).title or params["variant"]
        return (f"Started training job {job.id} ({'resumed' if resume else 'new'}): {title} on "
                f"{Path(params['data']).name}.")

    def _new_run_dir(self) -> Path:
        """A fresh run folder ``runs/train-<date>-<time>`` (``-2``, ``-3`` ... within one second)."""
        runs = self.state_dir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        base = time.strftime("train-%Y%m%d-%H%M%S")
        for i in range(1, 1000):
            run = runs / (base if i == 1 else f"{base}-{i}")
            try:
                run.mkdir()
                return run
            except FileExistsError:
                continue
        raise UserError(f"{runs}: could not make a new run folder")

    @staticmethod
    def _owns(owner: Optional[str], job_owner: Optional[str]) -> bool:
        """Whether the session ``owner`` may stop / resume a job started by ``job_owner`` (None on
        either side: not a browser session, e.g. a script or a test, which owns every job)."""
        return owner is None or job_owner is None or owner == job_owner

    def stop_training(self, owner: Optional[str] = None) -> str:
        """Ask the running job to stop, if it belongs to the session ``owner`` (see :meth:`start_training`)."""
        snap = self.jobs.snapshot()
        if snap is not None and self.jobs.busy() and not self._owns(owner, snap["params"].get("owner")):
            return (f"Job {snap['id']} was started in another browser session: it is shown here read-only; "
                    "only that session can stop it.")
        if self.jobs.stop():
            return "Stop requested: the job finishes its current step and saves a resumable checkpoint."
        return "No training job is running."

    @staticmethod
    def _preview_label(snap: dict[str, Any]) -> str:
        """The preview panel's label for the job ``snap``: a method without a pixel reconstruction
        (feat-diff) says it has none, so an empty panel is not taken for a missing picture."""
        from ccad.methods.base import Method

        variant = snap["params"].get("variant") or DEFAULT_VARIANT
        try:
            mcls = method_class(variant)
        except Exception:
            return PREVIEW_LABEL
        if getattr(mcls, "preview", None) is Method.preview:
            return f"No reconstruction preview: {mcls.title or variant} has no pixel reconstruction"
        if snap["preview"] is None:
            return f"{PREVIEW_LABEL} (the first one comes at step {snap['params'].get('preview_every', '?')})"
        return f"{PREVIEW_LABEL} (step {snap['preview_step']})"

    def training_status(self, owner: Optional[str] = None) -> dict[str, Any]:
        """What the Train tab shows; the same job for every tab and reload (server-side job); ``mine``
        says whether the session ``owner`` may stop / resume it (else it is shown read-only)."""
        snap = self.jobs.snapshot()
        if snap is None:
            return {"status": "No training job has run on this server yet.", "progress": "", "losses": [],
                    "preview": None, "preview_label": PREVIEW_LABEL, "state": "idle",
                    "model_name": None, "can_resume": False, "mine": True}
        mine = self._owns(owner, snap["params"].get("owner"))
        total = snap["total_steps"] or 0
        pct = f" ({100.0 * snap['step'] / total:.0f} %)" if total else ""
        loss = f"{snap['loss']:.4f}" if math.isfinite(snap["loss"]) else "-"
        progress = (f"step {snap['step']}/{total}{pct} · epoch {snap['epoch']} · loss "
                    f"{loss} · elapsed {views.format_seconds(snap['elapsed'])}")
        if snap["state"] == RUNNING:  # a stopped, failed or finished job has no time left
            progress += f" · ETA {views.format_seconds(snap['eta_seconds'])}"
        message = hide_paths(snap['message'])
        # a message that only repeats the state ("finished - finished") is said once
        status = (f"Job {snap['id']}: {snap['state']}" if message.strip().lower() in ("", str(snap['state']).lower())
                  else f"Job {snap['id']}: {snap['state']} - {message}")
        if not mine:
            status += " (started in another browser session: read-only here)"
        if snap["params"].get("model_name"):
            status += f". Model loaded as '{snap['params']['model_name']}' (pick it in the model list)."
        skipped = snap["params"].get("skipped") or []
        if skipped:
            status += f" Left out {len(skipped)} file(s) of the data: {name_list(skipped)}."
        return {"status": status, "progress": progress, "losses": snap["losses"], "preview": snap["preview"],
                "preview_label": self._preview_label(snap), "state": snap["state"],
                "model_name": snap["params"].get("model_name"),
                "can_resume": mine and snap["state"] in (STOPPED, FAILED) and self._last_train is not None,
                "mine": mine}
