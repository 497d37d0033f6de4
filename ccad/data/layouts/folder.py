"""Folders without a train/test split: a plain folder of images, and anomalib's ``Folder``
layout (``good/``, ``<defect>/``, ``mask/<defect>/<stem>.png``)."""

from __future__ import annotations

from pathlib import Path

from ccad.data.sample import LABEL_ANOMALOUS, LABEL_GOOD, Sample
from ccad.data.skips import read_images, reports_skipped
from ccad.data.tree import (
    MASK_DIR_NAMES,
    DatasetLayoutError,
    PathLike,
    abs_path,
    child,
    first_child,
    images_in,
    mask_index,
    norm_split,
    opt_abs,
    split_list,
    subdirs,
)

__all__ = ["load_folder", "load_anomalib_folder", "is_anomalib_folder"]

_GOOD_DIRS = ("good", "normal", "ok")


@reports_skipped
def load_folder(dir: PathLike, label: int = 0, recursive: bool = False, category: str = "",
                split: str = "train", defect_type: str | None = None) -> list[Sample]:
    """All images in a folder (files named ``*_mask``/``*_label`` are skipped), one label for all.

    ``label`` is 0 (good, the usual case: a folder of good images to build a bank from), 1 or
    -1 (unknown, e.g. a folder to inspect). ``defect_type`` defaults to ``"good"`` for label 0 and
    to the folder name otherwise.
    """
    d = Path(dir)
    if not d.is_dir():
        raise DatasetLayoutError(f"'{d}' is not a folder")
    files = read_images(d, recursive=recursive)
    dt = defect_type if defect_type is not None else ("good" if label == 0 else d.name)
    return [Sample(str(abs_path(p)), None, label, category, dt, norm_split(split) or "train") for p in files]


def is_anomalib_folder(d: Path) -> bool:
    """``d`` holds a ``good/`` (or ``normal/``, ``ok/``) folder with images in it."""
    for name in _GOOD_DIRS:
        c = child(d, name)
        if c is not None and images_in(c):
            return True
    return False


@reports_skipped
def load_anomalib_folder(root: PathLike, split: str = "test", normal_test_ratio: float = 0.2,
                         category: str = "") -> list[Sample]:
    """anomalib ``Folder`` layout: ``good/`` (or ``normal/``), one folder per defect type, and
    masks in ``mask/<defect>/`` (or ``ground_truth/``, ``masks/``) sharing the image stem
    (``<stem>.png`` or ``<stem>_mask.png``).

    There is no train/test split on disk, so the good images are split deterministically:
    every ``round(1 / normal_test_ratio)``-th good image (in sorted order) goes to ``test``, the
    rest to ``train``; all defective images are ``test``.
    """
    r = Path(root)
    good_dir = first_child(r, _GOOD_DIRS)
    if good_dir is None:
        raise DatasetLayoutError(f"'{r}' has no good/ (or normal/) folder (anomalib Folder layout)")
    mask_root = first_child(r, MASK_DIR_NAMES)
    cat = category or r.name
    splits = set(split_list(split))
    every = max(2, int(round(1.0 / normal_test_ratio))) if normal_test_ratio > 0 else 0
    out: list[Sample] = []
    for i, p in enumerate(read_images(good_dir)):
        sp = "test" if every and (i % every == every - 1) else "train"
        if sp in splits:
            out.append(Sample(str(abs_path(p)), None, LABEL_GOOD, cat, "good", sp))
    if "test" in splits:
        skip = {good_dir.name.lower()} | set(MASK_DIR_NAMES)
        for td in subdirs(r):
            if td.name.lower() in skip:
                continue
            imgs = read_images(td)
            if not imgs:
                continue
            masks = mask_index(child(mask_root, td.name)) if mask_root else {}
            if mask_root is not None and not masks:
                masks = mask_index(mask_root)  # flat mask folder
            for p in imgs:
                out.append(Sample(str(abs_path(p)), opt_abs(masks.get(p.stem)), LABEL_ANOMALOUS,
                                  cat, td.name, "test"))
    return out
