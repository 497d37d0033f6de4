"""The Coarse Feature Bank ``B_c`` of CCAD: building, saving, loading and summarising it.

CCAD sec. 3.2: every good training image ``x`` is mapped by the frozen extractor to locally aware
patch features ``D = {phi_{i,j}(x)}`` (eq. 5), and the bank is the greedy k-center coreset of
fixed size ``xi`` of all of them, ``B_c = Coreset(D, xi)`` (eq. 6). ``B_c`` (``xi x d``) is the
cross-attention context of the denoiser (eq. 9-11, 15).

:meth:`FeatureBank.build` streams images batch by batch through the backbone
(:mod:`ccad.features.stream`, which lists the data sources accepted) into a
:class:`~ccad.features.coreset.StreamingCoreset`, so memory stays bounded however many images
there are. Unreadable images are skipped and listed in ``meta["skipped"]``. The bank's 2-D PCA
view for plots is :func:`ccad.features.projection.project_2d`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import Cancelled  # noqa: F401  (re-exported: ccad.features.bank.Cancelled)
from .coreset import MAX_BANK_SIZE, StreamingCoreset, validate_bank_size
from .stream import CancelFn, ImageStream, ProgressFn, _module_device, stream_features

__all__ = [
    "FeatureBank",
    "Cancelled",
    "BANK_WEIGHTS",
    "BANK_META",
]

BANK_WEIGHTS = "bank.safetensors"
BANK_META = "bank.json"


def _ccad_version() -> str:
    try:
        from ccad import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


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
        """Write ``bank.safetensors`` (the features) and ``bank.json`` (meta) into ``directory``, each
        replaced in one step (:func:`ccad.atomic.write_bytes_atomic`: a kill leaves the old file)."""
        from safetensors.torch import save

        from ..atomic import write_bytes_atomic

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(d / BANK_WEIGHTS, save(
            {"features": self.features.detach().float().cpu().contiguous()},
            metadata={"format": "ccad-feature-bank", "ccad_version": _ccad_version()},
        ))
        meta = dict(self.meta)
        meta["xi"] = self.size
        meta["feature_dim"] = self.feature_dim
        write_bytes_atomic(d / BANK_META, json.dumps(meta, indent=2, default=str).encode("utf-8"))
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
