"""Finding what to review: DAGM-style images and their weak labels in a folder
(:func:`discover_items`, or the ``ccad.data`` DAGM loaders), and the non-defective images of
one class to build its bank from (:func:`class_normal_images`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ccad.data.io import IMAGE_EXTENSIONS

__all__ = ["NormalImages", "ReviewItem", "class_normal_images", "discover_items"]


@dataclass
class ReviewItem:
    """One image to review: its weak (ellipse) label and, on synthetic data, the exact mask.

    ``key`` is unique within a session (``category/split/stem``: DAGM numbers images per class
    and per split, so stems repeat).
    """

    image_path: str
    label_path: str | None
    exact_path: str | None = None
    category: str = ""
    split: str = ""

    @property
    def stem(self) -> str:
        return Path(self.image_path).stem

    @property
    def key(self) -> str:
        return "/".join(p for p in (self.category, self.split, self.stem) if p)


def _index_dir(d: Path | None) -> dict[str, Path]:
    """``{lower-case stem: path}`` of the image files directly in ``d``."""
    if d is None or not d.is_dir() or d.is_symlink():
        return {}
    return {p.stem.lower(): p for p in sorted(d.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def _find_label(files: dict[str, Path], stem: str, suffixes: Sequence[str]) -> Path | None:
    for suf in suffixes:
        hit = files.get(f"{stem}{suf}".lower())
        if hit is not None:
            return hit
    return None


def _labels_txt(label_dir: Path | None) -> dict[str, Path]:
    """Parse DAGM's ``Label/Labels.txt`` rows ``index flag file labelflag labelfile``."""
    out: dict[str, Path] = {}
    if label_dir is None or not label_dir.is_dir():
        return out
    txt = next((p for p in label_dir.iterdir() if p.name.lower() == "labels.txt"), None)
    if txt is None:
        return out
    for line in txt.read_text(errors="replace").splitlines():
        f = line.split()
        if len(f) >= 5 and f[4] not in ("0", "-"):
            out[Path(f[2]).stem.lower()] = label_dir / f[4]
    return out


def _child_dir(d: Path, *names: str) -> Path | None:
    low = {n.lower() for n in names}
    for c in sorted(d.iterdir()) if d.is_dir() else []:
        if c.name.lower() in low and c.is_dir() and not c.is_symlink():
            return c
    return None


_SPLITS = {"train": "train", "test": "test", "validation": "validation", "val": "validation"}
_SKIP_DIRS = {"label", "labels", "true_masks", "ground_truth", "exact", "weak_labels", "masks"}


