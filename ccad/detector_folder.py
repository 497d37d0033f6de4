"""The folder a detector is saved in, and how it is written and read back.

A detector folder holds ``config.json`` (the :class:`~ccad.detector_config.DetectorConfig`), the
feature bank (``bank.safetensors``), the method's own files (its ``save`` / ``load`` hooks), the
fusion memory when ``scoring.fusion`` is ``"bank"``, ``calibration.json``, ``info.json`` and a
Hub model card (``README.md``). :class:`ccad.detector.AnomalyDetector` calls
:func:`write_folder` from ``save_pretrained`` and :func:`read_folder` from ``load_folder``; every
unreadable or corrupt file is a :class:`~ccad.errors.CheckpointError` naming it.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import replace_folder, write_text_atomic
from .config import ConfigError
from .detector_config import DetectorConfig
from .errors import CheckpointError
from .folder_files import bundled_config, check_folder_links, confine_config_paths
from .methods import Context, get_method
from .scoring.threshold import Calibration

__all__ = ["FILES", "check_savable", "check_weight_files", "default_device", "model_card_text", "read_folder",
           "save_folder", "write_calibration", "write_folder"]

FILES = {
    "config": "config.json",
    "calibration": "calibration.json",
    "info": "info.json",
}


def default_device() -> torch.device:
    """CUDA when present, else the CPU: where a detector runs unless it is told otherwise."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def write_calibration(folder: str | Path, calibration: Calibration) -> None:
    """Replace ``calibration.json`` (the threshold and its statistics) of a detector folder in one
    step (:func:`ccad.atomic.write_text_atomic`); a non-finite calibration is refused first."""
    _check_calibration(calibration, folder)
    write_text_atomic(Path(folder, FILES["calibration"]), json.dumps(calibration.to_dict(), indent=1))


def _check_calibration(calibration: Any, where: str | Path) -> None:
    if calibration is None:
        return
    try:
        calibration.check_finite()
    except ValueError as exc:  # nothing is written: a NaN threshold would read every image as good
        raise ValueError(f"{where}: not saved: the calibration is not usable ({exc}); "
                         f"re-calibrate on readable good images") from None


def check_savable(detector: Any, save_directory: str | Path) -> None:
    """Everything a save can refuse, checked before anything is written: the config, the
    calibration, and a destination that is a file."""
    dest = Path(save_directory).expanduser()
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest}: exists and is not a folder: the model is not saved there")
    try:
        detector.config.validate()
    except ConfigError as exc:
        raise ValueError(f"{dest}: not saved: {exc}") from None
    _check_calibration(detector.calibration, dest)


def save_folder(detector: Any, save_directory: str | Path, write: Any = None) -> Path:
    """The one way a detector folder is written: :func:`check_savable` first, then the whole folder
    is written into a temporary sibling and swapped in (:func:`ccad.atomic.replace_folder`): a
    refused, failed or killed save leaves the old folder as it was. ``write(tmp)`` writes the
    files (default :func:`write_folder`). Returns the folder."""
    check_savable(detector, save_directory)
    with replace_folder(save_directory) as tmp:
        (write or (lambda d: write_folder(detector, d)))(tmp)
    return Path(save_directory)


