"""CSV manifests (``image, split, label, mask`` [+ ``category``, ``defect_type``]) and VisA,
whose split CSV (``object, split, label, image, mask``) the same reader takes."""

from __future__ import annotations

import csv
from pathlib import Path

from ccad.data.sample import LABEL_ANOMALOUS, LABEL_GOOD, Sample
from ccad.data.skips import reports_skipped
from ccad.data.tree import DatasetLayoutError, PathLike, abs_path, norm_split, parse_label, split_list

__all__ = ["load_csv_manifest", "load_visa", "csv_header", "manifest_csvs"]

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


def csv_header(path: Path) -> list[str]:
    """The first row of a CSV file, stripped and lower-cased (``[]`` for an empty file)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [h.strip().lower() for h in next(csv.reader(f), [])]


def manifest_csvs(d: Path) -> list[Path]:
    """The CSV files directly in ``d`` whose header names an image column (sorted)."""
    out = []
    for c in sorted(d.glob("*.csv")):
        try:
            head = csv_header(c)
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        if any(h in _COL_ALIASES["image"] for h in head):
            out.append(c)
    return out


@reports_skipped
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
    want = norm_split(split)
    want_set = set(split_list(want)) if want is not None else None

    def get(row: dict[str, str], key: str) -> str:
        c = cols[key]
        return row.get(c, "").strip() if c else ""

    out: list[Sample] = []
    for n, row in enumerate(rows, start=2):
        img = get(row, "image")
        if not img:
            continue
        sp = norm_split(get(row, "split")) or (want if want and want != "all" else "test")
        if want_set is not None and sp not in want_set:
            continue
        mask = get(row, "mask")
        dt = get(row, "defect_type")
        try:
            label = parse_label(get(row, "label") if cols["label"] else None, dt, bool(mask))
        except ValueError as e:
            raise DatasetLayoutError(f"'{cp}', line {n}: {e}") from None
        if not dt:
            dt = "good" if label == LABEL_GOOD else ("anomaly" if label == LABEL_ANOMALOUS else "unknown")
        if sp == "train" and label != LABEL_GOOD:
            continue
        mp = str(abs_path(_resolve(base, mask))) if mask else None
        cat = get(row, "category") or default_category
        out.append(Sample(str(abs_path(_resolve(base, img))), mp, label, cat, dt, sp))
    return out


@reports_skipped
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
