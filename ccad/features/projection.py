"""2-D PCA view of the feature bank ``B_c`` (CCAD eq. 6) against sample patch features, for plots.

:func:`project_2d` projects the bank's vectors (and optionally the patch features of some
images, extracted with the bank's own backbone) onto the bank's first two principal axes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .bank import FeatureBank
from .stream import ImageStream, _module_device, stream_features

__all__ = ["project_2d"]


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
