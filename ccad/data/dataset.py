"""Reading samples as tensors, never dying on one bad file: :func:`load_item`, the ``torch``
:class:`ImageDataset` and :func:`iter_batches` (bank building and scoring)."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ccad.data.convert import mask_to_tensor, to_tensor, warn_aspect
from ccad.data.io import ImageReadError, load_image, load_mask
from ccad.data.sample import Sample

__all__ = ["load_sample_mask", "load_item", "ImageDataset", "iter_batches", "iter_native"]


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


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


_recent: "OrderedDict[str, np.ndarray]" = OrderedDict()  # the last images decoded for their tiles
_recent_lock = threading.Lock()


def _read_for_tiles(path: str) -> np.ndarray:
    """:func:`load_image`, keeping the last two images: the tiles of one image are read one after
    another (:func:`ccad.data.framing.frame_samples`), so each image is decoded once, not per tile."""
    with _recent_lock:
        if path in _recent:
            _recent.move_to_end(path)
            return _recent[path]
    img = load_image(path)
    with _recent_lock:
        _recent[path] = img
        while len(_recent) > 2:
            _recent.popitem(last=False)
    return img


def load_item(sample: Sample, image_size: int | tuple[int, int]) -> dict[str, Any]:
    """Read one sample as the dict :class:`ImageDataset` yields; raises ImageReadError.

    A :class:`ccad.data.framing.FramedSample` (a model built with ``resize = keep-aspect`` or
    ``tile``) is read as that mode's model input: the letterboxed image or its one tile."""
    resize = getattr(sample, "resize", "square")
    img = _read_for_tiles(sample.image_path) if resize == "tile" else load_image(sample.image_path)
    h, w = img.shape[:2]
    mask = load_sample_mask(sample, (h, w))
    if resize != "square":
        from ccad.data.framing import frame_item

        size = image_size if isinstance(image_size, int) else int(image_size[0])
        x, m = frame_item(img, mask, sample, size)  # type: ignore[arg-type]
    else:
        warn_aspect((h, w), image_size, sample.image_path)
        x, m = to_tensor(img, image_size), mask_to_tensor(mask, image_size)
    return dict(
        image=x,
        mask=m,
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
        _check_on_error(on_error)
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
    _check_on_error(on_error)
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


def iter_native(samples: Sequence[Sample], batch_size: int = 8, on_error: str = "skip",
                errors: list[tuple[str, str]] | None = None, masks: bool = True) -> Iterator[dict[str, Any]]:
    """Batches of readable samples at their own size, for detectors whose ``resize`` is not
    ``square`` (:mod:`ccad.data.framing`: the detector frames each image itself). Yields dicts with
    lists ``image`` (``H x W x 3`` float32), ``mask`` (``H x W`` bool, all False without a mask;
    ``None`` entries when ``masks=False``), ``path``, ``category``, ``defect_type``, ``index``,
    ``label`` (int array) and ``errors`` as :func:`iter_batches`. Unreadable files are skipped and
    listed (``on_error="raise"`` re-raises)."""
    _check_on_error(on_error)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = ("image", "mask", "path", "category", "defect_type", "index", "label")
    batch: dict[str, list] = {k: [] for k in keys}
    errs: list[tuple[str, str]] = []

    def out() -> dict[str, Any]:
        d: dict[str, Any] = dict(batch)
        d["label"] = np.asarray(batch["label"], dtype=int)
        d["errors"] = list(errs)
        return d

    for i, s in enumerate(samples):
        try:
            img = load_image(s.image_path)
            m = None
            if masks:
                m = load_sample_mask(s, img.shape[:2])
                m = np.zeros(img.shape[:2], bool) if m is None else np.asarray(m) > 0
        except ImageReadError as e:
            if on_error == "raise":
                raise
            errs.append((e.path, e.reason))
            if errors is not None:
                errors.append((e.path, e.reason))
            continue
        for k, v in zip(keys, (img, m, s.image_path, s.category, s.defect_type, i, int(s.label))):
            batch[k].append(v)
        if len(batch["image"]) == batch_size:
            yield out()
            batch = {k: [] for k in keys}
            errs = []
    if batch["image"]:
        yield out()
