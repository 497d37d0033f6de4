"""Any image source -> ``B x 3 x S x S`` batches -> backbone features, in bounded memory.

What :meth:`ccad.features.bank.FeatureBank.build` and :class:`ccad.features.patchcore.PatchCoreScorer`
read their good images through: :class:`ImageStream` iterates the source batch by batch (files
are decoded on a background thread, unreadable ones skipped and listed) and
:func:`stream_features` runs the frozen backbone on each batch, the patch features
``phi_{i,j}(x)`` of CCAD eq. 5, reporting progress and honouring cancellation.

Data accepted wherever images are taken (here, :mod:`ccad.features.bank` and
:mod:`ccad.features.patchcore`):

* a list of :class:`ccad.data.sample.Sample` (or of image paths), read with
  :func:`ccad.data.io.load_image` and resized with :func:`ccad.data.convert.to_tensor`;
* a tensor ``N x 3 x S x S`` in ``[0, 1]``;
* an iterable of batches: tensors ``B x 3 x S x S`` in ``[0, 1]`` or dicts with an ``"image"``
  tensor (the output of ``ccad.data.dataset.iter_batches``; an ``"errors"`` entry of
  ``(path, reason)`` pairs is recorded as skipped);
* a map-style dataset whose items are dicts with an ``"image"`` tensor (``ImageDataset``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..errors import Cancelled

__all__ = ["ImageStream", "stream_features"]

ProgressFn = Optional[Callable[[int, Optional[int]], Any]]
CancelFn = Optional[Callable[[], bool]]


def _as_path(item: Any) -> Optional[str]:
    """The image path of a Sample-like object or a path, else None."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    p = getattr(item, "image_path", None)
    return str(p) if p is not None else None


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _check_batch(x: Any, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected an image tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{where}: expected B x 3 x S x S images in [0, 1], got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.float()


class ImageStream:
    """Iterate any accepted data source as ``B x 3 x S x S`` float batches in ``[0, 1]``.

    Tracks what the bank's metadata needs: ``n_images`` (images yielded), ``skipped`` (list of
    ``{"path", "reason"}`` for unreadable files), ``total`` (images expected, or None when the
    source has no length) and ``source_hash()`` (SHA-256 of the sorted paths and file sizes for
    file sources, of the image bytes quantised to 8 bit for tensor sources).
    """

    def __init__(self, data: Any, image_size: int, batch_size: int = 8) -> None:
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.skipped: list[dict[str, str]] = []
        self.n_images = 0
        self.consumed = 0  # source items processed (images yielded + skipped)
        self._hash = hashlib.sha256()
        self._paths: Optional[list[str]] = None
        self._framed: list[Any] = []
        self._data = data
        self._kind = "batches"
        self.total: Optional[int] = None

        if isinstance(data, (str, os.PathLike)):
            raise TypeError(
                "pass a list of samples or image paths (e.g. ccad.data.detect.load_dataset(dir)), "
                f"not a single path '{data}'"
            )
        if isinstance(data, torch.Tensor):
            self._kind = "tensor"
            self.total = int(data.shape[0]) if data.dim() == 4 else 1
        elif isinstance(data, (list, tuple)) and data and all(_as_path(d) is not None for d in data):
            self._kind = "files"
            self._paths = [_as_path(d) for d in data]  # type: ignore[misc]
            # framed samples (resize = keep-aspect / tile, ccad.data.framing) are read as framed
            self._framed = [d if getattr(d, "resize", "square") != "square" else None for d in data]
            self.total = len(self._paths)
        elif isinstance(data, (list, tuple)):
            if not data:
                raise ValueError("no images given (empty list)")
            self.total = sum(
                int(_check_batch(b["image"] if isinstance(b, dict) else b, "batch").shape[0])
                for b in data
            )
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not hasattr(
            data, "keys"
        ):
            self._kind = "dataset"
            self.total = len(data)
        elif not isinstance(data, Iterable):
            raise TypeError(
                f"cannot read images from {type(data).__name__}: pass a list of Samples/paths, a "
                "B x 3 x S x S tensor, or an iterable of such batches"
            )

    # ---- hashing ----------------------------------------------------------------------------
    def source_hash(self) -> str:
        """SHA-256 identifying the source (see class docstring)."""
        if self._paths is not None:
            h = hashlib.sha256()
            keys = [p + (f.frame_key() if f is not None else "") for p, f in zip(self._paths, self._framed)]
            for p, k in sorted(zip(self._paths, keys), key=lambda pk: pk[1]):
                try:
                    size = os.path.getsize(p)
                except OSError:
                    size = -1
                h.update(f"{k}\0{size}\n".encode("utf-8", "surrogateescape"))
            return h.hexdigest()
        return self._hash.hexdigest()

    def _hash_tensor(self, x: torch.Tensor) -> None:
        q = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        self._hash.update(q.tobytes())

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        bs = self.batch_size
        if self._kind == "files":
            from ccad.data.dataset import iter_batches
            from ccad.data.sample import Sample

            assert self._paths is not None
            errors: list[tuple[str, str]] = []
            n0, k0, c0 = self.n_images, len(self.skipped), self.consumed

            def sync() -> None:  # the unreadable files found so far are skipped
                self.skipped[k0:] = [{"path": str(p), "reason": str(r)} for p, r in errors]
                self.consumed = c0 + (self.n_images - n0) + len(errors)

            # one decode thread reads the next images while the backbone runs on this batch
            items = [f if f is not None else Sample(p, None, 0) for p, f in zip(self._paths, self._framed)]
            for b in iter_batches(items, self.image_size, bs, on_error="skip",
                                  errors=errors, num_workers=1):
                self.n_images += int(b["image"].shape[0])
                sync()
                yield b["image"]
            sync()
            return
        if self._kind == "tensor":
            data = _check_batch(self._data, "images")
            for i in range(0, data.shape[0], bs):
                b = _resize(data[i : i + bs], self.image_size)
                self._hash_tensor(b)
                self.n_images += int(b.shape[0])
                self.consumed += int(b.shape[0])
                yield b
            return
        if self._kind == "dataset":
            ds = self._data
            n = len(ds)
            for i in range(0, n, bs):
                items = [ds[j] for j in range(i, min(i + bs, n))]
                imgs = [it["image"] if isinstance(it, dict) else it for it in items]
                b = _resize(_check_batch(torch.stack(imgs), f"dataset items {i}..{i + len(items) - 1}"),
                            self.image_size)
                self._hash_tensor(b)
                self.n_images += int(b.shape[0])
                self.consumed += len(items)
                yield b
            for path, reason in getattr(ds, "errors", []) or []:
                self.skipped.append({"path": str(path), "reason": str(reason)})
            return
        for k, item in enumerate(self._data):
            if isinstance(item, dict):
                for err in item.get("errors", []) or []:
                    path, reason = (err if isinstance(err, (tuple, list)) else (err, "unreadable"))[:2]
                    self.skipped.append({"path": str(path), "reason": str(reason)})
                    self.consumed += 1
                if item.get("image") is None:
                    continue
                item = item["image"]
            b = _resize(_check_batch(item, f"batch #{k}"), self.image_size)
            if b.shape[0] == 0:
                continue
            self._hash_tensor(b)
            self.n_images += int(b.shape[0])
            self.consumed += int(b.shape[0])
            yield b


def stream_features(
    stream: ImageStream,
    backbone: torch.nn.Module,
    device: torch.device,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
) -> Iterator[torch.Tensor]:
    """Backbone features ``B x D x h x w`` per batch of ``stream`` (inference mode), calling
    ``progress(images_done, images_total)`` after each batch and raising :class:`Cancelled` when
    ``cancel()`` returns True (checked before each batch)."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled before the first batch")
    reported = -1
    for batch in stream:
        with torch.no_grad():
            feats = backbone(batch.to(device))
        yield feats
        reported = stream.consumed
        if progress is not None:
            progress(reported, stream.total)
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled after {reported} images")
    if progress is not None and stream.consumed != reported:
        progress(stream.consumed, stream.total)


def _module_device(m: torch.nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")
