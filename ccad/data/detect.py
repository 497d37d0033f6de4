"""Which dataset layout a path holds (:func:`detect_layout`), and loading any path by its
layout (:func:`load_dataset`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccad.data.layouts import dagm, folder, manifest, mvtec
from ccad.data.sample import Sample
from ccad.data.skips import collect_skipped, note_unsupported, reports_skipped, skipped_summary
from ccad.data.tree import DatasetLayoutError, PathLike, categories, child, images_in, norm_split, subdirs

__all__ = ["LAYOUTS", "detect_layout", "load_dataset"]

#: Layout names accepted by :func:`load_dataset` (besides ``"auto"``).
LAYOUTS: tuple[str, ...] = (
    "folder", "mvtec", "anomalib_folder", "csv", "visa", "mvtec_loco", "mvtec3d", "dagm", "dagm_ccad",
)


def detect_layout(path: PathLike) -> str:
    """Name of the layout at ``path`` (one of :data:`LAYOUTS`); raises DatasetLayoutError."""
    p = Path(path)
    if not p.exists():
        raise DatasetLayoutError(f"dataset path '{p}' does not exist")
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "visa" if "object" in manifest.csv_header(p) else "csv"
        raise DatasetLayoutError(f"'{p}' is a file, not a dataset folder or a CSV manifest")
    kids = subdirs(p)
    # a probe names a category folder: the layout holds when ``p`` is one or holds one (categories)
    if categories(p, dagm.is_dagm) or any(dagm.is_dagm_loose(cc) for c in kids for cc in subdirs(c)):
        return "dagm"
    if categories(p, mvtec.is_loco_category):
        return "mvtec_loco"
    if categories(p, mvtec.is_mvtec3d_category):
        return "mvtec3d"
    cats = categories(p, mvtec.is_mvtec_category)
    if cats:
        test = child(cats[0], "test")
        if test is not None and child(test, "anomal") is not None:
            return "dagm_ccad"
        return "mvtec"
    if (p / "split_csv").is_dir() and list((p / "split_csv").glob("*.csv")):
        return "visa"
    if manifest.manifest_csvs(p):
        return "csv"
    if folder.is_anomalib_folder(p):
        return "anomalib_folder"
    if images_in(p):
        return "folder"
    with collect_skipped() as skipped:
        note_unsupported(p)
    raise DatasetLayoutError(
        f"cannot recognise a dataset layout in '{p}': no images directly inside and none of the "
        "known layouts (MVTec AD train/test, anomalib good/<defect>, CSV manifest, VisA split_csv, "
        "MVTec LOCO, MVTec 3D-AD rgb/, DAGM ClassN/Train|Test/Label) was found"
        + (f"; {skipped_summary(skipped)}" if skipped else "")
    )


@reports_skipped
def load_dataset(path: PathLike, split: str = "test", layout: str = "auto", **kwargs: Any) -> list[Sample]:
    """Load any supported data set as ``list[Sample]``.

    ``layout="auto"`` detects it (:func:`detect_layout`); otherwise one of :data:`LAYOUTS`.
    ``kwargs`` go to the specific loader (e.g. ``category=``). For a plain folder every image is
    returned as good (label 0) whatever the split. Raises :class:`DatasetLayoutError` naming the
    path when the layout is unknown or no image is found for the split.
    """
    p = Path(path)
    lay = detect_layout(p) if layout == "auto" else layout
    if lay not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use 'auto' or one of {', '.join(LAYOUTS)}")
    if not p.exists():
        raise DatasetLayoutError(f"dataset path '{p}' does not exist")
    every = norm_split(split) == "all"
    if lay == "folder":
        samples = folder.load_folder(p, split="train" if every else split, **kwargs)
    elif lay == "csv" or (lay == "visa" and p.is_file()):
        csvs = [p] if p.is_file() else manifest.manifest_csvs(p)
        if not csvs:
            raise DatasetLayoutError(f"no CSV manifest with an 'image' column in '{p}'")
        samples = manifest.load_csv_manifest(csvs[0], None if every else split, **kwargs)
    elif lay == "visa":
        samples = manifest.load_visa(p, None, split, **kwargs)
    else:
        loader = {"mvtec": mvtec.load_mvtec, "dagm_ccad": mvtec.load_dagm_ccad, "mvtec_loco": mvtec.load_mvtec_loco,
                  "mvtec3d": mvtec.load_mvtec3d, "anomalib_folder": folder.load_anomalib_folder,
                  "dagm": dagm.load_dagm}[lay]
        samples = loader(p, split, **kwargs)
    if not samples:
        why = skipped_summary(getattr(samples, "skipped", []))
        raise DatasetLayoutError(f"no images found in '{p}' (layout {lay}, split {split!r})"
                                 + (f"; {why}" if why else ""))
    return samples
