"""Dataset layouts -> ``list[Sample]``, and torch-side reading that never dies on one bad file.

Loaders (each returns ``list[Sample]``, sorted, paths absolute):

* :func:`load_folder`: a plain folder of (good) images.
* :func:`load_mvtec`: MVTec AD (``<cat>/train/good``, ``<cat>/test/<type>``,
  ``<cat>/ground_truth/<type>/<stem>_mask.png``); masks sharing the image stem (anomalib) too.
* :func:`load_anomalib_folder`: anomalib's ``Folder`` layout (``good/``, ``<defect>/``,
  ``mask/<defect>/<stem>.png``), no train/test folders.
* :func:`load_csv_manifest`: a CSV with columns ``image, split, label, mask`` (+ optional
  ``category``, ``defect_type``); VisA's split CSV (``object, split, label, image, mask``) is the
  same reader (:func:`load_visa`).
* :func:`load_mvtec_loco`: MVTec LOCO AD; several masks per image (their union is the truth).
* :func:`load_mvtec3d`: MVTec 3D-AD, RGB only.
* :func:`load_dagm`: DAGM 2007 as published (``ClassN/Train|Test``, ``Label/Labels.txt``,
  ``<stem>_label.PNG`` ellipses); :func:`load_dagm_ccad`: CCAD's re-annotated layout.
* :func:`load_dataset`: auto-detects any of the above.

The CCAD paper (Sec. 4.1) trains on the good training images only and tests on the test split;
``split="train"`` therefore returns good images only for every layout (DAGM's training folders
also hold defective images: they are left out unless ``include_defective=True``).
"""

from __future__ import annotations

import csv
import functools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ccad.data.io import (
    ImageReadError,
    is_image_file,
    list_images,
    load_image,
    load_mask,
    mask_to_tensor,
    to_tensor,
)
from ccad.data.sample import LABEL_ANOMALOUS, LABEL_GOOD, LABEL_UNKNOWN, Sample

__all__ = [
    "LAYOUTS",
    "DatasetLayoutError",
    "SampleList",
    "collect_skipped",
    "unsupported_reason",
    "skipped_summary",
    "find_images",
    "load_folder",
    "load_mvtec",
    "load_anomalib_folder",
    "load_csv_manifest",
    "load_visa",
    "load_mvtec_loco",
    "load_mvtec3d",
    "load_dagm",
    "load_dagm_ccad",
    "detect_layout",
    "load_dataset",
    "load_sample_mask",
    "load_item",
    "summarize",
    "ImageDataset",
    "iter_batches",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Layout names accepted by :func:`load_dataset` (besides ``"auto"``).
LAYOUTS: tuple[str, ...] = (
    "folder", "mvtec", "anomalib_folder", "csv", "visa", "mvtec_loco", "mvtec3d", "dagm", "dagm_ccad",
)

_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "eval": "test", "testing": "test",
                  "training": "train"}
_GOOD_WORDS = {"good", "normal", "ok", "0", "false", "free", "negative", "nominal"}
_BAD_WORDS = {"anomaly", "anomalous", "bad", "defect", "defective", "ng", "1", "true", "abnormal", "positive"}
_MASK_DIR_NAMES = ("ground_truth", "gt", "mask", "masks", "ground-truth", "groundtruth")


class DatasetLayoutError(ValueError):
    """A path is not a data set this package can read (unknown layout, no images, bad CSV)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _abs(p: PathLike) -> Path:
    """``p`` made absolute WITHOUT resolving symlinks: a sample, a skipped file and every row
    that shows it are named by the path the user gave (a link's own name, never its target)."""
    return Path(os.path.abspath(os.fspath(p)))


def _norm_split(split: str | None) -> str | None:
    if split is None:
        return None
    s = str(split).strip().lower()
    return _SPLIT_ALIASES.get(s, s)


def _child(d: Path, name: str) -> Path | None:
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


def _subdirs(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))


def _looks_like_mask(p: Path) -> bool:
    stem = p.stem.lower()
    return stem.endswith("_mask") or stem.endswith("_label") or stem.endswith("_gt")


def _mask_index(d: Path | None) -> dict[str, Path]:
    """stem (without a ``_mask`` suffix) -> mask file, for a folder of masks."""
    out: dict[str, Path] = {}
    if d is None or not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        if not (p.is_file() and is_image_file(p)):
            continue
        stem = p.stem
        for suf in ("_mask", "_label", "_gt"):
            if stem.lower().endswith(suf):
                stem = stem[: -len(suf)]
                break
        # an exact-stem file wins over a suffixed one only if both exist: keep the first seen
        out.setdefault(stem, p)
    return out


