"""Encode a training set once and keep its latents on disk, memory-mapped.

Latent methods train their denoiser on autoencoder latents. Encoding every image every epoch
would cost as much as the denoiser itself (an f8 VAE encoder is a full conv net at image
resolution), so :func:`build_latent_cache` encodes the set once into the run folder:

* ``latents.f16.npy`` (float16, default) or ``latents.npy`` (float32): an ``N x C x h x w``
  array written with ``np.lib.format.open_memmap`` and read back memory-mapped;
* ``latents.json``: shape, dtype, file name, the encoded sample paths / categories in row
  order, the files that could not be read (skipped, with the reason), ``image_size``, the
  autoencoder's kind / spec / scale / shift, and ``hash``: a SHA-256 of the sources (paths,
  file sizes, mtimes), ``image_size``, the autoencoder spec and a fingerprint of its weights,
  ``hflip``, the dtype and the scaling mode. A later call with the same hash reuses the files
  instead of encoding again.

With ``fit_scaling=True`` the raw latents are written first, their mean / std (over all
values of the good training images) set the autoencoder's ``shift`` / ``scale``
(:meth:`LatentAutoencoder.fit_scaling`), and the file is then rescaled in place, so the
stored latents are ``(raw - shift) * scale`` with zero mean and unit variance. On reuse the
stored scale / shift are put back on the autoencoder. This is what TAEF2 needs (its raw
latents have std ~0.7); for AutoencoderKL the config's ``scaling_factor`` is the default.

``hflip=True`` also stores the horizontally flipped image of every sample (rows N..2N-1), a
fixed augmentation that costs no encoding per epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset import iter_batches
from .convert import to_tensor
from .io import load_image
from .sample import Sample

__all__ = ["LatentCache", "build_latent_cache", "source_hash", "LATENTS_META"]

LATENTS_META = "latents.json"
_FILES = {"float16": "latents.f16.npy", "float32": "latents.npy"}
_FORMAT = 1

ProgressFn = Optional[Callable[[int, Optional[int]], Any]]
CancelFn = Optional[Callable[[], bool]]


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def source_hash(samples: Sequence[Sample], image_size: int | tuple[int, int], autoencoder: Any,
                **extra: Any) -> str:
    """SHA-256 of (paths, sizes, mtimes, image_size, autoencoder spec + weight fingerprint, extra)."""
    h = hashlib.sha256()
    size = list(image_size) if isinstance(image_size, (tuple, list)) else [int(image_size)] * 2
    head = dict(format=_FORMAT, image_size=size, spec=getattr(autoencoder, "spec", None),
                kind=getattr(autoencoder, "kind", None),
                fingerprint=autoencoder.fingerprint() if hasattr(autoencoder, "fingerprint") else None,
                **extra)
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for s in samples:
        size_b, mtime = _stat(s.image_path)
        frame = s.frame_key() if hasattr(s, "frame_key") else ""  # a letterboxed image or one tile of it
        h.update(f"\n{s.image_path}\t{size_b}\t{mtime}\t{s.category}{frame}".encode())
    return h.hexdigest()


class LatentCache(Dataset):
    """A memory-mapped latent cache (see the module docstring) as a torch ``Dataset``.

    Items: ``{"latent": C x h x w float32 tensor, "category": str, "index": int (row),
    "sample_index": int (position in the samples given to build_latent_cache), "flipped": bool}``
    plus ``"image"`` (3 x S x S in [0, 1], read lazily from disk and flipped like the latent)
    when ``with_images=True`` (ControlNet input, pixel deviation maps).

    Attributes: ``latents`` (the ``np.memmap``, N x C x h x w), ``meta`` (the parsed
    ``latents.json``), ``paths``, ``categories``, ``errors`` (skipped files), ``scale``,
    ``shift``, ``image_size``, ``hash``.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], with_images: bool = False,
                 image_size: int | tuple[int, int] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / LATENTS_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"no latent cache in {self.cache_dir} ({LATENTS_META} missing)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.with_images = with_images
        size = image_size if image_size is not None else self.meta["image_size"]
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else int(size)
        self._latents: np.memmap | None = None
        _ = self.latents  # open now: a missing / truncated file fails here, not in a worker

    # the memmap is reopened after unpickling (DataLoader workers with spawn)
    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_latents"] = None
        return d

    @property
    def latents(self) -> np.memmap:
        if self._latents is None:
            arr = np.load(self.cache_dir / self.meta["file"], mmap_mode="r")
            if list(arr.shape) != list(self.meta["shape"]):
                raise ValueError(f"{self.cache_dir / self.meta['file']}: shape {arr.shape} does not "
                                 f"match {LATENTS_META} ({self.meta['shape']}); delete the cache")
            self._latents = arr
        return self._latents

    @property
    def paths(self) -> list[str]:
        return self.meta["paths"]

    @property
    def categories(self) -> list[str]:
        return self.meta["categories"]

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [tuple(e) for e in self.meta.get("errors", [])]

    @property
    def scale(self) -> float:
        return float(self.meta["autoencoder"]["scale"])

    @property
    def shift(self) -> float:
        return float(self.meta["autoencoder"]["shift"])

    @property
    def hash(self) -> str:
        return self.meta["hash"]

    def __len__(self) -> int:
        return int(self.meta["shape"][0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a latent cache of {n}")
        flipped = bool(self.meta["flipped"][index])
        item: dict[str, Any] = dict(
            latent=torch.from_numpy(np.array(self.latents[index], dtype=np.float32)),
            category=self.meta["categories"][index],
            index=index,
            sample_index=int(self.meta["sample_index"][index]),
            flipped=flipped,
        )
        if self.with_images:
            frame = (self.meta.get("frames") or [None] * n)[index]
            if frame:  # resize = keep-aspect / tile (ccad.data.framing): the input the latent was encoded from
                from .framing import FramedSample, frame_item

                fs = FramedSample(self.meta["paths"][index], resize=frame[0],
                                  box=None if frame[1] is None else tuple(frame[1]), tile_stride=frame[2])
                side = self.image_size if isinstance(self.image_size, int) else int(list(self.image_size)[0])
                img = frame_item(load_image(fs.image_path), None, fs, side)[0]
            else:
                img = to_tensor(load_image(self.meta["paths"][index]), self.image_size)
            item["image"] = img.flip(-1) if flipped else img
        return item

    def apply_scaling(self, autoencoder: Any) -> None:
        """Put this cache's scale / shift on ``autoencoder`` (latents were stored with them)."""
        autoencoder.set_scaling(self.scale, self.shift, fitted=bool(self.meta["autoencoder"].get("fitted")))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _try_reuse(cache_dir: Path, digest: str) -> dict[str, Any] | None:
    meta_path = cache_dir / LATENTS_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("hash") != digest or not (cache_dir / meta.get("file", "")).is_file():
        return None
    return meta


def build_latent_cache(samples: Sequence[Sample], autoencoder: Any, image_size: int | tuple[int, int],
                       cache_dir: str | os.PathLike[str], batch_size: int = 8,
                       progress: ProgressFn = None, cancel: CancelFn = None, hflip: bool = False,
                       fit_scaling: bool = False, dtype: str = "float16",
                       with_images: bool = False, num_workers: int = 0) -> LatentCache:
    """Encode ``samples`` once with ``autoencoder`` into ``cache_dir`` (or reuse a matching cache).

    Args:
        samples: the (good) training samples; unreadable files are skipped and listed in
            ``cache.errors`` (``latents.json`` ``errors``), never stopping the run.
        autoencoder: a :class:`ccad.models.autoencoder.LatentAutoencoder` (``encode_raw``,
            ``scale_latents``, ``fit_scaling``, ``spec``, ``kind``, ``scale``, ``shift``).
        image_size: the side (or ``(h, w)``) images are resized to before encoding.
        cache_dir: the folder (created); typically ``<run>/latents``.
        batch_size: images per encoder call.
        progress: ``progress(images_done, images_total)`` after each batch.
        cancel: called before each batch; returning True raises
            :class:`ccad.errors.Cancelled` (the partial files are removed).
        hflip: also store the horizontally flipped copy of every image.
        fit_scaling: fit the autoencoder's scale / shift on these raw latents first (module
            docstring); otherwise the autoencoder's current scaling is used.
        dtype: ``"float16"`` (``latents.f16.npy``, half the disk) or ``"float32"``.
        with_images: passed to the returned :class:`LatentCache`.
        num_workers: image decoding threads (see :func:`iter_batches`).

    Returns:
        The :class:`LatentCache` over the files.
    """
    if dtype not in _FILES:
        raise ValueError(f"dtype must be one of {', '.join(_FILES)}, got {dtype!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("build_latent_cache: no samples")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    scaling = "fit" if fit_scaling else dict(scale=float(autoencoder.scale), shift=float(autoencoder.shift))
    digest = source_hash(samples, image_size, autoencoder, hflip=bool(hflip), dtype=dtype, scaling=scaling)

    meta = _try_reuse(cache_dir, digest)
    if meta is not None:
        cache = LatentCache(cache_dir, with_images=with_images)
        if fit_scaling:
            cache.apply_scaling(autoencoder)
        if progress is not None:
            progress(len(samples), len(samples))
        return cache

    from ccad.errors import Cancelled  # the project's one cancellation exception

    n_views = 2 if hflip else 1
    n_src = len(samples)
    ds = autoencoder.downscale
    hw = tuple(image_size) if isinstance(image_size, (tuple, list)) else (int(image_size),) * 2
    if hw[0] % ds or hw[1] % ds:
        raise ValueError(f"image_size {hw} must be a multiple of the autoencoder downscale {ds}")
    shape = (n_views * n_src, autoencoder.latent_channels, hw[0] // ds, hw[1] // ds)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    final = cache_dir / _FILES[dtype]
    tmp = cache_dir / (final.name + ".tmp.npy")
    (cache_dir / LATENTS_META).unlink(missing_ok=True)  # a stale json must not outlive its data
    for f in _FILES.values():
        (cache_dir / f).unlink(missing_ok=True)

    errors: list[tuple[str, str]] = []
    ok: list[int] = []  # sample positions in row order of the first view
    moments_sum = 0.0
    moments_sq = 0.0
    moments_n = 0
    buf = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
    try:
        done = 0
        for batch in iter_batches(samples, image_size=image_size, batch_size=batch_size,
                                  errors=errors, num_workers=num_workers):
            if cancel is not None and cancel():
                raise Cancelled(f"latent cache cancelled after {done} of {n_src} images")
            images = batch["image"]
            views = [images, images.flip(-1)] if hflip else [images]
            for v, x in enumerate(views):
                raw = autoencoder.encode_raw(x)
                z = raw if fit_scaling else autoencoder.scale_latents(raw)
                z64 = z.double()
                moments_sum += float(z64.sum())
                moments_sq += float((z64 * z64).sum())
                moments_n += z64.numel()
                rows = np.arange(len(ok), len(ok) + len(x)) + v * n_src
                buf[rows[0]:rows[-1] + 1] = z.cpu().numpy().astype(np_dtype)
            ok.extend(int(i) for i in batch["index"])
            done = len(ok) + len(errors)
            if progress is not None:
                progress(done, n_src)
        if not ok:
            raise ValueError("build_latent_cache: none of the images could be read; first errors: "
                             + "; ".join(f"{p}: {r}" for p, r in errors[:3]))
        mean = moments_sum / moments_n
        std = max(moments_sq / moments_n - mean * mean, 0.0) ** 0.5
        if fit_scaling:
            if std < 1e-8:
                raise ValueError(f"encoded latents have zero variance (std={std:.3g}); cannot fit a scale")
            autoencoder.set_scaling(1.0 / std, mean, fitted=True)
        n_ok = len(ok)
        out_rows = n_views * n_ok
        src_rows = [v * n_src + r for v in range(n_views) for r in range(n_ok)]
        contiguous = n_ok == n_src
        if contiguous and not fit_scaling:
            buf.flush()
            del buf
            os.replace(tmp, final)
        else:
            out = np.lib.format.open_memmap(final, mode="w+", dtype=np_dtype, shape=(out_rows,) + shape[1:])
            chunk = 256
            for start in range(0, out_rows, chunk):
                idx = src_rows[start:start + chunk]
                block = np.asarray(buf[idx], dtype=np.float32)
                if fit_scaling:
                    block = (block - autoencoder.shift) * autoencoder.scale
                out[start:start + len(idx)] = block.astype(np_dtype)
            out.flush()
            del out, buf
            tmp.unlink(missing_ok=True)
    except BaseException:
        try:
            del buf
        except NameError:
            pass
        tmp.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise

    paths = [samples[i].image_path for i in ok] * n_views
    meta = dict(
        format=_FORMAT,
        file=final.name,
        shape=[out_rows, *shape[1:]],
        dtype=dtype,
        paths=paths,
        frames=[(samples[i].resize, samples[i].box, samples[i].tile_stride)
                if getattr(samples[i], "resize", "square") != "square" else None for i in ok] * n_views,
        categories=[samples[i].category for i in ok] * n_views,
        sample_index=ok * n_views,
        flipped=[False] * n_ok + ([True] * n_ok if hflip else []),
        errors=[list(e) for e in errors],
        image_size=list(hw),
        hflip=bool(hflip),
        autoencoder=dict(kind=autoencoder.kind, spec=autoencoder.spec, scale=float(autoencoder.scale),
                         shift=float(autoencoder.shift), fitted=bool(getattr(autoencoder, "fitted", False)),
                         latent_channels=int(autoencoder.latent_channels), downscale=int(ds)),
        scaling="fit" if fit_scaling else "given",
        encoded_stats=dict(of="raw" if fit_scaling else "scaled", mean=mean, std=std),
        hash=digest,
        n_samples=n_src,
    )
    _write_json(cache_dir / LATENTS_META, meta)
    return LatentCache(cache_dir, with_images=with_images)
