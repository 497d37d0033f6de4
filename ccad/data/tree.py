"""Reading a data set's folder tree: what every layout loader and the layout detection share.

Case-insensitive folder lookup, mask files and their index by image stem, the split and label
words of the layouts, absolute paths that keep a symlink's own name, and the one error a path
that is not a readable data set raises (:class:`DatasetLayoutError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

from ccad.data.io import is_image_file, list_images
from ccad.data.sample import LABEL_ANOMALOUS, LABEL_GOOD, LABEL_UNKNOWN, Sample

__all__ = [
    "PathLike",
    "DatasetLayoutError",
    "GOOD_WORDS",
    "MASK_DIR_NAMES",
    "abs_path",
    "opt_abs",
    "norm_split",
    "split_list",
    "child",
    "first_child",
    "subdirs",
    "categories",
    "type_folders",
    "looks_like_mask",
    "images_in",
    "mask_index",
    "parse_label",
    "typed_sample",
]

PathLike = Union[str, "os.PathLike[str]"]

_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "eval": "test", "testing": "test",
                  "training": "train"}
GOOD_WORDS = {"good", "normal", "ok", "0", "false", "free", "negative", "nominal"}
_BAD_WORDS = {"anomaly", "anomalous", "bad", "defect", "defective", "ng", "1", "true", "abnormal", "positive"}
MASK_DIR_NAMES = ("ground_truth", "gt", "mask", "masks", "ground-truth", "groundtruth")
_MASK_SUFFIXES = ("_mask", "_label", "_gt")


class DatasetLayoutError(ValueError):
    """A path is not a data set this package can read (unknown layout, no images, bad CSV)."""


def abs_path(p: PathLike) -> Path:
    """``p`` made absolute WITHOUT resolving symlinks: a sample, a skipped file and every row
    that shows it are named by the path the user gave (a link's own name, never its target)."""
    return Path(os.path.abspath(os.fspath(p)))


def opt_abs(p: PathLike | None) -> str | None:
    """:func:`abs_path` as a string, ``None`` kept (a sample's optional mask path)."""
    return str(abs_path(p)) if p else None


def norm_split(split: str | None) -> str | None:
    """``"val"`` -> ``"validation"``, ``"Training"`` -> ``"train"``...; ``None`` stays ``None``."""
    if split is None:
        return None
    s = str(split).strip().lower()
    return _SPLIT_ALIASES.get(s, s)


def split_list(split: str) -> list[str]:
    """The splits ``split`` names (``"all"``: train, validation, test); an unknown one raises."""
    s = norm_split(split)
    if s == "all":
        return ["train", "validation", "test"]
    if s not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'validation', 'test' or 'all'")
    return [s]


def child(d: Path, name: str) -> Path | None:
    """Case-insensitive sub-folder lookup (``Train`` / ``train``)."""
    p = d / name
    if p.is_dir():
        return p
    if not d.is_dir():
        return None
    low = name.lower()
    for c in d.iterdir():
        if c.is_dir() and c.name.lower() == low:
            return c
    return None


def first_child(d: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that is a sub-folder of ``d`` (:func:`child`), else ``None``."""
    return next((c for c in (child(d, n) for n in names) if c is not None), None)


def subdirs(d: Path) -> list[Path]:
    """The sorted, non-hidden sub-folders of ``d`` (none when ``d`` is not a folder)."""
    if not d.is_dir():
        return []
    return sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))


def categories(root: Path, is_category: Callable[[Path], bool]) -> list[Path]:
    """``[root]`` when ``root`` is itself a category folder, else its sub-folders that are."""
    return [root] if is_category(root) else [c for c in subdirs(root) if is_category(c)]


def type_folders(cat: Path, split: str) -> Iterator[tuple[str, Path]]:
    """``(split, folder)`` for every ``<cat>/<split>/<type>/`` of the splits ``split`` names."""
    for sp in split_list(split):
        sd = child(cat, sp)
        if sd is not None:
            for td in subdirs(sd):
                yield sp, td


def looks_like_mask(p: Path) -> bool:
    """A file named ``*_mask``, ``*_label`` or ``*_gt``: ground truth, never an input image."""
    return p.stem.lower().endswith(_MASK_SUFFIXES)


def images_in(d: Path, recursive: bool = False) -> list[Path]:
    """The image files of ``d`` that are not masks (:func:`looks_like_mask`); notes nothing."""
    return [p for p in list_images(d, recursive=recursive) if not looks_like_mask(p)]


def mask_index(d: Path | None) -> dict[str, Path]:
    """stem (without a ``_mask`` suffix) -> mask file, for a folder of masks."""
    out: dict[str, Path] = {}
    if d is None or not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        if not (p.is_file() and is_image_file(p)):
            continue
        stem = p.stem
        for suf in _MASK_SUFFIXES:
            if stem.lower().endswith(suf):
                stem = stem[: -len(suf)]
                break
        # an exact-stem file wins over a suffixed one only if both exist: keep the first seen
        out.setdefault(stem, p)
    return out


def parse_label(value: str | None, defect_type: str | None, has_mask: bool) -> int:
    """A label word or number (``good``/``anomaly``/``0``/``1``/``-1``...); without one, the
    defect type (``good`` -> 0, else 1), else the mask (present -> 1), else unknown (-1)."""
    v = (value or "").strip().lower()
    if v in ("-1", "unknown", "?", "none", "unlabelled", "unlabeled"):
        return LABEL_UNKNOWN
    if v in GOOD_WORDS:
        return LABEL_GOOD
    if v in _BAD_WORDS:
        return LABEL_ANOMALOUS
    if v:
        try:
            f = float(v)
        except ValueError:
            raise ValueError(f"cannot interpret label {value!r} (use 0/1, good/anomaly or -1)") from None
        return LABEL_ANOMALOUS if f > 0 else (LABEL_GOOD if f == 0 else LABEL_UNKNOWN)
    dt = (defect_type or "").strip().lower()
    if dt:
        return LABEL_GOOD if dt in GOOD_WORDS else LABEL_ANOMALOUS
    if has_mask:
        return LABEL_ANOMALOUS
    return LABEL_UNKNOWN


def typed_sample(image: Path, mask: Path | None, good: bool, category: str, defect_type: str,
                 split: str, extra_masks: tuple[str, ...] = ()) -> Sample:
    """The sample of an image found in a defect-type folder: good (label 0, type ``"good"``) or
    anomalous (label 1, type ``defect_type``), paths made absolute (:func:`abs_path`)."""
    return Sample(str(abs_path(image)), opt_abs(mask), LABEL_GOOD if good else LABEL_ANOMALOUS,
                  category, "good" if good else defect_type, split, extra_masks)
