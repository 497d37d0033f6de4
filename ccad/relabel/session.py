"""The review session: a list of DAGM items whose accept / reject / edit decisions are kept on
disk after every action (``decisions.json`` and the decided masks, atomic writes) and exported
as binary PNG masks plus ``decisions.csv``."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .discovery import ReviewItem, _items_from_loader, _items_from_samples, discover_items
from .masks import atomic_write_bytes, mask_iou, read_image, read_mask, write_mask_png
from .proposals import ProposalSettings, propose_mask

__all__ = ["ReviewSession"]

_DECISIONS = ("accepted", "rejected", "edited")


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", key)


def _relative_to(path: str, base: Path | None) -> str:
    """``path`` relative to ``base`` in ``/`` form (both resolved, so symlinks and ``..`` agree);
    ``path`` itself when it is not inside ``base``."""
    if base is None:
        return Path(path).as_posix()
    p, b = Path(path), Path(base)
    for pp, bb in ((p, b), (p.resolve(), b.resolve())):
        try:
            return pp.relative_to(bb).as_posix()
        except ValueError:
            continue
    return p.as_posix()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ReviewSession:
    """A reviewable list of DAGM items with decisions persisted to ``store_dir``.

    ``root_or_samples`` is a folder (any layout :func:`discover_items` or the ``ccad.data``
    DAGM loaders read) or a sequence of ``ReviewItem`` / ``ccad.data.Sample`` (those with a
    ``mask_path``, taken as the weak label). Every accept / reject / edit rewrites
    ``store_dir/decisions.json`` atomically (temp file + ``os.replace``) and stores the decided
    mask in ``store_dir/masks/``; a new session on the same ``store_dir`` resumes at the saved
    position with all decisions. ``anomaly_map_fn(image) -> H x W map`` (e.g. a detector's
    ``predict(image).anomaly_map``) feeds :func:`propose_mask`; without it proposals use the
    image cue only.
    """

    STORE_VERSION = 1

    def __init__(self, root_or_samples: str | os.PathLike[str] | Sequence[Any],
                 store_dir: str | os.PathLike[str],
                 anomaly_map_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                 settings: ProposalSettings | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.anomaly_map_fn = anomaly_map_fn
        self.settings = settings or ProposalSettings()
        self.unlabelled: list[str] = []
        if isinstance(root_or_samples, (str, os.PathLike)):
            self.root: Path | None = Path(root_or_samples)
            if not self.root.is_dir():
                raise FileNotFoundError(f"DAGM folder not found: {self.root}")
            items, self.unlabelled = _items_from_loader(self.root, "load_dagm")
            if not items:  # MVTec-style weak_labels, flat folders, ...
                items, self.unlabelled = discover_items(self.root)
            if not items:
                items, self.unlabelled = _items_from_loader(self.root, "load_dagm_ccad")
            self.items: list[ReviewItem] = items
        else:
            self.root = None
            self.items = _items_from_samples(root_or_samples)
        self.items = [it for it in self.items if it.label_path]
        keys = [it.key for it in self.items]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"duplicate review keys (category/split/stem): {dup[:5]}")
        self._proposals: dict[tuple[str, bool], np.ndarray] = {}
        self._maps: dict[str, np.ndarray | None] = {}
        self._images: dict[str, np.ndarray] = {}
        self._map_tag: Any = None
        self.decisions: dict[str, dict[str, Any]] = {}
        self.index = 0
        self._load_store()

    def set_anomaly_map_fn(self, fn: Callable[[np.ndarray], np.ndarray] | None,
                           tag: Any = None) -> None:
        """Switch the anomaly-map source (e.g. another detector was loaded); cached maps and
        map-based proposals are dropped when ``tag`` (an identity of the source) changes."""
        if tag != getattr(self, "_map_tag", None) or (fn is None) != (self.anomaly_map_fn is None):
            self._maps.clear()
            self._proposals = {k: v for k, v in self._proposals.items() if not k[1]}
        self.anomaly_map_fn = fn
        self._map_tag = tag

    # -- store -------------------------------------------------------------------------------
    @property
    def store_path(self) -> Path:
        return self.store_dir / "decisions.json"

    def _load_store(self) -> None:
        if not self.store_path.is_file():
            return
        try:
            data = json.loads(self.store_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read review store {self.store_path}: {exc}") from exc
        known = {it.key for it in self.items}
        self.decisions = {k: v for k, v in dict(data.get("decisions", {})).items() if k in known}
        cur = data.get("current")
        keys = [it.key for it in self.items]
        if cur in keys:
            self.index = keys.index(cur)

    def _save_store(self) -> None:
        data = {
            "version": self.STORE_VERSION,
            "root": str(self.root) if self.root else None,
            "current": self.items[self.index].key if self.items else None,
            "updated": _now(),
            "decisions": self.decisions,
        }
        atomic_write_bytes(self.store_path, json.dumps(data, indent=1, sort_keys=True).encode())

    # -- navigation --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def _idx(self, i: int | None) -> int:
        if not self.items:
            raise IndexError("review session has no labelled items")
        i = self.index if i is None else int(i)
        if not 0 <= i < len(self.items):
            raise IndexError(f"item index {i} out of range 0..{len(self.items) - 1}")
        return i

    @property
    def current(self) -> ReviewItem:
        return self.items[self._idx(None)]

    def goto(self, i: int) -> int:
        """Move to item ``i`` (clamped) and persist the position."""
        if self.items:
            self.index = int(np.clip(i, 0, len(self.items) - 1))
            self._save_store()
        return self.index

    def next(self) -> int:
        return self.goto(self.index + 1)

    def prev(self) -> int:
        return self.goto(self.index - 1)

    def next_undecided(self) -> int:
        """Index of the first undecided item after the current one (wrapping), or current."""
        n = len(self.items)
        for off in range(1, n + 1):
            j = (self.index + off) % n
            if self.items[j].key not in self.decisions:
                return j
        return self.index

    # -- data --------------------------------------------------------------------------------
    def image(self, i: int | None = None) -> np.ndarray:
        """Item ``i``'s image, float32 ``H x W x 3`` (a few recent images are kept in memory)."""
        it = self.items[self._idx(i)]
        img = self._images.get(it.key)
        if img is None:
            img = read_image(it.image_path)
            self._images[it.key] = img
            while len(self._images) > 6:
                self._images.pop(next(iter(self._images)))
        return img

    def ellipse(self, i: int | None = None) -> np.ndarray:
        it = self.items[self._idx(i)]
        shape = self.image(i).shape[:2]
        return read_mask(it.label_path, shape) if it.label_path else np.zeros(shape, bool)

    def exact(self, i: int | None = None) -> np.ndarray | None:
        it = self.items[self._idx(i)]
        return read_mask(it.exact_path, self.image(i).shape[:2]) if it.exact_path else None

    def anomaly_map(self, i: int | None = None) -> np.ndarray | None:
        """The detector's anomaly map for item ``i`` (cached), or None without a detector."""
        if self.anomaly_map_fn is None:
            return None
        it = self.items[self._idx(i)]
        if it.key not in self._maps:
            self._maps[it.key] = np.asarray(self.anomaly_map_fn(self.image(i)), np.float32)
        return self._maps[it.key]

    def proposal(self, i: int | None = None) -> np.ndarray:
        """The proposed tight mask for item ``i`` (cached per item and map availability)."""
        i = self._idx(i)
        amap = self.anomaly_map(i)
        ck = (self.items[i].key, amap is not None)
        if ck not in self._proposals:
            self._proposals[ck] = propose_mask(self.image(i), self.ellipse(i), amap, self.settings)
        return self._proposals[ck]

    def decision(self, i: int | None = None) -> dict[str, Any] | None:
        return self.decisions.get(self.items[self._idx(i)].key)

    def mask(self, i: int | None = None) -> np.ndarray:
        """The mask to show for item ``i``: the saved accepted/edited mask, else the proposal."""
        i = self._idx(i)
        dec = self.decision(i)
        if dec and dec.get("mask_file"):
            path = self.store_dir / dec["mask_file"]
            if path.is_file():
                return read_mask(path, self.image(i).shape[:2])
        return self.proposal(i)

    # -- decisions ---------------------------------------------------------------------------
    def _record(self, i: int, decision: str, mask: np.ndarray | None) -> dict[str, Any]:
        it = self.items[i]
        ell = self.ellipse(i)
        rec: dict[str, Any] = {"decision": decision, "timestamp": _now(),
                               "image_path": it.image_path, "category": it.category}
        if mask is not None:
            mask = np.asarray(mask) > 0
            if mask.shape != ell.shape:
                raise ValueError(f"mask for {it.key} has shape {mask.shape}, image is {ell.shape}")
            rel = f"masks/{_safe_name(it.key)}.png"
            write_mask_png(self.store_dir / rel, mask)
            rec.update(mask_file=rel, mask_area=int(mask.sum()),
                       iou_with_ellipse=round(mask_iou(mask, ell), 6))
        else:
            rec.update(mask_file=None, mask_area=0, iou_with_ellipse=None)
        self.decisions[it.key] = rec
        self._save_store()
        return rec

    def accept(self, i: int | None = None, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Accept the proposal (or ``mask``) for item ``i``; saved to disk immediately."""
        i = self._idx(i)
        return self._record(i, "accepted", self.proposal(i) if mask is None else mask)

    def reject(self, i: int | None = None) -> dict[str, Any]:
        """Reject the proposal for item ``i`` (no mask exported); saved immediately."""
        return self._record(self._idx(i), "rejected", None)

    def save_edit(self, mask: np.ndarray, i: int | None = None) -> dict[str, Any]:
        """Store an annotator-edited mask for item ``i``; saved immediately.

        A mask equal to the proposal (the annotator saved without changing anything) is
        recorded as ``"accepted"``, not ``"edited"``: the decision says whether a human
        changed the proposal.
        """
        i = self._idx(i)
        mask = np.asarray(mask) > 0
        if mask.shape == self.ellipse(i).shape and np.array_equal(mask, self.proposal(i)):
            return self._record(i, "accepted", mask)
        return self._record(i, "edited", mask)

    def clear(self, i: int | None = None) -> None:
        """Forget the decision on item ``i``."""
        self.decisions.pop(self.items[self._idx(i)].key, None)
        self._save_store()

    def _path_base(self) -> Path | None:
        """The folder CSV paths are relative to: the session's root, else the items' common folder."""
        if self.root is not None:
            return self.root
        parents = [str(Path(it.image_path).parent) for it in self.items]
        try:
            return Path(os.path.commonpath(parents)) if parents else None
        except ValueError:  # mixed drives / relative and absolute
            return None

    @property
    def n_reviewed(self) -> int:
        return sum(1 for it in self.items if it.key in self.decisions)

    def progress_text(self) -> str:
        return f"{self.n_reviewed} / {len(self.items)} reviewed"

    # -- export ------------------------------------------------------------------------------
    def export(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``<stem>.png`` binary masks (0/255) for accepted/edited items and
        ``decisions.csv`` (stem, decision, mask_area, iou_with_ellipse, timestamp, category,
        image_path, mask_file) to ``out_dir``; returns the CSV path.

        ``image_path`` is relative to the dataset root (the folder the session was opened on;
        for a list of samples, their common folder), in ``/`` form, so the CSV stays valid
        when the data set is moved or read on another machine.

        Masks go to ``out_dir/<stem>.png``; when stems repeat across classes or splits (DAGM
        numbers images per class and split) every mask goes to ``out_dir/<key>.png`` instead,
        i.e. ``out_dir/<category>/<split>/<stem>.png``. ``mask_file`` in the CSV names it.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stems = [it.stem for it in self.items]
        nested = len(set(stems)) != len(stems)
        base = self._path_base()
        rows = []
        for it in self.items:
            dec = self.decisions.get(it.key)
            if dec is None:
                continue
            rel = ""
            if dec["decision"] in ("accepted", "edited") and dec.get("mask_file"):
                src = self.store_dir / dec["mask_file"]
                mask = read_mask(src)
                rel_path = Path(f"{it.key}.png") if nested else Path(f"{it.stem}.png")
                write_mask_png(out / rel_path, mask)
                rel = rel_path.as_posix()
            rows.append({"stem": it.stem, "decision": dec["decision"],
                         "mask_area": dec.get("mask_area", 0),
                         "iou_with_ellipse": "" if dec.get("iou_with_ellipse") is None
                         else dec["iou_with_ellipse"],
                         "timestamp": dec.get("timestamp", ""), "category": it.category,
                         "image_path": _relative_to(it.image_path, base), "mask_file": rel})
        csv_path = out / "decisions.csv"
        cols = ["stem", "decision", "mask_area", "iou_with_ellipse", "timestamp", "category",
                "image_path", "mask_file"]
        text = io.StringIO(newline="")
        wr = csv.DictWriter(text, fieldnames=cols)
        wr.writeheader()
        wr.writerows(rows)
        atomic_write_bytes(csv_path, text.getvalue().encode("utf-8"))
        return csv_path
