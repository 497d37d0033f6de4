"""CSV manifests (``image, split, label, mask`` [+ ``category``, ``defect_type``]) and VisA,
whose split CSV (``object, split, label, image, mask``) the same reader takes."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image

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


def _decode(cp: Path, data: bytes) -> str:
    """The CSV's text (UTF-8, with or without a BOM); a byte that is not UTF-8 is a
    :class:`DatasetLayoutError` naming the file, the line and the column it is in."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        data, start = bytes(e.object), e.start  # (the bytes after a BOM, as the codec saw them)
        line_start = data.rfind(b"\n", 0, start) + 1
        line_no = data.count(b"\n", 0, start) + 1
        header = next(csv.reader([data.split(b"\n", 1)[0].decode("latin-1")]), [])
        before = data[line_start:start].decode("latin-1")
        field = len(next(csv.reader([before]), [""])) - 1 if before else 0
        col = header[field].strip() if line_no > 1 and field < len(header) else None
        where = f"line {line_no}" + (f", column '{col}'" if col else f", field {field + 1}")
        raise DatasetLayoutError(
            f"'{cp}', {where}: not UTF-8 text (byte 0x{data[start]:02x}); save the CSV as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8)") from None


def csv_header(path: Path) -> list[str]:
    """The first row of a CSV file, stripped and lower-cased (``[]`` for an empty file); a header
    that is not UTF-8 is a :class:`DatasetLayoutError` naming the file."""
    with open(path, "rb") as f:
        first = f.readline()
    return [h.strip().lower() for h in next(csv.reader([_decode(Path(path), first)]), [])]


def manifest_csvs(d: Path) -> list[Path]:
    """The CSV files directly in ``d`` whose header names an image column (sorted)."""
    out = []
    for c in sorted(d.glob("*.csv")):
        try:
            head = csv_header(c)
        except (OSError, DatasetLayoutError, csv.Error):
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
        text = _decode(cp, cp.read_bytes())
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip().lower(): (v or "") for k, v in row.items()} for row in reader]
    except csv.Error as e:
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
    if cols["label"] is None:  # never guessed: a missing column would make every row "unknown" or "good"
        raise DatasetLayoutError(
            f"CSV manifest '{cp}' has no label column (header: {', '.join(header)}); add a column 'label' "
            "(0 or good, 1 or anomaly, -1 for unknown)")
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
        if mp is not None:
            _check_mask(cp, n, cols, _resolve(base, img), Path(mp), label)
        cat = get(row, "category") or default_category
        out.append(Sample(str(abs_path(_resolve(base, img))), mp, label, cat, dt, sp))
    return out


def _check_mask(cp: Path, line: int, cols: dict[str, str | None], image: Path, mask: Path, label: int) -> None:
    """Refuse a row whose mask cannot be this image's: a size other than the image's (it would be
    stretched onto it), or defect pixels on an image labelled good. Sizes come from the file
    headers; a mask is decoded only for a good row. Missing or unreadable files are left to
    the reader (which names them) so that one bad file never stops the others."""
    from ccad.data.io import ImageReadError, load_mask

    where = f"'{cp}', line {line}, column '{cols['mask']}'"
    if label == LABEL_GOOD:
        try:
            defect = float(load_mask(mask).sum())
        except ImageReadError:
            return
        if defect > 0:
            raise DatasetLayoutError(
                f"{where}: the mask {mask.name} marks {int(defect)} defect pixel(s) but column "
                f"'{cols['label']}' says the image is good (0): fix the label or the mask")
    sizes = []
    for p in (image, mask):
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
        except Exception:  # noqa: BLE001 - unreadable: the reader names it later
            return
    if sizes[0] != sizes[1]:
        (iw, ih), (mw, mh) = sizes
        raise DatasetLayoutError(
            f"{where}: the mask {mask.name} is {mw}x{mh} but its image {image.name} is {iw}x{ih}: a mask "
            "must have its image's size (it would be stretched onto it)")


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
