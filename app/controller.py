"""The app's callbacks as plain methods (testable without a browser); every computation is a call
into ``ccad`` (``fit_detector``, ``train_detector``, ``AnomalyDetector``, ``evaluate``).

Every public method turns a bad input into a :class:`UserError` (or a message) naming the file,
folder or field; nothing a user does can raise out of a callback into the server. The Gradio
wiring in :mod:`app.main` only adapts these results to components.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import views
from .jobs import FAILED, STOPPED, JobBusy, JobHandle, JobManager
from .paths import PathError, count_images, extracted_zip, remove_stale, resolve_in_root, safe_extract_zip
from .state import DEMO_MODEL_DIR, SAMPLES_DIR, ModelRegistry

ProgressFn = Optional[Callable[[int, int], None]]


class UserError(ValueError):
    """A problem with what the user asked for; its message is shown in the UI as is."""


# ---------------------------------------------------------------------------------------------
# Engine access (lazy imports keep `import app` cheap; tests may inject fakes)
# ---------------------------------------------------------------------------------------------

@dataclass
class Engine:
    """The ``ccad`` entry points the app calls. Defaults are the real ones."""

    load: Callable[..., Any] = None  # type: ignore[assignment]
    fit: Callable[..., Any] = None  # type: ignore[assignment]
    train: Callable[..., Any] = None  # type: ignore[assignment]
    evaluate: Callable[..., Any] = None  # type: ignore[assignment]
    load_dataset: Callable[..., Any] = None  # type: ignore[assignment]
    load_image: Callable[..., Any] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.load is None:
            self.load = lambda path, revision=None, **kw: _pipeline().AnomalyDetector.from_pretrained(
                path, revision=revision, **kw)
        if self.fit is None:
            self.fit = lambda *a, **k: _pipeline().fit_detector(*a, **k)
        if self.train is None:
            self.train = lambda *a, **k: _pipeline().train_detector(*a, **k)
        if self.evaluate is None:
            def _evaluate(*a: Any, **k: Any) -> Any:
                from ccad.evaluate import evaluate

                return evaluate(*a, **k)
            self.evaluate = _evaluate
        if self.load_dataset is None:
            def _load_dataset(*a: Any, **k: Any) -> Any:
                from ccad.data.detect import load_dataset

                return load_dataset(*a, **k)
            self.load_dataset = _load_dataset
        if self.load_image is None:
            def _load_image(path: Any) -> np.ndarray:
                from ccad.data.io import load_image

                return load_image(path)
            self.load_image = _load_image


def _pipeline() -> Any:
    import ccad.pipeline as p

    return p


def _is_hub_unreachable(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError",
                "ConnectTimeout", "Timeout", "TimeoutException", "ReadTimeout", "NetworkError"}:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("offline", "connection", "name resolution", "network is unreachable",
                                   "temporary failure", "max retries", "timed out"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check that the Hub endpoint accepts a TCP connection (and offline mode is off), so an
    offline server answers at once instead of after the client's retries."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        url = urlparse(constants.ENDPOINT)
    except Exception:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def train_config(**wanted: Any) -> Any:
    """A :class:`ccad.training.TrainConfig` with the app's settings."""
    from ccad.training import TrainConfig

    return TrainConfig(**wanted)