def write_folder(detector: Any, save_directory: str | Path) -> None:
    """Write an :class:`~ccad.detector.AnomalyDetector` into ``save_directory`` (a fresh folder:
    :func:`save_folder` is the safe way to save): config, bank, the method's files, the fusion
    memory, calibration, info and the model card. An unusable (non-finite) calibration is refused
    before anything is written."""
    save_directory = Path(save_directory)
    _check_calibration(detector.calibration, save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    # a weights file the config names is kept in the folder (weights/), named relative to it
    bundled_config(detector.config, save_directory).save(save_directory / FILES["config"])
    if detector.bank is not None:
        detector.bank.save(save_directory)
    detector.method.save(save_directory)
    if detector.fusion is not None:
        detector.fusion.save(save_directory)
    if detector.calibration is not None:
        write_calibration(save_directory, detector.calibration)
    elif (save_directory / FILES["calibration"]).is_file():  # never leave another model's threshold behind
        (save_directory / FILES["calibration"]).unlink()
    info = dict(detector.info)
    info.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    info["ccad_version"] = __version__
    (save_directory / FILES["info"]).write_text(json.dumps(info, indent=2, default=float))
    (save_directory / "README.md").write_text(model_card_text(detector.card()))


def read_folder(path: str | Path, device: Any = None) -> dict[str, Any]:
    """Read a detector folder written by :func:`write_folder`: the keyword arguments of
    :class:`~ccad.detector.AnomalyDetector` (``config``, ``bank``, ``method``, ``calibration``,
    ``info``, ``device``, ``fusion``). Every weight file is checked before anything is built."""
    from safetensors import SafetensorError

    from .features import FeatureBank

    path = Path(path)
    if not (path / FILES["config"]).is_file():
        raise CheckpointError(f"{path}: not a ccad model folder (no {FILES['config']})")
    try:
        config = DetectorConfig.load(path / FILES["config"])
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    mcls = get_method(config.variant)
    # the folder's files only: no config path or link out of it is ever opened (issue 20 item 7)
    confine_config_paths(config, path)
    check_folder_links(path)
    check_weight_files(path)  # a truncated or corrupted safetensors file is named before anything is built
    bank = None
    if (path / "bank.safetensors").is_file():
        try:
            bank = FeatureBank.load(path)
        except Exception as exc:  # noqa: BLE001 - any reader error is a checkpoint problem
            raise CheckpointError(f"{path}: cannot read the feature bank ({exc})") from None
        if isinstance(bank.meta.get("weights"), str) and Path(bank.meta["weights"]).exists():
            bank.meta["weights"] = config.bank.weights  # the confined file, never bank.json's own path
    elif mcls.uses_bank:
        raise CheckpointError(f"{path}: a {config.variant} detector needs its feature bank (bank.safetensors)")
    dev = torch.device(device) if device is not None else default_device()
    ctx = Context(image_size=config.image_size, device=dev, bank_config=config.bank, scoring=config.scoring,
                  bank=bank)
    try:
        method = mcls.load(path, config.method, ctx)
    except (SafetensorError, RuntimeError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read the {config.variant} weights ({exc})") from None
    calibration = None
    if (path / FILES["calibration"]).is_file():
        try:
            calibration = Calibration.from_dict(json.loads((path / FILES["calibration"]).read_text()))
            calibration.check_finite()
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path / FILES['calibration']}: {exc}; re-calibrate the model "
                                  f"(ccad calibrate MODEL --good FOLDER)") from None
    fusion = None
    if config.scoring.fusion == "bank":
        from .scoring.fusion import BankFusion, bank_backbone

        try:
            fusion = BankFusion.load(path, bank_backbone(config.bank, dev))
        except (FileNotFoundError, OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: cannot read the fusion memory ({exc})") from None
    info = {}
    if (path / FILES["info"]).is_file():
        try:
            info = json.loads((path / FILES["info"]).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / FILES['info']}: {exc}") from None
    return {"config": config, "bank": bank, "method": method, "calibration": calibration, "info": info,
            "device": dev, "fusion": fusion}


def check_weight_files(folder: str | Path) -> None:
    """Read every ``*.safetensors`` file under a model folder and refuse a truncated or corrupt one,
    or one holding NaN / inf weights, with a :class:`CheckpointError` naming the file (and tensor)."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    t = fh.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad = int((~torch.isfinite(t)).sum())
                        raise CheckpointError(f"{f}: tensor {key!r} holds {bad} NaN/inf value(s) of {t.numel()}: "
                                              f"the file is corrupt; re-download or re-train the model")
        except CheckpointError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{f}: cannot read the weights: not a readable safetensors file (truncated or "
                                  f"corrupt: {exc}); "
                                  f"re-download or re-train the model") from None


def model_card_text(card: dict[str, Any]) -> str:
    """A Hub model card (YAML metadata + a table of the detector's facts)."""
    rows = "\n".join(f"| {k} | {json.dumps(v, default=str)} |" for k, v in card.items())
    return (
        "---\nlibrary_name: ccad\ntags:\n- anomaly-detection\n- ccad\n- diffusion\nlicense: apache-2.0\n---\n\n"
        f"# ccad detector: {card['title']}\n\n"
        "Load it with `AnomalyDetector.from_pretrained(path_or_repo_id)` from the `ccad` package.\n\n"
        f"| field | value |\n|---|---|\n{rows}\n"
    )