def _parse_label(value: str | None, defect_type: str | None, has_mask: bool) -> int:
    v = (value or "").strip().lower()
    if v in ("-1", "unknown", "?", "none", "unlabelled", "unlabeled"):
        return LABEL_UNKNOWN
    if v in _GOOD_WORDS:
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
        return LABEL_GOOD if dt in _GOOD_WORDS else LABEL_ANOMALOUS
    if has_mask:
        return LABEL_ANOMALOUS
    return LABEL_UNKNOWN


def _images_in(d: Path) -> list[Path]:
    return [p for p in list_images(d) if not _looks_like_mask(p)]


# --------------------------------------------------------------------------------------------
# files left out for their extension (reported, never silently dropped)
# --------------------------------------------------------------------------------------------


class SampleList(list):
    """What every loader returns: a plain ``list[Sample]`` with ``skipped``, the files of the
    folders it read that it left out because their extension is not an image type
    (:data:`ccad.data.io.IMAGE_EXTENSIONS`), as sorted absolute paths. Hidden files, mask files
    (``*_mask``/``*_label``/``*_gt``) and mask folders are not listed: they are not inputs."""

    def __init__(self, items: Iterable[Any] = (), skipped: Iterable[PathLike] = ()) -> None:
        super().__init__(items)
        self.skipped: list[Path] = [Path(p) for p in skipped]


_COLLECTORS: ContextVar[tuple[list[Path], ...]] = ContextVar("ccad_unsupported_files", default=())


@contextmanager
def collect_skipped() -> Iterator[list[Path]]:
    """Collect, in the yielded list, every file with an unsupported extension that a loader
    skips inside the ``with`` block (blocks nest; each file is listed once)::

        with collect_skipped() as skipped:
            det = train_detector("data/", "run")
        print(skipped_summary(skipped))
    """
    found: list[Path] = []
    token = _COLLECTORS.set(_COLLECTORS.get() + (found,))
    try:
        yield found
    finally:
        _COLLECTORS.reset(token)


def unsupported_reason(path: PathLike) -> str:
    """``"unsupported file type .gif"`` (the reason recorded for a skipped file)."""
    suffix = Path(path).suffix.lower()
    return f"unsupported file type {suffix}" if suffix else "unsupported file type (no extension)"


def skipped_summary(paths: Sequence[PathLike], limit: int = 10) -> str:
    """One line: ``"skipped 2 file(s) with unsupported extensions: a.gif, notes.txt"`` ("" for none)."""
    if not paths:
        return ""
    names = [Path(p).name for p in paths]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"skipped {len(names)} file(s) with unsupported extensions: {', '.join(names[:limit])}{more}"


def _note_unsupported(d: Path, recursive: bool = False, as_given: bool = False) -> None:
    """Record the non-image files of ``d`` (not hidden, not masks, not in mask folders), as
    absolute paths (symlinks not resolved), or ``as_given``: ``d`` joined with the file's path
    inside it (what ``ccad predict`` shows beside the images it names the same way)."""
    collectors = _COLLECTORS.get()
    if not collectors or not d.is_dir():
        return
    found = []
    for p in d.rglob("*") if recursive else d.iterdir():
        parts = p.relative_to(d).parts
        if any(part.startswith(".") for part in parts):
            continue
        if any(part.lower() in _MASK_DIR_NAMES for part in parts[:-1]):
            continue
        if p.is_file() and not is_image_file(p) and not _looks_like_mask(p):
            found.append(p if as_given else _abs(p))
    for lst in collectors:
        seen = set(lst)
        lst.extend(q for q in sorted(found) if q not in seen)


def _read_images(d: Path, recursive: bool = False) -> list[Path]:
    """The images a loader takes from ``d`` (as :func:`_images_in`); the other files are noted
    as skipped (:func:`collect_skipped`). Detection probes use :func:`_images_in`, which notes nothing."""
    _note_unsupported(d, recursive)
    return [p for p in list_images(d, recursive=recursive) if not _looks_like_mask(p)]