def discover_items(root: str | os.PathLike[str]) -> tuple[list[ReviewItem], list[str]]:
    """Find DAGM images and their weak labels under ``root`` without the data package's loaders.

    Reads the published DAGM layout (``ClassN/Train|Test/*.PNG`` with ``Label/Labels.txt`` and
    ``Label/<stem>_label.PNG``; exact masks of the synthetic set in ``Exact/<stem>_mask.PNG``),
    the flat sample layout (``test_data/classN/*.PNG`` with ``true_masks/<stem>_label.PNG``),
    and MVTec-style layouts (``<cat>/test/<defect>/<stem>.png`` with ellipses in
    ``<cat>/weak_labels/<defect>/<stem>_ellipse.png`` and exact masks in
    ``<cat>/ground_truth/<defect>/<stem>_mask.png``; without weak labels the ground truth, e.g.
    CCAD's re-annotation, is the label under review). Symlinked folders are not followed.
    Returns ``(items, unlabelled)``; images without a label are unknown, not good.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DAGM folder not found: {root}")
    items: list[ReviewItem] = []
    unlabelled: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                             and n.lower() not in _SKIP_DIRS)
        images = sorted(d / f for f in filenames if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            continue
        rel = d.relative_to(root).parts
        # DAGM-style: label folder is a child of the image folder
        label_dir = _child_dir(d, "Label", "true_masks")
        labels = _index_dir(label_dir)
        table = _labels_txt(label_dir)
        exact = _index_dir(_child_dir(d, "Exact"))
        # MVTec-style: <cat>/<split>/<defect>/ with <cat>/weak_labels|ground_truth/<defect>/
        weak: dict[str, Path] = {}
        truth: dict[str, Path] = {}
        split = ""
        cat_parts = list(rel)
        if len(rel) >= 2 and rel[-2].lower() in _SPLITS:
            cat_dir = d.parent.parent
            weak = _index_dir(_child_dir(cat_dir / "weak_labels", d.name) if
                              (cat_dir / "weak_labels").is_dir() else None)
            truth = _index_dir(_child_dir(cat_dir / "ground_truth", d.name) if
                               (cat_dir / "ground_truth").is_dir() else None)
            split = _SPLITS[rel[-2].lower()]
            cat_parts = list(rel[:-2]) + ([rel[-1]] if rel[-1].lower() != "good" else [])
        elif rel and rel[-1].lower() in _SPLITS:
            split = _SPLITS[rel[-1].lower()]
            cat_parts = list(rel[:-1])
        cat_parts = [p for p in cat_parts if p.lower() not in ("test_data", "train_data")]
        category = "/".join(cat_parts)
        for img in images:
            stem = img.stem
            label = table.get(stem.lower())
            if label is None or not label.is_file():
                label = _find_label(labels, stem, ("_label", "_mask", ""))
            ex = _find_label(exact, stem, ("_mask", "_label", ""))
            if label is None and weak:
                label = _find_label(weak, stem, ("_ellipse", "_label", "_mask", ""))
                ex = ex or _find_label(truth, stem, ("_mask", "_label", ""))
            elif label is None:
                label = _find_label(truth, stem, ("_mask", "_label", ""))
            if label is None:
                unlabelled.append(str(img))
                continue
            items.append(ReviewItem(str(img), str(label), str(ex) if ex else None, category, split))
    return items, unlabelled


def _items_from_loader(root: Path, loader: str) -> tuple[list[ReviewItem], list[str]]:
    """Items from ``ccad.data.layouts.load_dagm`` (ellipses as labels, ``Exact/`` masks joined
    by image) or ``load_dagm_ccad`` (re-annotated masks as labels)."""
    from ccad.data import layouts as ds

    load_dagm = getattr(ds, "load_dagm", None) if loader == "load_dagm" else None
    if load_dagm is not None:
        try:
            labelled = load_dagm(root, "all", include_defective=True)
            exact = {s.image_path: s.mask_path for s in
                     load_dagm(root, "all", include_defective=True, mask_source="exact")}
        except (ValueError, OSError, TypeError):
            labelled, exact = [], {}
        items = [ReviewItem(s.image_path, s.mask_path, exact.get(s.image_path), s.category,
                            s.split) for s in labelled if s.mask_path]
        if items:
            unl = [s.image_path for s in labelled if not s.mask_path and s.label != 0]
            return items, unl
    load_ccad = getattr(ds, "load_dagm_ccad", None) if loader == "load_dagm_ccad" else None
    if load_ccad is not None:
        try:
            samples = load_ccad(root, "test")
        except (ValueError, OSError, TypeError):
            samples = []
        return _items_from_samples(samples), []
    return [], []


@dataclass
class NormalImages:
    """The non-defective images of one DAGM class (see :func:`class_normal_images`).

    ``samples`` carry label 0 (good); ``counts`` says how many came from where, in words (e.g.
    ``{"good Train images": 36, "good Test images": 4}``, before ``limit``); ``source`` is the one
    source's words, or ``"non-defective images"`` for several; ``total`` how many there were in
    all before ``limit``.
    """

    samples: list[Any]
    source: str
    total: int
    counts: dict[str, int] = field(default_factory=dict)


def class_normal_images(root: str | os.PathLike[str], category: str,
                        limit: int | None = None) -> NormalImages:
    """Every non-defective image of DAGM class ``category`` under ``root``, to build a per-class
    bank from (the model that makes the heatmap and the proposals of that class).

    DAGM marks every defective image with a label (a ``Labels.txt`` row with flag 1 and a
    ``<stem>_label.PNG`` ellipse), so the non-defective images are the others, from every split the
    folder holds: the class's good ``Train`` images (``Labels.txt`` flag 0, or no label file), its
    good ``Test`` images, and (a loose sample such as ``classN/*.PNG`` with ``true_masks/``, which has
    no ``Labels.txt``) the images that have no label file. Each image once. ``limit`` (None: all)
    keeps that many, evenly spread over the sorted list. Defective images are never included. An
    empty :class:`NormalImages` when the folder is no DAGM layout or holds none.
    """
    from ccad.data.layouts import load_dagm
    from ccad.data.sample import LABEL_ANOMALOUS, LABEL_GOOD

    name = str(category).split("/")[0]
    picked: list[Any] = []
    seen: set[str] = set()
    counts: dict[str, int] = {}
    for split, words in (("train", "good Train images"), ("test", "good Test images"),
                         ("all", "images without a defect label")):
        try:
            samples = load_dagm(root, split, category=name, include_defective=split == "all")
        except (ValueError, OSError, TypeError):
            return NormalImages([], "", 0)
        if words.startswith("good"):
            found = [smp for smp in samples if smp.label == LABEL_GOOD]
        else:  # no Labels.txt: an image without a label file is not known to be defective
            found = [replace(smp, label=LABEL_GOOD, defect_type="good") for smp in samples
                     if smp.label != LABEL_ANOMALOUS and not smp.mask_path]
        new = []
        for smp in found:
            key = os.path.realpath(str(smp.image_path))
            if key not in seen:
                seen.add(key)
                new.append(smp)
        if new:
            counts[words] = len(new)
            picked.extend(new)
    total = len(picked)
    source = next(iter(counts)) if len(counts) == 1 else ("non-defective images" if counts else "")
    if limit is not None and total > int(limit) > 0:
        picked = [picked[i] for i in np.linspace(0, total - 1, int(limit)).round().astype(int)]
    return NormalImages(picked, source, total, counts)


def _items_from_samples(samples: Iterable[Any]) -> list[ReviewItem]:
    out: list[ReviewItem] = []
    for smp in samples:
        if isinstance(smp, ReviewItem):
            out.append(smp)
            continue
        mask_path = getattr(smp, "mask_path", None)
        if not mask_path:
            continue
        dtype = str(getattr(smp, "defect_type", "") or "")
        cat = str(getattr(smp, "category", "") or "")
        if dtype and dtype not in ("good", "defect", "unknown", "anomal"):
            cat = f"{cat}/{dtype}" if cat else dtype
        out.append(ReviewItem(str(smp.image_path), str(mask_path), None, cat,
                              str(getattr(smp, "split", "") or "")))
    return out