def trainable_variants() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every variant the engine can train (the registry's list)."""
    from ccad.methods import describe_methods, get_method

    return [(n, d) for n, d in describe_methods() if get_method(n).trainable]


DEFAULT_VARIANT = "ccad-v"
ALL_IMAGES = "all images (pooled)"
EVERY_CATEGORY = "every category (overlaid)"
PRESET_CHOICES = ["tiny", "small", "base"]
CPU_PRESET = "tiny"
CPU_MAX_IMAGE_SIZE = 128
FORM_HEADERS = ["setting", "type", "default", "value"]
FORM_SKIP = ("preset", "autoencoder")  # these have their own boxes above the form
AUTOENCODER_HINT = ("taef2:/path/to/folder (the folder holding taef2_encoder.pth and taef2_decoder.pth); "
                    "kl:/path/to/folder or tiny:/path/to/folder (a diffusers folder); or a Hub id such as "
                    "kl:stabilityai/sd-vae-ft-mse or tiny:madebyollin/taesd (it needs the Hub, or the local Hub "
                    "cache: huggingface-cli download stabilityai/sd-vae-ft-mse); taef2:random or kl:random: "
                    "random init, for tests only.")


def _method_class(variant: Optional[str]) -> Any:
    """The registry's class for ``variant`` (a :class:`UserError` naming the known ones otherwise)."""
    from ccad.methods import get_method

    try:
        return get_method(variant or DEFAULT_VARIANT)
    except KeyError as exc:  # UnknownVariant
        raise UserError(str(exc)) from None


def method_choices() -> list[tuple[str, str]]:
    """``(title, name)`` of every trainable variant, for the Train tab's method dropdown."""
    from ccad.methods import get_method

    return [(get_method(n).title or n, n) for n, _ in trainable_variants()]


def default_variant() -> str:
    names = [n for n, _ in trainable_variants()]
    return DEFAULT_VARIANT if DEFAULT_VARIANT in names else (names[0] if names else DEFAULT_VARIANT)


def method_info(variant: Optional[str]) -> dict[str, Any]:
    """What the Train tab shows for a method, all read from the registry: its title and one-line
    description, its default preset (None: no presets) and image size, whether it has an
    ``autoencoder`` field (and its default), whether it uses the feature bank, and its options."""
    from ccad.config import option_help

    mcls = _method_class(variant)
    cfg = mcls.default_config()
    preset = getattr(cfg, "preset", None)
    presets = list(getattr(mcls, "presets", None) or PRESET_CHOICES)
    if preset is not None and preset not in presets:
        presets.append(preset)
    try:
        options = option_help(mcls.Config)
    except Exception:
        options = []
    return {"name": mcls.name, "title": mcls.title or mcls.name, "description": mcls.description or "",
            "paper": getattr(mcls, "paper", ""), "preset": preset, "presets": presets if preset is not None else [],
            "image_size": int(mcls.default_image_size), "has_autoencoder": hasattr(cfg, "autoencoder"),
            "autoencoder": str(getattr(cfg, "autoencoder", "") or ""), "uses_bank": bool(mcls.uses_bank),
            "trainable": bool(mcls.trainable), "options": options}


def parse_options(text: Optional[str]) -> list[tuple[str, str]]:
    """``KEY=VALUE`` lines (blank lines and ``#`` comments skipped); a line without ``=`` is a UserError."""
    out = []
    for n, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise UserError(f"advanced options, line {n} ({line!r}): write one KEY=VALUE per line, "
                            "e.g. diffusion.start_step=200")
        out.append((key.strip(), value.strip()))
    return out


def method_config(variant: Optional[str], preset: Optional[str] = None, options: Optional[str] = None,
                  autoencoder: Optional[str] = None) -> Any:
    """The typed config section of ``variant``: its defaults, then ``preset`` and ``autoencoder``
    (only where the config has those fields), then the advanced ``KEY=VALUE`` options, validated
    with :func:`ccad.config.set_option` and the method's own check. A bad key or value is a
    :class:`UserError` naming the field."""
    from ccad.config import set_option

    mcls = _method_class(variant)
    cfg = mcls.default_config()
    try:
        if preset and hasattr(cfg, "preset"):
            set_option(cfg, "preset", str(preset), "preset")
        if autoencoder is not None and str(autoencoder).strip() and hasattr(cfg, "autoencoder"):
            set_option(cfg, "autoencoder", str(autoencoder).strip(), "autoencoder")
        for key, value in parse_options(options):
            set_option(cfg, key, value, "option")
        mcls.validate_config(cfg)
    except UserError:
        raise
    except Exception as exc:  # ConfigError (names the field), or a parse error
        raise UserError(f"{mcls.title or mcls.name}: {exc}") from None
    return cfg


def _type_name(tp: Any) -> str:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is not None and args:
        inner = [_type_name(a) for a in args if a is not type(None) and a is not Ellipsis]
        kind = "optional " if type(None) in args else ("list of " if origin is tuple else "")
        return kind + " | ".join(dict.fromkeys(inner))
    return getattr(tp, "__name__", str(tp))


def _form_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return "" if v is None else str(v)


def settings_form(variant: Optional[str], preset: Optional[str] = None) -> list[list[str]]:
    """The method's settings form, generated from its config dataclass: one row
    ``[dotted name, type, default, value]`` per (nested) field, defaults for ``preset`` where the
    method has presets; ``preset`` and ``autoencoder`` have their own boxes and are left out."""
    import dataclasses
    import typing

    mcls = _method_class(variant)
    cfg = mcls.default_config()
    if preset and hasattr(cfg, "preset"):
        try:
            cfg = mcls.default_config(preset)
        except Exception:
            pass
    rows: list[list[str]] = []

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            name = prefix + f.name
            tp = hints.get(f.name, type(v))
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if dataclasses.is_dataclass(v):
                walk(v, name + ".")
            elif v is None and any(dataclasses.is_dataclass(a) for a in inner):
                continue  # a section derived from the preset (set it with the preset box)
            elif name not in FORM_SKIP:
                rows.append([name, _type_name(tp), _form_value(v), _form_value(v)])

    walk(cfg, "")
    return rows


def form_options(rows: Any) -> str:
    """``KEY=VALUE`` lines for the form rows whose value differs from the default (a table from
    the UI: a list of rows or a DataFrame)."""
    if rows is None:
        return ""
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # pandas
        rows = rows.values.tolist()
    out = []
    for r in rows:
        if len(r) < 4 or not str(r[0] or "").strip():
            continue
        name, default, value = str(r[0]).strip(), _form_value(r[2]), _form_value(r[3])
        if value.strip() != default.strip():
            out.append(f"{name}={value.strip()}")
    return "\n".join(out)


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch missing is an install problem
        return False


# ---------------------------------------------------------------------------------------------
# Inspection results held per browser session
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """The predictions of the last inspection in one session (labelled at the model's threshold;
    the UI re-labels them with ``with_threshold`` without re-running the model)."""

    model: str
    predictions: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    selected: int = 0
    compared: dict[str, "Batch"] = field(default_factory=dict)  # the same images through other models

    def at(self, threshold: Optional[float]) -> list[Any]:
        if threshold is None or not math.isfinite(float(threshold)):
            return list(self.predictions)
        return [p.with_threshold(float(threshold)) for p in self.predictions]


TABLE_HEADERS = ["#", "file", "score", "verdict", "seconds", "training domain"]
AGREE_HEADER = "same verdict as the other model"


def _seconds(v: Any) -> str:
    """An image's own time, to 3 significant digits (rows of one batch differ in the digits shown)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return f"{x:.3g} s" if math.isfinite(x) else "-"


def domain_text(p: Any, short: bool = False) -> str:
    """Whether an image's features lie inside the model's training distribution, from the engine's
    ``Prediction.out_of_domain`` / ``domain_distance`` (the bank's nearest-neighbour distance
    against that of held-out good images); empty when the model does not say."""
    ood = getattr(p, "out_of_domain", None)
    if ood is None:
        return ""
    d, lim = getattr(p, "domain_distance", None), getattr(p, "domain_limit", None)
    try:
        dist = f" (feature distance {float(d):.3g}" if d is not None and math.isfinite(float(d)) else ""
        if dist and lim is not None and math.isfinite(float(lim)):
            dist += f"; good images up to {float(lim):.3g}"
        dist += ")" if dist else ""
    except (TypeError, ValueError):
        dist = ""
    if bool(ood):
        if short:
            return "OUT OF DOMAIN" + (f" ({float(d):.3g} > {float(lim):.3g})" if dist and lim is not None else dist)
        return ("OUT OF DOMAIN: unlike the model's training images" + dist
                + "; its score and verdict mean little for this image")
    return "in domain" + dist


DEFECT_HEADERS = ["category", "defect type", "images", "detected", "missed", "detection rate", "image_AUROC vs good",
                  "median score"]


def defect_type_rows(records: Sequence[dict[str, Any]], threshold: float) -> tuple[list[str], list[list[Any]]]:
    """One row per (category, defect type) of an evaluation's per-image records: how many images,
    how many the model flags at its ``threshold`` (records' ``is_anomalous``) and misses, and the
    image AUROC of that defect type against the good images of its category
    (:func:`ccad.metrics.auroc`); the good images get a row of their own (false alarms)."""
    from ccad.metrics import auroc

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        cat = str(r.get("category") or "all")
        kind = "good" if int(r["label"]) == 0 else str(r.get("defect_type") or "defect")
        groups.setdefault((cat, kind), []).append(r)
    rows = []
    for (cat, kind), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "good", kv[0][1])):
        scores = np.asarray([float(r["score"]) for r in recs], float)
        flagged = sum(1 for r in recs if r.get("is_anomalous"))
        med = round(float(np.median(scores)), 4) if scores.size else None
        if kind == "good":
            rows.append([cat, "good (false alarms)", len(recs), flagged, None, None, None, med])
            continue
        good = [float(r["score"]) for r in groups.get((cat, "good"), [])]
        auc = None
        if good:
            try:
                auc = round(float(auroc(np.r_[np.zeros(len(good)), np.ones(len(scores))], np.r_[good, scores])), 4)
            except Exception:
                auc = None
        rate = round(flagged / len(recs), 4) if math.isfinite(float(threshold)) else None
        rows.append([cat, kind, len(recs), flagged, len(recs) - flagged, rate, auc, med])
    return DEFECT_HEADERS, rows


def _names(items: Sequence[tuple[str, str]], limit: int = 10) -> str:
    """``a.gif (unsupported file type .gif), ...`` for ``(name, reason)`` pairs, at most ``limit``."""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(f"{n} ({why})" for n, why in items[:limit]) + more


def _left_out(det: Any) -> list[tuple[str, str]]:
    """``(file name, reason)`` of the files a fitted or trained detector's data left out (info.json
    ``skipped``: unsupported extensions and unreadable images)."""
    info = getattr(det, "info", None) or {}
    return [(Path(str(s.get("path", ""))).name, str(s.get("reason", ""))) for s in info.get("skipped") or []]


def relative_name(path: str | os.PathLike, base: Optional[str | os.PathLike] = None) -> str:
    """``path`` relative to ``base`` (posix separators) when it lies inside it, else its file name."""
    p = Path(path)
    if base is not None:
        try:
            return p.resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    return p.name


def unique_names(names: Sequence[str]) -> list[str]:
    """The names, with a repeated one numbered (``000.png``, ``000.png (2)``) so rows stay distinct."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out
PANEL_SIZE = 320


def _to_uint8(img: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if img is None:
        return None
    if img.dtype == np.uint8:
        return img
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


class AppController:
    """All app callbacks; one instance per server (its registry and job manager are shared)."""

    def __init__(self, data_root: str | os.PathLike = ".", state_dir: Optional[str | os.PathLike] = None,
                 registry: Optional[ModelRegistry] = None, jobs: Optional[JobManager] = None,
                 engine: Optional[Engine] = None, samples_dir: Optional[str | os.PathLike] = SAMPLES_DIR,
                 demo_dir: Optional[str | os.PathLike] = DEMO_MODEL_DIR) -> None:
        self.data_root = Path(data_root).expanduser().resolve()
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="ccad-app-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
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
        self._last_train: Optional[dict[str, Any]] = None
        self.hub_probe: Callable[[], bool] = hub_reachable
        self.hub_cache_dir: Optional[str] = None  # the local Hub cache (None: huggingface_hub's default)
        self._hub_seen: Optional[tuple[float, bool]] = None

    # ------------------------------------------------------------------ models
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
        self.startup_message = f"Loaded the bundled demo model: {name}."
        return self.startup_message

    def _load_path(self, path: Path, how: str) -> tuple[str, str]:
        try:
            det = self.engine.load(str(path))
        except Exception as exc:
            raise UserError(f"{path.name or path}: not a loadable ccad model ({exc})") from None
        name = self.registry.add(f"{path.name} ({det.variant})", det, f"{how} {path}", folder=str(path))
        return name, f"Loaded {name} from {how} {path}."

    def load_from_folder(self, folder: str) -> tuple[str, str]:
        """Load a saved model folder (confined to the data root)."""
        try:
            path = resolve_in_root(folder, self.data_root, kind="folder")
        except PathError as exc:
            raise UserError(str(exc)) from None
        if not (path / "config.json").is_file():
            raise UserError(f"{folder}: no config.json in this folder; pick a folder written by "
                            "save_pretrained / `ccad bank` / `ccad train`")
        return self._load_path(path, "folder")

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
        return name, f"Loaded {name} from the uploaded zip {label}."

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
            if not online or _is_hub_unreachable(exc):
                raise UserError(f"The Hugging Face Hub is unreachable (offline?): cannot download {repo_id}. "
                                "Everything else keeps working; load a local folder or a zip instead.") from None
            raise UserError(f"{repo_id}: could not load ({type(exc).__name__}: {exc})") from None
        tag = f"{repo_id}@{revision}" if revision else repo_id
        name = self.registry.add(f"{tag} ({det.variant})", det, f"hub {tag}")
        return name, f"Loaded {name} from the Hugging Face Hub."

    def model_card(self, name: Optional[str]) -> str:
        entry = self.registry.get(name)
        if entry is None:
            return views.card_markdown(None) + ("\n\n" + self.startup_message if self.startup_message else "")
        try:
            card = entry.detector.card()
        except Exception as exc:
            return f"**{name}**: the card could not be read ({exc})"
        return views.card_markdown(card, entry.name, entry.source)

    def model_card_line(self, name: Optional[str]) -> str:
        """The card in one line (shown above the closed full-card accordion)."""
        entry = self.registry.get(name)
        if entry is None:
            return views.card_summary(None)
        try:
            card = entry.detector.card()
        except Exception as exc:
            return f"**{name}**: the card could not be read ({exc})"
        return views.card_summary(card, entry.name)

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
        return {"value": thr, "minimum": lo, "maximum": max(hi, thr), "step": step}

    def false_alarm_text(self, name: Optional[str], threshold: Optional[float]) -> str:
        det = self.registry.detector(name) if name else None
        cal = getattr(det, "calibration", None) if det is not None else None
        if cal is None or not len(cal.good_scores) or threshold is None:
            return "No calibration good scores stored with this model."
        n = int(cal.false_alarms(float(threshold)))
        total = int(len(cal.good_scores))
        return (f"At threshold {float(threshold):.4g}: {n} of {total} calibration good images would be false "
                f"alarms ({100.0 * n / max(total, 1):.1f} %). Calibrated threshold: {cal.threshold:.4g}.")

    # ------------------------------------------------------------------ inspect
    def sample_paths(self) -> list[Path]:
        from ccad.data.io import list_images  # the one image-extension list (ccad.data.io.IMAGE_EXTENSIONS)

        if self.samples_dir is None or not self.samples_dir.is_dir():
            return []
        return list_images(self.samples_dir)

    def gallery_items(self) -> list[tuple[np.ndarray, str]]:
        """(image, caption) for the sample gallery; images are loaded so no path needs serving."""
        items = []
        for p in self.sample_paths():
            try:
                items.append((_to_uint8(self.engine.load_image(p)), p.stem))
            except Exception:
                continue
        return items

    def _detector(self, name: Optional[str]) -> Any:
        det = self.registry.detector(name) if name else None
        if det is None:
            raise UserError("no model is loaded: pick one in the model list, build a feature bank "
                            "(Feature bank tab) or load a model")
        self.registry.set_active(name)
        return det

    def inspect(self, name: Optional[str], files: Sequence[Any], progress: ProgressFn = None,
                base: Optional[str | os.PathLike] = None, left_out: Sequence[tuple[str, str]] = ()) -> Batch:
        """Run the model on uploaded files (paths; a ``.zip`` is opened and its images inspected);
        bad files are listed in ``batch.errors``, after ``left_out`` (``(name, reason)`` of the files
        a chosen folder held that are not images) and the non-image files of a zip. Each file is
        named by its path relative to what was uploaded or chosen: ``base`` (a chosen folder), the
        zip's root, or else its file name (numbered where two uploads share one)."""
        det = self._detector(name)
        raw = [str(getattr(f, "name", f)) for f in (files or []) if f]
        if not raw:
            raise UserError("no image given: upload one or more images or click a sample")
        paths: list[str] = []
        shown: dict[str, str] = {}
        from_zip: set[str] = set()
        skipped = list(left_out)
        with ExitStack() as stack:  # each zip is extracted into its own folder, removed once scored
            for f in raw:
                if f.lower().endswith(".zip"):
                    images, not_images = self._zip_images(f, stack)
                    skipped += not_images
                    for p, rel in images:
                        paths.append(p)
                        shown[p] = rel
                        from_zip.add(p)
                else:
                    paths.append(f)
                    shown[f] = relative_name(f, base)
            if not paths:
                raise UserError("no image given: the zip(s) hold no images (.png/.jpg/.bmp/.tif)"
                                + (f"; left out: {_names(skipped)}" if skipped else ""))
            try:
                preds, errors = det.predict_many(paths, batch_size=4, on_error="skip", progress=progress)
            except Exception as exc:
                raise UserError(f"the model failed on this batch ({type(exc).__name__}: {exc})") from None
        errors = skipped + [(shown.get(p, Path(p).name), msg) for p, msg in errors]
        if not preds:
            raise UserError("no readable image: " + "; ".join(f"{n}: {m}" for n, m in errors[:5]))
        names = unique_names([shown.get(str(p.path), Path(p.path).name) if p.path else f"image {i}"
                              for i, p in enumerate(preds)])
        # an image from a zip no longer exists on disk: later runs (comparison, re-scoring) use its pixels
        preds = [replace(p, path=None) if p.path is not None and str(p.path) in from_zip else p for p in preds]
        order = sorted(range(len(preds)), key=lambda i: -float(preds[i].score))
        return Batch(model=name or "", predictions=preds, names=names, errors=errors, selected=order[0])

    def _zip_images(self, zip_file: str, stack: ExitStack) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """``(extracted path, path inside the zip)`` of every image in an uploaded zip, and
        ``(path inside the zip, reason)`` of its other files (hidden files aside). The zip is
        extracted into a per-request folder that ``stack`` removes when it closes."""
        from ccad.data.skips import find_images, unsupported_reason
        from ccad.data.io import list_images

        try:
            root = stack.enter_context(extracted_zip(zip_file, self.uploads_dir, "inspect-", self.zip_budget))
        except PathError as exc:
            raise UserError(str(exc)) from None
        not_images = find_images([root])[1]
        return ([(str(p), p.relative_to(root).as_posix()) for p in list_images(root, recursive=True)],
                [(relative_name(q, root), unsupported_reason(q)) for q in not_images])

    def inspect_folder(self, name: Optional[str], folder: str, progress: ProgressFn = None) -> Batch:
        """Inspect every image under a server folder (inside the data root, recursively); each is
        named by its path relative to that folder."""
        from ccad.data.skips import find_images, unsupported_reason
        from ccad.data.io import list_images

        try:
            path = resolve_in_root(folder, self.data_root, kind="folder")
        except PathError as exc:
            raise UserError(str(exc)) from None

        def inside(p: Path) -> bool:  # no links out of the data root
            return p.resolve() == self.data_root or self.data_root in p.resolve().parents

        images = [p for p in list_images(path, recursive=True) if inside(p)]
        not_images = find_images([path])[1]
        left_out = [(relative_name(str(q), path), unsupported_reason(q)) for q in not_images if inside(Path(q))]
        if not images:
            raise UserError(f"{folder}: the folder holds no images (.png/.jpg/.bmp/.tif)"
                            + (f"; left out: {_names(left_out)}" if left_out else ""))
        return self.inspect(name, [str(p) for p in images], progress=progress, base=path, left_out=left_out)

    def inspect_sample(self, name: Optional[str], index: int) -> Batch:
        paths = self.sample_paths()
        if not 0 <= int(index) < len(paths):
            raise UserError(f"no sample number {index}")
        return self.inspect(name, [str(paths[int(index)])])

    def table_rows(self, batch: Optional[Batch], threshold: Optional[float]) -> list[list[Any]]:
        """Batch table, worst (highest score) first: ``#, file, score, verdict, seconds (that image's
        own time), training domain``."""
        if batch is None:
            return []
        preds = batch.at(threshold)
        rows = [self._row(i, batch.names[i], p) for i, p in enumerate(preds)]
        return sorted(rows, key=lambda r: -r[2] if math.isfinite(r[2]) else -math.inf)

    @staticmethod
    def _row(i: int, name: str, p: Any) -> list[Any]:
        score = float(p.score)
        return [i, name, round(score, 5) if math.isfinite(score) else score, p.verdict, _seconds(p.seconds),
                domain_text(p, short=True)]

    def batch_label(self, batch: Optional[Batch], compared: bool = False) -> str:
        """The batch table's label: which model scored it (verdicts belong to that model)."""
        if batch is None or not batch.predictions:
            return "Batch (inspect images to fill it)"
        order = "sorted by file, rows line up with the other table" if compared else "worst first"
        return f"Batch scored by {batch.model} ({order}; click a row to show it; click a header to sort)"

    def compare_rows(self, other: Optional[str], batch: Optional[Batch],
                     threshold: Optional[float] = None) -> tuple[list[list[Any]], list[list[Any]]]:
        """The batch and its comparison batch as two tables sorted by file (row ``k`` of both is the
        same image), each row marked (column 5, :data:`AGREE_HEADER`) with whether the two verdicts
        agree (the model in use at ``threshold``, the other at its own calibrated threshold)."""
        cmp = self.compare_batch(other, batch)
        if cmp is None or batch is None:
            return [], []
        a, b = batch.at(threshold), cmp.predictions
        order = sorted(range(len(a)), key=lambda i: (batch.names[i].lower(), batch.names[i]))
        rows_a, rows_b = [], []
        for i in order:
            if not {a[i].status, b[i].status} <= {"good", "anomalous"}:
                mark = "? no verdict"  # an error or an uncalibrated model agrees with nothing
            else:
                mark = "✓ same" if a[i].status == b[i].status else "✗ DIFFERS"
            ra, rb = self._row(i, batch.names[i], a[i]), self._row(i, cmp.names[i], b[i])
            rows_a.append([*ra[:4], mark, *ra[4:]])  # the mark beside the verdict, in view
            rows_b.append([*rb[:4], mark, *rb[4:]])
        return rows_a, rows_b

    def out_of_domain_names(self, batch: Optional[Batch]) -> list[str]:
        """Names of the batch's images whose features lie far outside the model's training
        distribution (``Prediction.out_of_domain``, where the engine reports it)."""
        if batch is None:
            return []
        return [n for n, p in zip(batch.names, batch.predictions) if getattr(p, "out_of_domain", None)]

    # ---- a batch's verdicts belong to the model that scored it
    def batch_for(self, name: Optional[str], batch: Optional[Batch]) -> Optional[Batch]:
        """``batch`` when the model ``name`` scored it, else None: a threshold, histogram or card of
        one model is never applied to scores of another."""
        if batch is None or batch.model != (name or ""):
            return None
        return batch

    def rescore(self, name: Optional[str], batch: Batch, progress: ProgressFn = None) -> Batch:
        """The same images scored by the model ``name`` (a new :class:`Batch` of that model; names,
        left-out files and the selected row kept). Images that came from a zip are re-run from
        their decoded pixels (the extracted files are gone)."""
        det = self._detector(name)
        preds = []
        for i, p in enumerate(batch.predictions):
            item = p.path if p.path and Path(p.path).is_file() else p.image
            try:
                q = det.predict(item)
            except Exception as exc:
                raise UserError(f"{name} failed on {batch.names[i]} ({type(exc).__name__}: {exc})") from None
            preds.append(q if q.path == p.path else replace(q, path=p.path))
            if progress is not None:
                progress(i + 1, len(batch.predictions))
        return Batch(model=name or "", predictions=preds, names=list(batch.names), errors=list(batch.errors),
                     selected=batch.selected)

    def switch_model(self, name: Optional[str], batch: Optional[Batch],
                     progress: ProgressFn = None) -> tuple[Optional[Batch], str]:
        """After the model in use changed to ``name`` (picked, or a bank build that finished): the
        batch re-scored by ``name`` (its verdicts at ``name``'s threshold), or None (cleared) when
        that fails; and a line saying which. An unchanged model keeps the batch as it is."""
        if batch is None or not batch.predictions or batch.model == (name or ""):
            return batch, ""
        old = batch.model
        if not name or self.registry.get(name) is None:
            return None, f"The batch scored by {old} was cleared: no model in use."
        try:
            new = self.rescore(name, batch, progress)
        except UserError as exc:
            return None, (f"⚠️ The batch scored by {old} was cleared (its verdicts do not hold for {name}); "
                          f"re-scoring it failed: {exc}")
        return new, (f"Re-scored the {len(new.predictions)} image(s) of the batch with {name} (they had been "
                     f"scored by {old}): every verdict now is {name}'s, at its threshold.")

    def training_data_text(self, name: Optional[str]) -> str:
        """What the model in use was trained on (from its card / info.json), and that images unlike
        those are out of its domain; for the bundled demo, what the demo is."""
        entry = self.registry.get(name)
        if entry is None:
            return ""
        det = entry.detector
        info = getattr(det, "info", None) or {}
        try:
            card = det.card() or {}
        except Exception:
            card = {}
        n = card.get("n_train_images", info.get("n_train_images"))
        cats = card.get("categories") or info.get("categories") or []
        size = card.get("image_size")
        demo = info.get("demo") if isinstance(info.get("demo"), dict) else None
        what = ", ".join(f"'{c}'" for c in cats) if cats else ""
        if demo is not None and entry.source == "bundled demo model":
            kind = demo.get("kind") or (cats[0] if cats else "?")
            n_txt = f"{n} " if n else ""
            return (f"**The bundled demo ({entry.name}) was trained on {n_txt}synthetic '{kind}' texture images only** "
                    f"(generated by ccad.data.synthetic, {demo.get('size', size)} px; built by "
                    f"{demo.get('built_by', 'scripts/build_demo.py')}). It knows nothing else: real parts, other "
                    "textures or photos are out of its domain and its verdicts on them mean little. Build a bank "
                    "or train a model on your own good images for a real inspection.")
        parts = [f"**{entry.name}** was trained on"]
        parts.append(f"{n} good image(s)" if n else "good images")
        if what:
            parts.append(f"of {what}")
        parts.append(f"({entry.source})." if entry.source else ".")
        return " ".join(parts) + " Images unlike those are out of its domain: its verdicts on them mean little."

    def panels(self, batch: Optional[Batch], index: Optional[int] = None,
               threshold: Optional[float] = None) -> dict[str, Any]:
        """The four aligned panels (uint8, same size) and the score / verdict / time of one result."""
        if batch is None or not batch.predictions:
            return {"original": None, "reconstruction": None, "heatmap": None, "overlay": None,
                    "recon_label": "Reconstruction", "score": "", "verdict": "", "time": "", "name": "",
                    "model": "", "domain": ""}
        i = batch.selected if index is None else int(index)
        p = batch.at(threshold)[i]
        original = _to_uint8(p.image)
        if p.reconstruction is not None:
            recon, label = _to_uint8(p.reconstruction), "Reconstruction"
        else:
            recon = np.full_like(original, 128)
            label = "Reconstruction (n/a: this method does not reconstruct)"
        return {"original": original, "reconstruction": recon, "heatmap": p.heatmap(), "overlay": p.overlay(),
                "recon_label": label, "score": f"{float(p.score):.4f}", "verdict": p.verdict.upper(),
                "time": _seconds(p.seconds), "name": batch.names[i], "model": batch.model,
                "domain": domain_text(p) or "not reported by this model"}

    def select_row(self, batch: Optional[Batch], row_value: Sequence[Any]) -> Batch:
        """Select the clicked table row (by its '#' column, so sorting the table does not matter)."""
        if batch is None:
            raise UserError("no batch to select from")
        try:
            idx = int(row_value[0])
        except (TypeError, ValueError, IndexError):
            raise UserError(f"cannot read the clicked row {row_value!r}") from None
        if not 0 <= idx < len(batch.predictions):
            raise UserError(f"row {idx} is not in the current batch")
        batch.selected = idx
        return batch

    def histogram(self, name: Optional[str], batch: Optional[Batch], threshold: Optional[float]) -> Any:
        """The calibration good scores of ``name`` and the batch's scores, only when ``name`` scored
        the batch (two models' scores are never drawn on one axis), titled with the model."""
        det = self.registry.detector(name) if name else None
        cal = getattr(det, "calibration", None) if det is not None else None
        good = cal.good_scores if cal is not None else None
        batch = self.batch_for(name, batch)
        scores = [p.score for p in batch.predictions] if batch else []
        t = float(threshold) if threshold is not None else float("nan")
        return views.score_histogram(good, scores, t, model=name or "")

    def downloads(self, batch: Optional[Batch], threshold: Optional[float]) -> list[str]:
        """Write the selected result's heatmap, overlay and binary mask PNGs and the batch CSV."""
        if batch is None or not batch.predictions:
            return []
        from PIL import Image

        dl_root = self.state_dir / "downloads"
        remove_stale(dl_root)  # Gradio serves its own copy of what it was given; old folders only take space
        dl_root.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="dl-", dir=dl_root))
        preds = batch.at(threshold)
        p = preds[batch.selected]
        stem = Path(batch.names[batch.selected]).stem or "image"
        files = []
        for suffix, arr in (("heatmap", p.heatmap()), ("overlay", p.overlay()),
                            ("mask", (p.mask.astype(np.uint8) * 255))):
            f = out / f"{stem}_{suffix}.png"
            Image.fromarray(arr).save(f)
            files.append(str(f))
        f = out / "batch_scores.csv"
        with f.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "score", "threshold", "verdict", "seconds"])
            for name, q in sorted(zip(batch.names, preds), key=lambda t: -float(t[1].score)):
                w.writerow([name, f"{float(q.score):.6f}", f"{float(q.threshold):.6f}", q.verdict,
                            f"{float(q.seconds):.3f}"])
        files.append(str(f))
        return files

    def compare_batch(self, other: Optional[str], batch: Optional[Batch],
                      progress: ProgressFn = None) -> Optional[Batch]:
        """The whole batch through a second model (row ``i`` is the same image in both; cached per
        model on the batch, so row clicks and threshold moves do not re-run it)."""
        if not other or batch is None or not batch.predictions:
            return None
        if other in batch.compared:
            return batch.compared[other]
        det = self._detector_no_activate(other)
        preds = []
        for i, p in enumerate(batch.predictions):
            try:
                preds.append(det.predict(p.path if p.path else p.image))
            except Exception as exc:
                raise UserError(f"{other} failed on {batch.names[i]} ({type(exc).__name__}: {exc})") from None
            if progress is not None:
                progress(i + 1, len(batch.predictions))
        out = Batch(model=other, predictions=preds, names=list(batch.names), selected=batch.selected)
        batch.compared[other] = out
        return out

    def compare(self, other: Optional[str], batch: Optional[Batch]) -> dict[str, Any]:
        """The second model's four panels for the selected image of the batch."""
        cmp = self.compare_batch(other, batch)
        if cmp is None or batch is None:
            return self.panels(None)
        cmp.selected = batch.selected
        return self.panels(cmp, batch.selected)

    def agreement(self, other: Optional[str], batch: Optional[Batch],
                  threshold: Optional[float] = None) -> dict[str, Any]:
        """Verdict agreement of the model in use (at ``threshold``) and ``other`` (at its own
        calibrated threshold) over the whole batch: counts and the files they disagree on."""
        cmp = self.compare_batch(other, batch)
        if cmp is None or batch is None:
            return {"agree": 0, "disagree": 0, "both_anomalous": 0, "both_good": 0, "no_verdict": [], "only_first": [],
                    "only_second": [], "text": ""}
        # statuses, not is_anomalous: an error or an uncalibrated verdict is neither good nor anomalous,
        # so it never counts as "both good" (or as agreement with a "good")
        a = [p.status for p in batch.at(threshold)]
        b = [p.status for p in cmp.predictions]
        only_a = [batch.names[i] for i, (x, y) in enumerate(zip(a, b)) if x == "anomalous" and y == "good"]
        only_b = [batch.names[i] for i, (x, y) in enumerate(zip(a, b)) if y == "anomalous" and x == "good"]
        unsure = [batch.names[i] for i, (x, y) in enumerate(zip(a, b)) if not {x, y} <= {"good", "anomalous"}]
        both_bad = sum(1 for x, y in zip(a, b) if x == y == "anomalous")
        both_good = sum(1 for x, y in zip(a, b) if x == y == "good")
        n = len(a)
        agree = both_bad + both_good
        text = (f"**Agreement on {n} image(s): {agree} agree** ({both_bad} both anomalous, {both_good} both "
                f"good), **{len(only_a) + len(only_b)} disagree**")
        if only_a:
            text += f". Only {batch.model} flags: " + ", ".join(f"`{x}`" for x in only_a[:10])
        if only_b:
            text += f". Only {other} flags: " + ", ".join(f"`{x}`" for x in only_b[:10])
        if unsure:
            text += (f". **{len(unsure)} without a verdict** from one of the models (uncalibrated or an error): "
                     + ", ".join(f"`{x}`" for x in unsure[:10]))
        return {"agree": agree, "disagree": len(only_a) + len(only_b), "both_anomalous": both_bad,
                "both_good": both_good, "no_verdict": unsure,
                "only_first": only_a, "only_second": only_b, "text": text + "."}

    def _detector_no_activate(self, name: str) -> Any:
        det = self.registry.detector(name)
        if det is None:
            raise UserError(f"model {name!r} is not loaded")
        return det

    # ------------------------------------------------------------------ feature bank
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
            try:
                path = resolve_in_root(folder or "", self.data_root, kind="folder")
            except PathError as exc:
                raise UserError(str(exc)) from None
            label = folder or str(path)
        n = count_images(path)
        if n == 0:
            raise UserError(f"{label}: the folder holds no images (.png/.jpg/.bmp/.tif)")
        return path

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
        skipped = _left_out(det)
        return name, summary, fig, (f"Built a {built}-vector bank and a PatchCore detector from {path.name} in "
                                    f"{seconds:.1f} s; it is now the active model in the Inspect tab."
                                    + (f" Left out {len(skipped)} file(s): {_names(skipped)}." if skipped else ""))

    def bank_summary(self, det: Any) -> dict[str, Any]:
        bank = getattr(det, "bank", None)
        if bank is None:
            return {}
        try:
            return dict(bank.summary())
        except Exception as exc:
            return {"error": f"summary unavailable ({exc})"}

    def bank_projection(self, det: Any, folder: Optional[Path] = None) -> Any:
        """PCA projection of the bank against a sample of all patch features (``ccad.features.bank``)."""
        try:
            from ccad.features.bank import project_2d
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
        try:
            path = resolve_in_root(dest, self.data_root, must_exist=False)
        except PathError as exc:
            raise UserError(str(exc)) from None
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

    # ------------------------------------------------------------------ training
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
        without loading it (:func:`ccad.models.autoencoder.autoencoder_problem`); the Hub is asked
        only for a Hub id that is not in the local cache."""
        from ccad.models.autoencoder import autoencoder_problem

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
        from ccad.models.autoencoder import offline_autoencoders

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

    def _check_autoencoder(self, variant: str, cfg: Any) -> None:
        """A :class:`UserError` naming the Autoencoder field when its spec would not load here."""
        spec = getattr(cfg, "autoencoder", None)
        if spec is None:
            return
        problem = self.autoencoder_problem(str(spec))
        if problem is None:
            return
        from ccad.models.autoencoder import offline_autoencoders

        offline = offline_autoencoders([self.data_root], cache_dir=self.hub_cache_dir)
        there = (f"Loads offline here: {', '.join(offline)}. Or enter" if offline else "Enter")
        raise UserError(f"Autoencoder {spec!r} of {_method_class(variant).title or variant} will not load: "
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

    def start_training(self, folder: Optional[str], zip_file: Optional[str], bank_model: Optional[str],
                       preset: str, image_size: int, steps: int, batch_size: int, preview_every: int = 50,
                       resume: bool = False, variant: str = DEFAULT_VARIANT, options: Optional[str] = None,
                       autoencoder: Optional[str] = None, fuse_bank: bool = False) -> str:
        """Start training a detector of ``variant`` in the background job manager (one job per server).

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
            params = dict(last, resume=True)
        else:
            variant = variant or DEFAULT_VARIANT
            mcls = _method_class(variant)
            if not mcls.trainable:
                raise UserError(f"{mcls.title or variant} is not trained (it is fitted): build it in the "
                                "Feature bank tab")
            # refuse a bad option, or an autoencoder that would not load, before anything starts
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
                      "fuse_bank": bool(fuse_bank)}
        # the typed config, rebuilt from the recipe (a resumed job gets a fresh copy of the same config)
        method_cfg = method_config(params["variant"], params["preset"], params["options"], params["autoencoder"])
        if resume:
            self._check_autoencoder(params["variant"], method_cfg)
        self._last_train = dict(params, resume=False)
        train_fn = self.engine.train
        last = self.jobs.snapshot() if resume else None
        last_preview = (last or {}).get("preview") if (last or {}).get("params", {}).get("out_dir") == \
            params["out_dir"] else None
        scoring = None
        if params.get("fuse_bank"):
            scoring = _method_class(params["variant"]).default_scoring()
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
                    upd["preview"] = _to_uint8(np.asarray(prev))
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
            job.params["skipped"] = _left_out(det)

        try:
            job = self.jobs.start("train", target, {k: v for k, v in params.items() if k != "bank"}, on_done)
        except JobBusy as exc:
            raise UserError(str(exc)) from None
        title = _method_class(params["variant"]).title or params["variant"]
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

    def stop_training(self) -> str:
        if self.jobs.stop():
            return "Stop requested: the job finishes its current step and saves a resumable checkpoint."
        return "No training job is running."

    def training_status(self) -> dict[str, Any]:
        """What the Train tab shows; identical for every tab and reload (server-side job)."""
        snap = self.jobs.snapshot()
        if snap is None:
            return {"status": "No training job has run on this server yet.", "progress": "", "losses": [],
                    "preview": None, "state": "idle", "model_name": None, "can_resume": False}
        total = snap["total_steps"] or 0
        pct = f" ({100.0 * snap['step'] / total:.0f} %)" if total else ""
        loss = f"{snap['loss']:.4f}" if math.isfinite(snap["loss"]) else "-"
        progress = (f"step {snap['step']}/{total}{pct} · epoch {snap['epoch']} · loss "
                    f"{loss} · elapsed {views.format_seconds(snap['elapsed'])} · ETA "
                    f"{views.format_seconds(snap['eta_seconds'])}")
        status = f"Job {snap['id']}: {snap['state']} - {snap['message']}"
        if snap["params"].get("model_name"):
            status += f". Model loaded as '{snap['params']['model_name']}' (pick it in the model list)."
        skipped = snap["params"].get("skipped") or []
        if skipped:
            status += f" Left out {len(skipped)} file(s) of the data: {_names(skipped)}."
        return {"status": status, "progress": progress, "losses": snap["losses"], "preview": snap["preview"],
                "state": snap["state"], "model_name": snap["params"].get("model_name"),
                "can_resume": snap["state"] in (STOPPED, FAILED) and self._last_train is not None}

    # ------------------------------------------------------------------ evaluate
    def run_evaluation(self, name: Optional[str], path: str, layout: str = "auto", split: str = "test",
                       progress: ProgressFn = None) -> dict[str, Any]:
        """Evaluate a model on a labelled dataset inside the data root (``ccad.evaluate``)."""
        det = self._detector(name)
        try:
            root = resolve_in_root(path, self.data_root, kind="any")
        except PathError as exc:
            raise UserError(str(exc)) from None
        try:
            samples = self.engine.load_dataset(str(root), split=split, layout=layout)
        except Exception as exc:
            raise UserError(f"{path}: cannot read it as a dataset (layout {layout!r}): {exc}") from None
        if not samples:
            raise UserError(f"{path}: no {split} images found (layout {layout!r})")
        labels = {int(s.label) for s in samples}
        try:
            report = self.engine.evaluate(det, samples, progress=progress)
        except Exception as exc:
            raise UserError(f"evaluation failed ({type(exc).__name__}: {exc})") from None
        from ccad.evaluate import METRIC_KEYS

        rows = views.metrics_rows(report.per_category, METRIC_KEYS)
        msg = (f"Evaluated {name} on {len(report.records)} images from {path} in {report.seconds:.1f} s"
               + (f"; {len(report.errors)} unreadable file(s) skipped" if report.errors else "")
               + (f"; left out {len(getattr(samples, 'skipped', []))} file(s) with unsupported extensions: "
                  + ", ".join(Path(q).name for q in samples.skipped[:10]) if getattr(samples, "skipped", None) else "")
               + ("" if labels >= {0, 1} else "; only one class present, so AUROC/AP are undefined"))
        cats = [c for c in report.per_category if c != "mean"]
        if len(cats) > 1:
            msg += f"; {len(cats)} categories: one row each, then their mean"
        defect_headers, defect_rows = defect_type_rows(report.records, getattr(det, "threshold", float("nan")))
        return {"headers": ["category", *METRIC_KEYS], "rows": rows, "roc": views.roc_figure(report.curves),
                "defect_headers": defect_headers, "defect_rows": defect_rows,
                "pr": views.pr_figure(report.curves), "fn": self._gallery(report.worst("fn")),
                "fp": self._gallery(report.worst("fp")), "message": msg, "report": report,
                "categories": cats, "curve_choices": [ALL_IMAGES, *(cats if len(cats) > 1 else []),
                                                      *([EVERY_CATEGORY] if len(cats) > 1 else [])]}

    def category_curves(self, report: Any, which: str) -> tuple[Any, Any, str]:
        """(ROC, PR, note) for ``which``: all images pooled, one category, or every category overlaid
        (curves from the report's per-image records, ``ccad.metrics.roc_points`` / ``pr_points``)."""
        if report is None:
            raise UserError("run an evaluation first")
        if not which or which == ALL_IMAGES:
            return views.roc_figure(report.curves), views.pr_figure(report.curves), ""
        from ccad.metrics import pr_points, roc_points

        cats = [c for c in report.per_category if c != "mean"]
        wanted = cats if which == EVERY_CATEGORY else [which]
        named, skipped = {}, []
        for cat in wanted:
            recs = [r for r in report.records if (r.get("category") or "all") == cat]
            labels = np.asarray([r["label"] for r in recs], int)
            scores = np.asarray([r["score"] for r in recs], float)
            if len(set(labels.tolist())) < 2:
                skipped.append(cat)
                continue
            named[cat] = {"roc": roc_points(labels, scores), "pr": pr_points(labels, scores)}
        if which not in cats and which != EVERY_CATEGORY:
            raise UserError(f"no category {which!r} in this evaluation")
        roc, pr = views.category_curve_figures(named)
        note = ("" if not skipped else "No curve for " + ", ".join(skipped)
                + " (only one class of images there).")
        return roc, pr, note

    def _gallery(self, records: list[dict[str, Any]]) -> list[tuple[np.ndarray, str]]:
        """(image, caption) of the worst cases: the file name, its category / defect type and its
        score against the threshold (the gallery shows them with their aspect kept)."""
        out = []
        for r in records:
            try:
                img = _to_uint8(self.engine.load_image(r["path"]))
            except Exception:
                continue
            where = " / ".join(str(x) for x in (r.get("category"), r.get("defect_type")) if x)
            # the score first: a narrow thumbnail cuts the end of its caption
            out.append((img, f"score {float(r['score']):.4g} · {Path(r['path']).name}"
                        + (f" · {where}" if where else "")))
        return out