def _reports_skipped(loader: Callable[..., list[Sample]]) -> Callable[..., list[Sample]]:
    """Make a loader return a :class:`SampleList` whose ``skipped`` lists what it left out."""

    @functools.wraps(loader)
    def wrapper(*args: Any, **kwargs: Any) -> list[Sample]:
        with collect_skipped() as skipped:
            samples = loader(*args, **kwargs)
        return SampleList(samples, sorted(skipped))

    return wrapper


def find_images(inputs: Iterable[PathLike]) -> tuple[list[str], list[Path]]:
    """Files to inspect from files and folders (``ccad predict``): a file is taken as given, a
    folder is searched recursively for image files. Returns ``(images, skipped)``: ``skipped``
    are the folders' files with unsupported extensions. Both are named as given (the folder as
    given joined with the path inside it; a symlink by its own name, never its target)."""
    items: list[str] = []
    with collect_skipped() as skipped:
        for p in map(Path, inputs):
            if p.is_dir():
                _note_unsupported(p, recursive=True, as_given=True)
                items.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and is_image_file(f))
            else:
                items.append(str(p))
    return items, sorted(skipped)


def _split_list(split: str) -> list[str]:
    s = _norm_split(split)
    if s == "all":
        return ["train", "validation", "test"]
    if s not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'validation', 'test' or 'all'")
    return [s]


# --------------------------------------------------------------------------------------------
# plain folder
# --------------------------------------------------------------------------------------------


@_reports_skipped
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
    files = _read_images(d, recursive=recursive)
    dt = defect_type if defect_type is not None else ("good" if label == 0 else d.name)
    return [Sample(str(_abs(p)), None, label, category, dt, _norm_split(split) or "train") for p in files]


# --------------------------------------------------------------------------------------------
# MVTec AD / anomalib MVTec-like / CCAD DAGM
# --------------------------------------------------------------------------------------------


def _is_mvtec_category(d: Path) -> bool:
    return _child(d, "train") is not None or _child(d, "test") is not None


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
    if _is_mvtec_category(root):
        cats = [root]
    else:
        cats = [c for c in _subdirs(root) if _is_mvtec_category(c)]
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
    gt_root = None
    for name in _MASK_DIR_NAMES:
        gt_root = _child(cat, name)
        if gt_root is not None:
            break
    for sp in _split_list(split):
        sd = _child(cat, sp)
        if sd is None:
            continue
        for td in _subdirs(sd):
            dtype = td.name
            good = dtype.lower() in _GOOD_WORDS
            if sp == "train" and not good:
                continue
            masks = {} if good else _mask_index(_child(gt_root, dtype) if gt_root else None)
            for p in _read_images(td):
                m = masks.get(p.stem)
                label = LABEL_GOOD if good else LABEL_ANOMALOUS
                out.append(Sample(str(_abs(p)), str(_abs(m)) if m else None, label,
                                  cat.name, "good" if good else dtype, sp))
    return out


@_reports_skipped
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


@_reports_skipped
def load_dagm_ccad(root: PathLike, split: str = "test", category: str | Sequence[str] | None = None) -> list[Sample]:
    """CCAD's re-annotated DAGM layout: ``Class1_defect/train/good``, ``test/{good,anomal}``,
    ``ground_truth/anomal/<stem>[_mask].png``. The same structure as MVTec AD (:func:`load_mvtec`).
    """
    return load_mvtec(root, split, category)


# --------------------------------------------------------------------------------------------
# anomalib Folder layout
# --------------------------------------------------------------------------------------------


def _is_anomalib_folder(d: Path) -> bool:
    for name in ("good", "normal", "ok"):
        c = _child(d, name)
        if c is not None and _images_in(c):
            return True
    return False


@_reports_skipped
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
    good_dir = next((c for c in (_child(r, n) for n in ("good", "normal", "ok")) if c is not None), None)
    if good_dir is None:
        raise DatasetLayoutError(f"'{r}' has no good/ (or normal/) folder (anomalib Folder layout)")
    mask_root = next((c for c in (_child(r, n) for n in _MASK_DIR_NAMES) if c is not None), None)
    cat = category or r.name
    splits = set(_split_list(split))
    every = max(2, int(round(1.0 / normal_test_ratio))) if normal_test_ratio > 0 else 0
    out: list[Sample] = []
    for i, p in enumerate(_read_images(good_dir)):
        sp = "test" if every and (i % every == every - 1) else "train"
        if sp in splits:
            out.append(Sample(str(_abs(p)), None, LABEL_GOOD, cat, "good", sp))
    if "test" in splits:
        skip = {good_dir.name.lower()} | {n for n in _MASK_DIR_NAMES}
        for td in _subdirs(r):
            if td.name.lower() in skip:
                continue
            imgs = _read_images(td)
            if not imgs:
                continue
            masks = _mask_index(_child(mask_root, td.name)) if mask_root else {}
            if mask_root is not None and not masks:
                masks = _mask_index(mask_root)  # flat mask folder
            for p in imgs:
                m = masks.get(p.stem)
                out.append(Sample(str(_abs(p)), str(_abs(m)) if m else None, LABEL_ANOMALOUS,
                                  cat, td.name, "test"))
    return out


