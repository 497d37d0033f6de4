"""The Coarse Feature Bank ``B_c`` of CCAD and the streaming feature extraction behind it.

CCAD sec. 3.2: every good training image ``x`` is mapped by the frozen extractor to locally aware
patch features ``D = {phi_{i,j}(x)}`` (eq. 5), and the bank is the greedy k-center coreset of
fixed size ``xi`` of all of them, ``B_c = Coreset(D, xi)`` (eq. 6). ``B_c`` (``xi x d``) is the
cross-attention context of the denoiser (eq. 9-11, 15).

:meth:`FeatureBank.build` streams images batch by batch through the backbone into a
:class:`~ccad.features.coreset.StreamingCoreset`, so memory stays bounded however many images
there are. Unreadable images are skipped and listed in ``meta["skipped"]``.

Data accepted wherever this module (and :mod:`ccad.features.patchcore`) takes images:

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
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .coreset import MAX_BANK_SIZE, StreamingCoreset, validate_bank_size
from ..errors import Cancelled  # noqa: F401  (re-exported: ccad.features.bank.Cancelled)

__all__ = [
    "FeatureBank",
    "Cancelled",
    "ImageStream",
    "project_2d",
    "BANK_WEIGHTS",
    "BANK_META",
]

BANK_WEIGHTS = "bank.safetensors"
BANK_META = "bank.json"

ProgressFn = Optional[Callable[[int, Optional[int]], Any]]
CancelFn = Optional[Callable[[], bool]]


def _ccad_version() -> str:
    try:
        from ccad import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


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
            for p in sorted(self._paths):
                try:
                    size = os.path.getsize(p)
                except OSError:
                    size = -1
                h.update(f"{p}\0{size}\n".encode("utf-8", "surrogateescape"))
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
            for b in iter_batches([Sample(p, None, 0) for p in self._paths], self.image_size, bs, on_error="skip",
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


@dataclass
class FeatureBank:
    """The coarse feature bank ``B_c`` (``xi x d``, CCAD eq. 6) and its metadata.

    Attributes:
        features: ``xi x feature_dim`` float32 tensor.
        meta: plain-value dict: backbone, layers, image_size, xi, feature_dim, n_images,
            n_patches, source_hash, created (ISO 8601, UTC), ccad_version, skipped (list of
            ``{"path", "reason"}``), plus weights / local_avg / reduction / grid / coreset.
    """

    features: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.features, torch.Tensor) or self.features.dim() != 2:
            shape = tuple(self.features.shape) if isinstance(self.features, torch.Tensor) else None
            raise ValueError(f"FeatureBank.features must be an xi x D tensor, got {shape}")
        self.features = self.features.float()
        self.meta = dict(self.meta)
        self.meta.setdefault("xi", int(self.features.shape[0]))
        self.meta.setdefault("feature_dim", int(self.features.shape[1]))
        self.meta.setdefault("skipped", [])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def size(self) -> int:
        """``xi``, the number of bank vectors."""
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def to(self, device: Any) -> "FeatureBank":
        """Move the features to ``device`` (in place; returns self)."""
        self.features = self.features.to(device)
        return self

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        samples_or_dataset: Any,
        backbone: Any,
        size: int = 200,
        image_size: int = 256,
        batch_size: int = 8,
        progress: ProgressFn = None,
        cancel: CancelFn = None,
        buffer: Optional[int] = None,
        proj_dim: Optional[int] = 128,
        seed: int = 0,
        device: Any = None,
    ) -> "FeatureBank":
        """Build ``B_c = Coreset(D, xi)`` (CCAD eq. 5-6) from good images in bounded memory.

        Args:
            samples_or_dataset: any source :class:`ImageStream` accepts.
            backbone: a :class:`~ccad.features.backbone.Backbone` (or a backbone name, which is
                loaded with :func:`~ccad.features.backbone.get_backbone`).
            size: ``xi`` (1..1000).
            image_size: images are resized to ``image_size x image_size``.
            batch_size: images per backbone forward.
            progress: ``progress(images_done, images_total)`` after each batch (total is None
                for sources without a length).
            cancel: called before each batch; returning True raises :class:`Cancelled`.
            buffer: streaming coreset buffer cap in rows (default ``20 * xi``).
            proj_dim, seed: random projection of the greedy selection (PatchCore).
            device: where to run (default: the backbone's device).

        Raises:
            ValueError: bad size, or no readable image at all (the message lists some reasons).
            Cancelled: ``cancel()`` returned True.
        """
        xi = validate_bank_size(size, MAX_BANK_SIZE, "size")
        if isinstance(backbone, str):
            from .backbone import get_backbone

            backbone = get_backbone(backbone)
        dev = torch.device(device) if device is not None else _module_device(backbone)
        stream = ImageStream(samples_or_dataset, image_size, batch_size)
        core = StreamingCoreset(xi, buffer=buffer if buffer is not None else max(20 * xi, 1000),
                                proj_dim=proj_dim, seed=seed)
        grid: Optional[tuple[int, int]] = None
        for feats in stream_features(stream, backbone, dev, progress, cancel):
            grid = (int(feats.shape[-2]), int(feats.shape[-1]))
            core.update(feats)
        if stream.n_images == 0:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in stream.skipped[:3])
            raise ValueError(
                "no readable image to build the bank from"
                + (f" ({len(stream.skipped)} skipped: {reasons})" if stream.skipped else "")
            )
        feats = core.result().cpu()
        describe = backbone.describe() if hasattr(backbone, "describe") else {}
        meta: dict[str, Any] = {
            "backbone": getattr(backbone, "name", type(backbone).__name__),
            "layers": list(getattr(backbone, "layers", [])),
            "image_size": int(image_size),
            "xi": int(feats.shape[0]),
            "xi_requested": xi,
            "feature_dim": int(feats.shape[1]),
            "n_images": int(stream.n_images),
            "n_patches": int(core.seen),
            "grid": list(grid) if grid else None,
            "source_hash": stream.source_hash(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ccad_version": _ccad_version(),
            "skipped": list(stream.skipped),
            "weights": describe.get("weights"),
            "local_avg": describe.get("local_avg"),
            "reduction": describe.get("reduction"),
            "coreset": {
                "method": "streaming greedy k-center (merge-and-reduce)",
                "buffer": core.buffer,
                "reduce_to": core.reduce_to,
                "reductions": core.reductions,
                "proj_dim": proj_dim,
                "seed": seed,
            },
        }
        return cls(feats, meta)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``bank.safetensors`` (the features) and ``bank.json`` (meta) into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {"features": self.features.detach().float().cpu().contiguous()},
            str(d / BANK_WEIGHTS),
            metadata={"format": "ccad-feature-bank", "ccad_version": _ccad_version()},
        )
        meta = dict(self.meta)
        meta["xi"] = self.size
        meta["feature_dim"] = self.feature_dim
        tmp = d / (BANK_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, d / BANK_META)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "FeatureBank":
        """Read a bank written by :meth:`save` (a folder, or the path of either of its files).

        Raises:
            FileNotFoundError: a file is missing (named in the message).
            ValueError: the files are unreadable or disagree (named in the message).
        """
        from safetensors.torch import load_file

        d = Path(directory)
        if d.is_file():
            d = d.parent
        wpath, mpath = d / BANK_WEIGHTS, d / BANK_META
        for p in (wpath, mpath):
            if not p.is_file():
                raise FileNotFoundError(f"feature bank file '{p}' not found")
        try:
            meta = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"'{mpath}' is not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise ValueError(f"'{mpath}' must hold a JSON object")
        try:
            tensors = load_file(str(wpath))
        except Exception as e:
            raise ValueError(f"'{wpath}' is not a readable safetensors file: {e}") from e
        if "features" not in tensors:
            raise ValueError(f"'{wpath}' has no 'features' tensor (found {sorted(tensors)})")
        feats = tensors["features"]
        if feats.dim() != 2:
            raise ValueError(f"'{wpath}': features must be xi x D, got {tuple(feats.shape)}")
        for key, val in (("xi", feats.shape[0]), ("feature_dim", feats.shape[1])):
            if key in meta and int(meta[key]) != int(val):
                raise ValueError(
                    f"'{mpath}' says {key}={meta[key]} but '{wpath}' holds {tuple(feats.shape)}"
                )
        return cls(feats.float(), meta)

    # ---- reporting --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Plain values for the UI / CLI: sizes, provenance and the bank's spread.

        ``nn_distance_mean``/``_max`` are the mean/max distance from each bank vector to its
        nearest other bank vector (how finely the coreset covers the feature space).
        """
        m = self.meta
        f = self.features.float()
        if f.shape[0] > 1:
            d = torch.cdist(f, f)
            d.fill_diagonal_(float("inf"))
            nn = d.min(dim=1).values
            nn_mean, nn_max = float(nn.mean()), float(nn.max())
        else:
            nn_mean = nn_max = 0.0
        skipped = list(m.get("skipped", []) or [])
        return {
            "backbone": m.get("backbone"),
            "layers": list(m.get("layers", []) or []),
            "image_size": m.get("image_size"),
            "xi": self.size,
            "feature_dim": self.feature_dim,
            "n_images": m.get("n_images"),
            "n_patches": m.get("n_patches"),
            "n_skipped": len(skipped),
            "skipped": [str(s.get("path", s)) if isinstance(s, dict) else str(s) for s in skipped[:20]],
            "source_hash": (str(m.get("source_hash") or "")[:16] or None),
            "created": m.get("created"),
            "ccad_version": m.get("ccad_version"),
            "memory_kb": round(self.features.numel() * 4 / 1024, 1),
            "nn_distance_mean": round(nn_mean, 4),
            "nn_distance_max": round(nn_max, 4),
        }


def _flatten_features(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.dim() == 2:
        return x
    raise ValueError(f"features must be N x D or B x D x h x w, got {tuple(x.shape)}")


def _folder_images(folder: Path) -> list[Any]:
    """Good images of a dataset folder (any layout ``ccad.data`` knows), else all images in it
    that are not masks."""
    try:
        from ccad.data.detect import load_dataset

        good = [s for s in load_dataset(folder, split="train") if s.label == 0]
        if good:
            return good
    except Exception:
        pass
    from ccad.data.io import list_images

    skip = ("ground_truth", "mask", "label")
    return [p for p in list_images(folder, recursive=True)
            if not any(w in part.lower() for part in p.relative_to(folder).parts for w in skip)]


def _sample_patch_features(
    bank: FeatureBank,
    samples: Any,
    max_images: int,
    max_points: int,
    backbone: Any = None,
) -> Optional[torch.Tensor]:
    """Patch features of up to ``max_images`` images of ``samples`` (a folder path or a list)."""
    if isinstance(samples, (str, os.PathLike)):
        samples = _folder_images(Path(samples))
    if isinstance(samples, (list, tuple)):
        samples = list(samples)
        if not samples:
            return None
        if len(samples) > max_images:  # evenly spread over the list
            step = len(samples) / max_images
            samples = [samples[int(i * step)] for i in range(max_images)]
    if backbone is None:
        from .backbone import get_backbone

        weights = bank.meta.get("weights")
        wfile = weights if isinstance(weights, str) and os.path.isfile(weights) else None
        backbone = get_backbone(
            bank.meta.get("backbone", "tf_efficientnet_lite0"),
            layers=tuple(bank.meta.get("layers") or (2, 3)),
            weights=wfile,
        )
    stream = ImageStream(samples, int(bank.meta.get("image_size", 256)), batch_size=4)
    parts = [
        _flatten_features(f).cpu()
        for f in stream_features(stream, backbone, _module_device(backbone))
    ]
    if not parts:
        return None
    allf = torch.cat(parts)
    if allf.shape[0] > max_points:
        g = torch.Generator().manual_seed(0)
        allf = allf[torch.randperm(allf.shape[0], generator=g)[:max_points]]
    return allf


def project_2d(
    bank: FeatureBank | torch.Tensor,
    sample_features: Optional[torch.Tensor] = None,
    samples: Any = None,
    backbone: Any = None,
    max_images: int = 16,
    max_points: int = 3000,
) -> dict[str, Any]:
    """2-D PCA coordinates of the bank (and optionally of sample patch features) for a plot.

    The principal axes are those of the bank vectors (``B_c``, CCAD eq. 6), so the plot shows
    how the coreset spreads over the feature distribution it summarises.

    Args:
        bank: a :class:`FeatureBank` or an ``xi x D`` tensor.
        sample_features: optional ``N x D`` or ``B x D x h x w`` features to project too.
        samples: alternatively a folder / list of images whose patch features are extracted with
            the bank's backbone (at most ``max_images`` images, ``max_points`` patches).
        backbone: backbone to use for ``samples`` (default: from the bank's meta).

    Returns:
        ``{"bank": ndarray xi x 2, "all": ndarray N x 2 or None, "samples": same as "all",
        "explained_variance": [r1, r2]}`` (ratios of the bank's variance along PC1, PC2).
    """
    feats = bank.features if isinstance(bank, FeatureBank) else bank
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
        raise ValueError("project_2d: bank must be a FeatureBank or an xi x D tensor")
    f = feats.detach().float().cpu()
    mean = f.mean(0, keepdim=True)
    c = f - mean
    if f.shape[0] >= 2:
        _, s, vh = torch.linalg.svd(c, full_matrices=False)
        axes = vh[:2].T
        var = s**2
        explained = (var[:2] / var.sum().clamp_min(1e-12)).tolist()
    else:
        axes = torch.zeros(f.shape[1], 2)
        explained = [0.0, 0.0]
    if axes.shape[1] < 2:
        axes = torch.cat([axes, torch.zeros(f.shape[1], 2 - axes.shape[1])], 1)
        explained = (explained + [0.0, 0.0])[:2]
    # fix the sign of each axis so the plot is stable across runs
    signs = torch.sign(axes[axes.abs().argmax(0), torch.arange(2)])
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    out_bank = (c @ axes).numpy()
    other: Optional[torch.Tensor] = None
    if sample_features is not None:
        other = _flatten_features(sample_features.detach().float().cpu())
    elif samples is not None and isinstance(bank, FeatureBank):
        other = _sample_patch_features(bank, samples, max_images, max_points, backbone)
    out_other = None
    if other is not None:
        if other.shape[1] != f.shape[1]:
            raise ValueError(
                f"project_2d: sample features have dim {other.shape[1]}, the bank {f.shape[1]}"
            )
        out_other = ((other - mean) @ axes).numpy()
    return {
        "bank": out_bank.astype(np.float32),
        "all": None if out_other is None else out_other.astype(np.float32),
        "samples": None if out_other is None else out_other.astype(np.float32),
        "explained_variance": [float(v) for v in explained],
    }
