"""DAGM 2007 as published: ``ClassN/{Train,Test}/*.PNG`` with ``Label/Labels.txt`` and the
coarse ellipse weak labels ``Label/<stem>_label.PNG`` (CCAD's re-annotated DAGM layout is
MVTec-shaped: :func:`ccad.data.layouts.mvtec.load_dagm_ccad`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ccad.data.io import is_image_file
from ccad.data.sample import LABEL_ANOMALOUS, LABEL_GOOD, LABEL_UNKNOWN, Sample
from ccad.data.skips import read_images, reports_skipped
from ccad.data.tree import (
    DatasetLayoutError,
    PathLike,
    abs_path,
    categories,
    child,
    first_child,
    images_in,
    mask_index,
    opt_abs,
    split_list,
    subdirs,
)

__all__ = ["load_dagm", "is_dagm", "is_dagm_class", "is_dagm_loose"]


def _read_dagm_labels(path: Path) -> dict[str, tuple[int, str | None]]:
    """``Labels.txt`` -> {image file name: (label, label file or None)}.

    Rows are ``index flag filename labelflag labelfile`` after a one-line header; an image is
    defective when its flag or label flag is 1 (or it names a label file).
    """
    out: dict[str, tuple[int, str | None]] = {}
    for line in path.read_text(errors="replace").splitlines():
        f = line.split()
        if len(f) < 3 or not is_image_file(f[2]):
            continue  # the header line or garbage
        flag = f[1] == "1"
        lflag = len(f) > 3 and f[3] == "1"
        lfile = f[4] if len(f) > 4 and f[4] not in ("0", "-") else None
        out[f[2]] = (LABEL_ANOMALOUS if (flag or lflag or lfile) else LABEL_GOOD, lfile)
    return out


def _dagm_folder(folder: Path, split: str, category: str, include_defective: bool,
                 mask_source: str) -> list[Sample]:
    label_dir = first_child(folder, ("Label", "true_masks"))
    labels_txt = None
    if label_dir is not None:
        for c in label_dir.iterdir():
            if c.is_file() and c.name.lower() == "labels.txt":
                labels_txt = c
    table = _read_dagm_labels(labels_txt) if labels_txt else {}
    label_files = mask_index(label_dir)
    exact = mask_index(child(folder, "Exact"))
    out: list[Sample] = []
    for p in read_images(folder):
        if p.name in table:
            label, lfile = table[p.name]
            lpath = (label_dir / lfile) if (lfile and label_dir is not None) else label_files.get(p.stem)
        else:
            lpath = label_files.get(p.stem)
            if lpath is not None:
                label = LABEL_ANOMALOUS
            else:
                # without Labels.txt, an unlisted image is unlabelled, not known-good
                label = LABEL_GOOD if labels_txt is not None else LABEL_UNKNOWN
        if split == "train" and label != LABEL_GOOD and not include_defective:
            continue
        if mask_source == "exact":
            m = exact.get(p.stem)
        else:
            m = lpath if (lpath is not None and lpath.is_file()) else None
        out.append(Sample(str(abs_path(p)), opt_abs(m), label, category,
                          "good" if label == LABEL_GOOD else ("defect" if label == LABEL_ANOMALOUS else "unknown"),
                          split))
    return out


def is_dagm_class(d: Path) -> bool:
    """``d`` is a published DAGM class folder: ``Train/`` or ``Test/`` with a ``Label/`` folder."""
    return any(child(d, s) is not None and child(child(d, s), "Label") is not None  # type: ignore[arg-type]
               for s in ("Train", "Test"))


def is_dagm_loose(d: Path) -> bool:
    """``d`` is a loose DAGM sample: images beside a ``true_masks/`` folder."""
    return child(d, "true_masks") is not None and bool(images_in(d))


def is_dagm(d: Path) -> bool:
    """``d`` is a DAGM class folder, published (:func:`is_dagm_class`) or loose (:func:`is_dagm_loose`)."""
    return is_dagm_class(d) or is_dagm_loose(d)


@reports_skipped
def load_dagm(root: PathLike, split: str = "test", category: str | Sequence[str] | None = None,
              include_defective: bool = False, mask_source: str = "label") -> list[Sample]:
    """DAGM 2007 as published: ``ClassN/{Train,Test}/*.PNG`` with ``Label/Labels.txt`` and
    ``Label/<stem>_label.PNG`` (the coarse ellipse weak labels).

    ``root`` is the data set folder (holding ``Class1`` ...) or one class folder. Train folders
    of DAGM hold defective images too; ``split="train"`` keeps only the good ones unless
    ``include_defective=True``. ``mask_source="exact"`` takes masks from ``Exact/<stem>_mask.PNG``
    (written by :func:`ccad.data.synthetic.write_dataset`) instead of the ellipses. A class folder
    with images and a ``true_masks/`` folder (a loose sample) also reads: labelled images are
    anomalous, the others unknown (-1).
    """
    r = Path(root)
    if mask_source not in ("label", "exact"):
        raise ValueError(f"mask_source must be 'label' or 'exact', got {mask_source!r}")
    # a class folder, a folder of classes, or one level deeper (e.g. dagm-sample/ -> test_data/classN)
    classes = categories(r, is_dagm) or [cc for c in subdirs(r) for cc in subdirs(c) if is_dagm(cc)]
    if category is not None:
        wanted = {category} if isinstance(category, str) else set(category)
        classes = [c for c in classes if c.name in wanted]
        if not classes:
            raise DatasetLayoutError(f"class {sorted(wanted)[0]!r} not found in '{r}' (DAGM layout)")
    out: list[Sample] = []
    for cls in classes:
        for sp in split_list(split):
            if is_dagm_loose(cls) and not is_dagm_class(cls):
                if sp == "test":
                    out.extend(_dagm_folder(cls, sp, cls.name, include_defective, mask_source))
                continue
            name = {"train": "Train", "test": "Test", "validation": "Validation"}[sp]
            folder = child(cls, name)
            if folder is not None:
                out.extend(_dagm_folder(folder, sp, cls.name, include_defective, mask_source))
    return out