# --------------------------------------------------------------------------------------------
# CSV manifests and VisA
# --------------------------------------------------------------------------------------------

_COL_ALIASES = {
    "image": ("image", "image_path", "img", "path", "filepath", "file", "filename"),
    "mask": ("mask", "mask_path", "gt", "ground_truth"),
    "split": ("split", "set", "subset"),
    "label": ("label", "target", "is_anomaly", "anomaly"),
    "category": ("category", "object", "class", "cls"),
    "defect_type": ("defect_type", "defect", "type", "anomaly_type"),
}


def _resolve(base: Path, value: str) -> Path:
    p = Path(value.strip())
    return p if p.is_absolute() else (base / p)


@_reports_skipped
def load_csv_manifest(csv_path: PathLike, split: str | None = None, root: PathLike | None = None) -> list[Sample]:
    """Samples listed in a CSV file.

    Columns (header names, case-insensitive; common aliases accepted): ``image`` (required),
    ``split``, ``label`` (0/1/-1 or good/normal/anomaly/...), ``mask`` (may be empty),
    optional ``category`` (VisA: ``object``) and ``defect_type``. Relative paths are taken from
    ``root`` if given, else from the CSV's folder; if the first listed image is not found there,
    the CSV folder's parent is tried (VisA keeps its split CSVs in ``<root>/split_csv/``).
    ``split`` keeps only matching rows (``None``: all). Without a category column the category
    is the CSV folder's name. A missing label is derived from the
    defect type (``good`` -> 0), else from the mask (present -> 1), else -1. ``split="train"``
    keeps only the good rows of the train split.
    """
    cp = Path(csv_path)
    if not cp.is_file():
        raise DatasetLayoutError(f"CSV manifest '{cp}' not found")
    try:
        with open(cp, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip().lower(): (v or "") for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetLayoutError(f"cannot parse CSV manifest '{cp}': {e}") from e
    lower = [h.lower() for h in header]
    cols: dict[str, str | None] = {}
    for key, names in _COL_ALIASES.items():
        cols[key] = next((n for n in names if n in lower), None)
    if cols["image"] is None:
        raise DatasetLayoutError(
            f"CSV manifest '{cp}' has no image column (header: {', '.join(header) or 'empty'}); "
            "expected a column named 'image'"
        )
    if root is not None:
        base = Path(root)
    else:
        base = cp.parent
        first = next((r[cols["image"]] for r in rows if r.get(cols["image"], "").strip()), None)
        if first and not Path(first).is_absolute() and not (base / first).exists() \
                and (base.parent / first.strip()).exists():
            base = base.parent
    default_category = cp.parent.name if cols["category"] is None else ""
    want = _norm_split(split)
    want_set = set(_split_list(want)) if want is not None else None

    def get(row: dict[str, str], key: str) -> str:
        c = cols[key]
        return row.get(c, "").strip() if c else ""

    out: list[Sample] = []
    for n, row in enumerate(rows, start=2):
        img = get(row, "image")
        if not img:
            continue
        sp = _norm_split(get(row, "split")) or (want if want and want != "all" else "test")
        if want_set is not None and sp not in want_set:
            continue
        mask = get(row, "mask")
        dt = get(row, "defect_type")
        try:
            label = _parse_label(get(row, "label") if cols["label"] else None, dt, bool(mask))
        except ValueError as e:
            raise DatasetLayoutError(f"'{cp}', line {n}: {e}") from None
        if not dt:
            dt = "good" if label == LABEL_GOOD else ("anomaly" if label == LABEL_ANOMALOUS else "unknown")
        if sp == "train" and label != LABEL_GOOD:
            continue
        mp = str(_abs(_resolve(base, mask))) if mask else None
        cat = get(row, "category") or default_category
        out.append(Sample(str(_abs(_resolve(base, img))), mp, label, cat, dt, sp))
    return out


@_reports_skipped
def load_visa(root: PathLike, split_csv: PathLike | None = None, split: str = "test") -> list[Sample]:
    """VisA: its split CSV (``object, split, label, image, mask``; label ``normal``/``anomaly``),
    paths relative to the VisA root. ``split_csv`` defaults to ``<root>/split_csv/1cls.csv``;
    a relative ``split_csv`` is taken from ``root``.
    """
    r = Path(root)
    if split_csv is None:
        cands = sorted((r / "split_csv").glob("*.csv")) if (r / "split_csv").is_dir() else []
        pref = [c for c in cands if c.name == "1cls.csv"]
        if not (pref or cands):
            raise DatasetLayoutError(f"no VisA split CSV found in '{r / 'split_csv'}'")
        split_csv = (pref or cands)[0]
    sc = Path(split_csv)
    if not sc.is_absolute() and not sc.exists():
        sc = r / sc
    return load_csv_manifest(sc, split, root=r)


# --------------------------------------------------------------------------------------------
# MVTec LOCO and MVTec 3D-AD
# --------------------------------------------------------------------------------------------


def _is_loco_category(d: Path) -> bool:
    t = _child(d, "test")
    return t is not None and any(_child(t, name) is not None for name in ("logical_anomalies", "structural_anomalies"))


@_reports_skipped
def load_mvtec_loco(root: PathLike, split: str = "test", category: str | Sequence[str] | None = None) -> list[Sample]:
    """MVTec LOCO AD: ``<cat>/{train,validation}/good``, ``test/{good,logical_anomalies,
    structural_anomalies}``, masks ``ground_truth/<type>/<stem>/000.png, 001.png, ...`` (several
    per image; the ground truth is their union, see :func:`load_sample_mask`).
    """
    r = Path(root)
    cats = [r] if _is_loco_category(r) else [c for c in _subdirs(r) if _is_loco_category(c)]
    cats = _filter_categories(cats, category, r, "MVTec LOCO")
    out: list[Sample] = []
    for cat in cats:
        gt = _child(cat, "ground_truth")
        for sp in _split_list(split):
            sd = _child(cat, sp)
            if sd is None:
                continue
            for td in _subdirs(sd):
                good = td.name.lower() == "good"
                if sp != "test" and not good:
                    continue
                for p in _read_images(td):
                    masks: list[Path] = []
                    if not good and gt is not None:
                        md = _child(gt, td.name)
                        if md is not None and (md / p.stem).is_dir():
                            masks = [q for q in list_images(md / p.stem)]
                    mp = str(_abs(masks[0])) if masks else None
                    extra = tuple(str(_abs(q)) for q in masks[1:])
                    out.append(Sample(str(_abs(p)), mp, LABEL_GOOD if good else LABEL_ANOMALOUS,
                                      cat.name, "good" if good else td.name, sp, extra))
    return out


def _is_mvtec3d_category(d: Path) -> bool:
    for sp in ("train", "test", "validation"):
        sd = _child(d, sp)
        if sd is not None and any(_child(td, "rgb") is not None for td in _subdirs(sd)):
            return True
    return False


@_reports_skipped
def load_mvtec3d(root: PathLike, split: str = "test", category: str | Sequence[str] | None = None) -> list[Sample]:
    """MVTec 3D-AD, RGB only: ``<cat>/{train,validation,test}/<type>/rgb/*.png`` with masks in
    ``<cat>/<split>/<type>/gt/<stem>.png`` (the ``xyz`` point clouds are ignored).
    """
    r = Path(root)
    cats = [r] if _is_mvtec3d_category(r) else [c for c in _subdirs(r) if _is_mvtec3d_category(c)]
    cats = _filter_categories(cats, category, r, "MVTec 3D-AD")
    out: list[Sample] = []
    for cat in cats:
        for sp in _split_list(split):
            sd = _child(cat, sp)
            if sd is None:
                continue
            for td in _subdirs(sd):
                rgb = _child(td, "rgb")
                if rgb is None:
                    continue
                good = td.name.lower() == "good"
                if sp != "test" and not good:
                    continue
                masks = {} if good else _mask_index(_child(td, "gt"))
                for p in _read_images(rgb):
                    m = masks.get(p.stem)
                    out.append(Sample(str(_abs(p)), str(_abs(m)) if m else None,
                                      LABEL_GOOD if good else LABEL_ANOMALOUS, cat.name,
                                      "good" if good else td.name, sp))
    return out


# --------------------------------------------------------------------------------------------
# DAGM 2007 (published layout)
# --------------------------------------------------------------------------------------------


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
    label_dir = _child(folder, "Label") or _child(folder, "true_masks")
    labels_txt = None
    if label_dir is not None:
        for c in label_dir.iterdir():
            if c.is_file() and c.name.lower() == "labels.txt":
                labels_txt = c
    table = _read_dagm_labels(labels_txt) if labels_txt else {}
    label_files = _mask_index(label_dir)
    exact = _mask_index(_child(folder, "Exact"))
    out: list[Sample] = []
    for p in _read_images(folder):
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
        out.append(Sample(str(_abs(p)), str(_abs(m)) if m else None, label, category,
                          "good" if label == LABEL_GOOD else ("defect" if label == LABEL_ANOMALOUS else "unknown"),
                          split))
    return out


def _is_dagm_class(d: Path) -> bool:
    return any(_child(d, s) is not None and _child(_child(d, s), "Label") is not None  # type: ignore[arg-type]
               for s in ("Train", "Test"))


def _is_dagm_loose(d: Path) -> bool:
    return _child(d, "true_masks") is not None and bool(_images_in(d))


@_reports_skipped
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
    if _is_dagm_class(r) or _is_dagm_loose(r):
        classes = [r]
    else:
        classes = [c for c in _subdirs(r) if _is_dagm_class(c) or _is_dagm_loose(c)]
        if not classes:  # e.g. dagm-sample/ -> test_data/classN
            for c in _subdirs(r):
                classes.extend(cc for cc in _subdirs(c) if _is_dagm_class(cc) or _is_dagm_loose(cc))
    if category is not None:
        wanted = {category} if isinstance(category, str) else set(category)
        classes = [c for c in classes if c.name in wanted]
        if not classes:
            raise DatasetLayoutError(f"class {sorted(wanted)[0]!r} not found in '{r}' (DAGM layout)")
    out: list[Sample] = []
    for cls in classes:
        for sp in _split_list(split):
            if _is_dagm_loose(cls) and not _is_dagm_class(cls):
                if sp == "test":
                    out.extend(_dagm_folder(cls, sp, cls.name, include_defective, mask_source))
                continue
            name = {"train": "Train", "test": "Test", "validation": "Validation"}[sp]
            folder = _child(cls, name)
            if folder is not None:
                out.extend(_dagm_folder(folder, sp, cls.name, include_defective, mask_source))
    return out


# --------------------------------------------------------------------------------------------
# auto-detection
# --------------------------------------------------------------------------------------------


def _manifest_csvs(d: Path) -> list[Path]:
    out = []
    for c in sorted(d.glob("*.csv")):
        try:
            with open(c, newline="", encoding="utf-8-sig") as f:
                head = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        if any(h.strip().lower() in _COL_ALIASES["image"] for h in head):
            out.append(c)
    return out


def detect_layout(path: PathLike) -> str:
    """Name of the layout at ``path`` (one of :data:`LAYOUTS`); raises DatasetLayoutError."""
    p = Path(path)
    if not p.exists():
        raise DatasetLayoutError(f"dataset path '{p}' does not exist")
    if p.is_file():
        if p.suffix.lower() == ".csv":
            with open(p, newline="", encoding="utf-8-sig") as f:
                head = [h.strip().lower() for h in next(csv.reader(f), [])]
            return "visa" if "object" in head else "csv"
        raise DatasetLayoutError(f"'{p}' is a file, not a dataset folder or a CSV manifest")
    kids = _subdirs(p)
    if _is_dagm_class(p) or any(_is_dagm_class(c) for c in kids) or _is_dagm_loose(p) \
            or any(_is_dagm_loose(c) for c in kids) \
            or any(_is_dagm_loose(cc) for c in kids for cc in _subdirs(c)):
        return "dagm"
    if _is_loco_category(p) or any(_is_loco_category(c) for c in kids):
        return "mvtec_loco"
    if _is_mvtec3d_category(p) or any(_is_mvtec3d_category(c) for c in kids):
        return "mvtec3d"
    if _is_mvtec_category(p) or any(_is_mvtec_category(c) for c in kids):
        cats = [p] if _is_mvtec_category(p) else [c for c in kids if _is_mvtec_category(c)]
        test = _child(cats[0], "test")
        if test is not None and _child(test, "anomal") is not None:
            return "dagm_ccad"
        return "mvtec"
    if (p / "split_csv").is_dir() and list((p / "split_csv").glob("*.csv")):
        return "visa"
    if _manifest_csvs(p):
        return "csv"
    if _is_anomalib_folder(p):
        return "anomalib_folder"
    if _images_in(p):
        return "folder"
    with collect_skipped() as skipped:
        _note_unsupported(p)
    raise DatasetLayoutError(
        f"cannot recognise a dataset layout in '{p}': no images directly inside and none of the "
        "known layouts (MVTec AD train/test, anomalib good/<defect>, CSV manifest, VisA split_csv, "
        "MVTec LOCO, MVTec 3D-AD rgb/, DAGM ClassN/Train|Test/Label) was found"
        + (f"; {skipped_summary(skipped)}" if skipped else "")
    )


@_reports_skipped
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
    if lay == "folder":
        samples = load_folder(p, split=split if _norm_split(split) != "all" else "train", **kwargs)
    elif lay == "mvtec":
        samples = load_mvtec(p, split, **kwargs)
    elif lay == "dagm_ccad":
        samples = load_dagm_ccad(p, split, **kwargs)
    elif lay == "anomalib_folder":
        samples = load_anomalib_folder(p, split, **kwargs)
    elif lay == "csv":
        csvp = p if p.is_file() else _manifest_csvs(p)[0] if _manifest_csvs(p) else None
        if csvp is None:
            raise DatasetLayoutError(f"no CSV manifest with an 'image' column in '{p}'")
        samples = load_csv_manifest(csvp, None if _norm_split(split) == "all" else split, **kwargs)
    elif lay == "visa":
        if p.is_file():
            samples = load_csv_manifest(p, None if _norm_split(split) == "all" else split, **kwargs)
        else:
            samples = load_visa(p, None, split, **kwargs)
    elif lay == "mvtec_loco":
        samples = load_mvtec_loco(p, split, **kwargs)
    elif lay == "mvtec3d":
        samples = load_mvtec3d(p, split, **kwargs)
    else:
        samples = load_dagm(p, split, **kwargs)
    if not samples:
        why = skipped_summary(getattr(samples, "skipped", []))
        raise DatasetLayoutError(f"no images found in '{p}' (layout {lay}, split {split!r})"
                                 + (f"; {why}" if why else ""))
    return samples


def summarize(samples: Iterable[Sample]) -> dict[str, Any]:
    """Counts for display: total, per split, per label (good/anomalous/unknown), per category and
    defect type, and how many anomalous samples have masks."""
    s = list(samples)
    def count(key: Callable[[Sample], str]) -> dict[str, int]:
        d: dict[str, int] = {}
        for x in s:
            d[key(x)] = d.get(key(x), 0) + 1
        return dict(sorted(d.items()))
    names = {LABEL_GOOD: "good", LABEL_ANOMALOUS: "anomalous", LABEL_UNKNOWN: "unknown"}
    return dict(
        n=len(s), splits=count(lambda x: x.split), labels=count(lambda x: names[x.label]),
        categories=count(lambda x: x.category), defect_types=count(lambda x: x.defect_type),
        anomalous_with_mask=sum(1 for x in s if x.label == LABEL_ANOMALOUS and x.has_mask),
    )


# --------------------------------------------------------------------------------------------
# reading samples as tensors
# --------------------------------------------------------------------------------------------


def load_sample_mask(sample: Sample, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The sample's ground truth ``H x W`` {0,1} mask: the union of all its mask files, resized
    (nearest) to ``shape`` when given; ``None`` when it has no mask."""
    paths = sample.mask_paths()
    if not paths:
        return None
    m = load_mask(paths[0], shape)
    for q in paths[1:]:
        m = np.maximum(m, load_mask(q, m.shape))
    return m


def load_item(sample: Sample, image_size: int | tuple[int, int]) -> dict[str, Any]:
    """Read one sample as the dict :class:`ImageDataset` yields; raises ImageReadError."""
    img = load_image(sample.image_path)
    h, w = img.shape[:2]
    mask = load_sample_mask(sample, (h, w))
    return dict(
        image=to_tensor(img, image_size),
        mask=mask_to_tensor(mask, image_size),
        label=int(sample.label),
        path=sample.image_path,
        category=sample.category,
        defect_type=sample.defect_type,
        original_size=(h, w),
    )


class ImageDataset(Dataset):
    """``torch`` dataset over samples: images resized to ``image_size``, masks (zeros if none).

    Item: ``dict(image=3xSxS, mask=1xSxS, label, path, category, defect_type, original_size)``.
    ``on_error="raise"`` propagates :class:`ImageReadError`; ``on_error="skip"`` records
    ``(path, reason)`` in :attr:`errors` and returns the next readable sample instead (wrapping
    around), so that one corrupt file never stops a run. (With DataLoader worker processes the
    record stays in the workers; use :func:`iter_batches` when the report matters.)
    """

    def __init__(self, samples: Sequence[Sample], image_size: int | tuple[int, int] = 256,
                 on_error: str = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.samples = list(samples)
        self.image_size = image_size
        self.on_error = on_error
        self.errors: list[tuple[str, str]] = []
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _record(self, i: int, e: ImageReadError) -> None:
        if i not in self._bad:
            self._bad.add(i)
            self.errors.append((e.path, e.reason))

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if n == 0:
            raise IndexError("empty ImageDataset")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                return load_item(self.samples[i], self.image_size)
            except ImageReadError as e:
                if self.on_error == "raise":
                    raise
                self._record(i, e)
        raise RuntimeError(
            f"none of the {n} images could be read; first errors: "
            + "; ".join(f"{p}: {r}" for p, r in self.errors[:3])
        )


def _collate(items: list[dict[str, Any]], indices: list[int], errors: list[tuple[str, str]]) -> dict[str, Any]:
    return dict(
        image=torch.stack([it["image"] for it in items]),
        mask=torch.stack([it["mask"] for it in items]),
        label=torch.tensor([it["label"] for it in items], dtype=torch.long),
        path=[it["path"] for it in items],
        category=[it["category"] for it in items],
        defect_type=[it["defect_type"] for it in items],
        original_size=[it["original_size"] for it in items],
        index=indices,
        errors=errors,
    )


def iter_batches(samples: Sequence[Sample], image_size: int | tuple[int, int] = 256, batch_size: int = 8,
                 on_error: str = "skip", errors: list[tuple[str, str]] | None = None,
                 num_workers: int = 0) -> Iterator[dict[str, Any]]:
    """Batches of readable samples for bank building and scoring; never dies on one bad file.

    Yields dicts with ``image`` (B x 3 x S x S), ``mask`` (B x 1 x S x S), ``label`` (LongTensor
    B), lists ``path``, ``category``, ``defect_type``, ``original_size`` and ``index`` (positions
    in ``samples``), and ``errors``: the ``(path, reason)`` pairs skipped while filling this batch.
    Every error is also appended to ``errors`` when a list is passed. Batches hold ``batch_size``
    readable images (the last may be smaller); a batch is not yielded empty. ``num_workers > 0``
    decodes with that many threads (OpenCV releases the GIL). ``on_error="raise"`` re-raises.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = list(samples)

    def load(i: int) -> tuple[int, dict[str, Any] | None, tuple[str, str] | None]:
        try:
            return i, load_item(samples[i], image_size), None
        except ImageReadError as e:
            if on_error == "raise":
                raise
            return i, None, (e.path, e.reason)

    def results() -> Iterator[tuple[int, dict[str, Any] | None, tuple[str, str] | None]]:
        if num_workers > 0:
            # a bounded window of pending reads keeps memory independent of the data set size
            window = max(batch_size, 2 * num_workers)
            with ThreadPoolExecutor(max_workers=num_workers) as ex:
                pending: deque = deque()
                nxt = 0
                while nxt < len(samples) or pending:
                    while nxt < len(samples) and len(pending) < window:
                        pending.append(ex.submit(load, nxt))
                        nxt += 1
                    yield pending.popleft().result()
        else:
            for i in range(len(samples)):
                yield load(i)

    items: list[dict[str, Any]] = []
    idx: list[int] = []
    errs: list[tuple[str, str]] = []
    for i, item, err in results():
        if err is not None:
            errs.append(err)
            if errors is not None:
                errors.append(err)
            continue
        assert item is not None
        items.append(item)
        idx.append(i)
        if len(items) == batch_size:
            yield _collate(items, idx, errs)
            items, idx, errs = [], [], []
    if items:
        yield _collate(items, idx, errs)
