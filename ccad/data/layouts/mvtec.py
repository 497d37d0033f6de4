"""The MVTec family: MVTec AD (also anomalib's MVTec-like folders and CCAD's DAGM
re-annotation), MVTec LOCO AD (several masks per image) and MVTec 3D-AD (RGB only).

Each category folder holds ``<split>/<type>/`` folders; ``split="train"`` keeps the good type
only (the CCAD paper, Sec. 4.1, trains on good images)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ccad.data.io import list_images
from ccad.data.sample import Sample
from ccad.data.skips import read_images, reports_skipped
from ccad.data.tree import (
    GOOD_WORDS,
    MASK_DIR_NAMES,
    DatasetLayoutError,
    PathLike,
    abs_path,
    categories,
    child,
    first_child,
    mask_index,
    subdirs,
    type_folders,
    typed_sample,
)

__all__ = [
    "load_mvtec",
    "load_dagm_ccad",
    "load_mvtec_loco",
    "load_mvtec3d",
    "is_mvtec_category",
    "is_loco_category",
    "is_mvtec3d_category",
]


def is_mvtec_category(d: Path) -> bool:
    """``d`` holds a ``train/`` or a ``test/`` folder."""
    return child(d, "train") is not None or child(d, "test") is not None


def _filter_categories(cats: list[Path], category: str | Sequence[str] | None, root: Path,
                       layout: str) -> list[Path]:
    """Keep the category folders named by ``category`` (None: all); none left is a clear error."""
    if category is None:
        return cats
    wanted = [category] if isinstance(category, str) else list(category)
    kept = [c for c in cats if c.name in wanted]
    if not kept:
        raise DatasetLayoutError(f"category {wanted[0]!r} not found in '{root}' ({layout} layout)")
    return kept


def _mvtec_categories(root: Path, category: str | Sequence[str] | None) -> list[Path]:
    cats = categories(root, is_mvtec_category)
    if category is not None:
        wanted = [category] if isinstance(category, str) else list(category)
        if len(cats) == 1 and cats[0] == root and root.name in wanted:
            return cats
        byname = {c.name: c for c in cats}
        missing = [w for w in wanted if w not in byname]
        if missing:
            raise DatasetLayoutError(
                f"category {missing[0]!r} not found in '{root}'; found: {', '.join(sorted(byname)) or 'none'}"
            )
        cats = [byname[w] for w in wanted]
    return cats


def _mvtec_category(cat: Path, split: str) -> list[Sample]:
    out: list[Sample] = []
    gt_root = first_child(cat, MASK_DIR_NAMES)
    for sp, td in type_folders(cat, split):
        good = td.name.lower() in GOOD_WORDS
        if sp == "train" and not good:
            continue
        masks = {} if good else mask_index(child(gt_root, td.name) if gt_root else None)
        out.extend(typed_sample(p, masks.get(p.stem), good, cat.name, td.name, sp) for p in read_images(td))
    return out


@reports_skipped
def load_mvtec(root: PathLike, split: str = "test", category: str | Sequence[str] | None = None) -> list[Sample]:
    """MVTec AD layout (also anomalib's MVTec-like folders and CCAD's DAGM re-annotation).

    ``root`` is a category folder (holding ``train/`` and ``test/``) or a folder of categories;
    ``category`` picks one or several by name (default: all). ``split`` is ``"train"`` (good
    images only), ``"validation"``, ``"test"`` or ``"all"``. Masks are looked up in
    ``ground_truth/<type>/`` as ``<stem>_mask.<ext>`` or ``<stem>.<ext>``; an anomalous image
    without a mask gets ``mask_path=None``.
    """
    r = Path(root)
    if not r.is_dir():
        raise DatasetLayoutError(f"'{r}' is not a folder")
    out: list[Sample] = []
    for cat in _mvtec_categories(r, category):
        out.extend(_mvtec_category(cat, split))
    return out


@reports_skipped
def load_dagm_ccad(root: PathLike, split: str = "test", category: str | Sequence[str] | None = None) -> list[Sample]:
    """CCAD's re-annotated DAGM layout: ``Class1_defect/train/good``, ``test/{good,anomal}``,
    ``ground_truth/anomal/<stem>[_mask].png``. The same structure as MVTec AD (:func:`load_mvtec`).
    """
    return load_mvtec(root, split, category)


def is_loco_category(d: Path) -> bool:
    """``d/test`` holds ``logical_anomalies/`` or ``structural_anomalies/``."""
    t = child(d, "test")
    return t is not None and any(child(t, name) is not None for name in ("logical_anomalies", "structural_anomalies"))


@reports_skipped
def load_mvtec_loco(root: PathLike, split: str = "test", category: str | Sequence[str] | None = None) -> list[Sample]:
    """MVTec LOCO AD: ``<cat>/{train,validation}/good``, ``test/{good,logical_anomalies,
    structural_anomalies}``, masks ``ground_truth/<type>/<stem>/000.png, 001.png, ...`` (several
    per image; the ground truth is their union, see :func:`ccad.data.dataset.load_sample_mask`).
    """
    r = Path(root)
    cats = _filter_categories(categories(r, is_loco_category), category, r, "MVTec LOCO")
    out: list[Sample] = []
    for cat in cats:
        gt = child(cat, "ground_truth")
        for sp, td in type_folders(cat, split):
            good = td.name.lower() == "good"
            if sp != "test" and not good:
                continue
            md = child(gt, td.name) if not good and gt is not None else None
            for p in read_images(td):
                masks = list_images(md / p.stem) if md is not None and (md / p.stem).is_dir() else []
                extra = tuple(str(abs_path(q)) for q in masks[1:])
                out.append(typed_sample(p, masks[0] if masks else None, good, cat.name, td.name, sp, extra))
    return out


def is_mvtec3d_category(d: Path) -> bool:
    """A ``<split>/<type>/`` folder of ``d`` holds an ``rgb/`` folder."""
    for sp in ("train", "test", "validation"):
        sd = child(d, sp)
        if sd is not None and any(child(td, "rgb") is not None for td in subdirs(sd)):
            return True
    return False


@reports_skipped
def load_mvtec3d(root: PathLike, split: str = "test", category: str | Sequence[str] | None = None) -> list[Sample]:
    """MVTec 3D-AD, RGB only: ``<cat>/{train,validation,test}/<type>/rgb/*.png`` with masks in
    ``<cat>/<split>/<type>/gt/<stem>.png`` (the ``xyz`` point clouds are ignored).
    """
    r = Path(root)
    cats = _filter_categories(categories(r, is_mvtec3d_category), category, r, "MVTec 3D-AD")
    out: list[Sample] = []
    for cat in cats:
        for sp, td in type_folders(cat, split):
            rgb = child(td, "rgb")
            if rgb is None:
                continue
            good = td.name.lower() == "good"
            if sp != "test" and not good:
                continue
            masks = {} if good else mask_index(child(td, "gt"))
            out.extend(typed_sample(p, masks.get(p.stem), good, cat.name, td.name, sp) for p in read_images(rgb))
    return out
