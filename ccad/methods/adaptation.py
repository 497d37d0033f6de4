"""Domain adaptation of the scoring extractor, an option of every reconstruction method.

D3AD sec. 4.3, eq. 10: after the denoiser is trained, reconstruct good training images and fine-tune
the feature extractor phi for gamma <= 3 epochs on ``L_DA(x, x_hat) = sum_j GAP(1 - cos(phi_j(x),
phi_j(x_hat)))`` (plus :mod:`ccad.scoring.domain_adapt`'s regulariser toward the frozen ImageNet
features, as DDAD's code does), so the feature-cosine map stops flagging reconstruction artefacts.
DDAD (which CCAD(V) follows) relies on the same step.

A method opts in with a config field ``domain_adapt_epochs`` (> 0 switches it on; optional
``domain_adapt_images``: how many good images are reconstructed, 0 = all; ``domain_adapt_lr``).
:meth:`ccad.methods.base.Method.after_training` (the pipeline calls it after training, before
calibration) runs :func:`adapt_scoring_backbone`; the adapted extractor replaces
``ctx.scoring_backbone()`` for this detector only (the shared backbone cache is untouched), is
saved as ``adapted_extractor.safetensors`` in the detector folder (:func:`save_adapted`) and read
back on load (:func:`load_adapted`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..config import ConfigError

ADAPTED_FILE = "adapted_extractor.safetensors"


def adapt_scoring_backbone(method: Any, train: Sequence[Any], epochs: int, n_images: int = 32,
                           lr: float = 1e-4, batch_size: Optional[int] = None) -> Any:
    """Fine-tune ``method.ctx.scoring_backbone()`` on (x, x_hat) pairs of good images (eq. 10).

    ``n_images`` good images (a seeded random subset; 0 = all of ``train``) are reconstructed with
    the trained method (``method.maps(x).reconstruction``), then
    :func:`ccad.scoring.domain_adapt.domain_adapt` runs ``epochs`` passes over the pairs. The
    adapted copy is installed in ``method.ctx`` and returned; ``method.adapted`` records what was done.
    """
    from ..data.dataset import iter_batches
    from ..scoring.domain_adapt import domain_adapt

    epochs = int(epochs)
    if epochs < 1:
        raise ConfigError(f"method.domain_adapt_epochs must be >= 1 to adapt, got {epochs}")
    ctx = method.ctx
    samples = list(train)
    if n_images and len(samples) > int(n_images):
        keep = np.random.default_rng(int(ctx.seed)).choice(len(samples), int(n_images), replace=False)
        samples = [samples[i] for i in sorted(keep.tolist())]
    if not samples:
        raise ConfigError("domain adaptation needs good training images")
    method.to(ctx.device)
    bs = int(batch_size or min(8, ctx.bank_config.batch_size))
    pairs = []
    with torch.no_grad():
        for batch in iter_batches(samples, ctx.image_size, batch_size=bs):
            x = batch["image"].to(ctx.device)
            x_hat = method.maps(x).reconstruction
            if x_hat is None:
                raise ConfigError(f"{method.name} has no reconstruction: domain adaptation (D3AD eq. 10) needs one")
            pairs.append((x, x_hat.float().clamp(0, 1)))
    tuned = domain_adapt(ctx.scoring_backbone(), pairs, epochs=epochs, lr=float(lr))
    ctx._score_backbone = tuned
    method.adapted = {"epochs": epochs, "images": len(samples), "lr": float(lr), "file": ADAPTED_FILE}
    return tuned


def save_adapted(method: Any, directory: Path) -> None:
    """Write the adapted extractor's weights (safetensors) when this method adapted one."""
    from safetensors.torch import save_file

    info = getattr(method, "adapted", None)
    if not info:
        return
    bb = method.ctx.scoring_backbone()
    state = {k: v.detach().cpu().contiguous() for k, v in bb.model.state_dict().items()}
    meta = {"backbone": str(bb.name), "layers": json.dumps(list(bb.layers)), "info": json.dumps(info)}
    save_file(state, str(Path(directory) / ADAPTED_FILE), metadata=meta)


def load_adapted(method: Any, directory: Path) -> None:
    """Install the adapted extractor saved by :func:`save_adapted` (if the folder has one)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTED_FILE
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    base = method.ctx.scoring_backbone()
    if meta.get("backbone") not in (None, base.name) or json.loads(meta.get("layers", "null") or "null") not in (
            None, list(base.layers)):
        raise ValueError(f"{path}: adapted extractor of {meta.get('backbone')} layers {meta.get('layers')}, "
                         f"but the scoring backbone is {base.name} layers {list(base.layers)}")
    tuned = copy.deepcopy(base)
    tuned.model.load_state_dict(load_file(str(path)))
    for p in tuned.parameters():
        p.requires_grad_(False)
    method.ctx._score_backbone = tuned.to(method.ctx.device)
    method.adapted = json.loads(meta.get("info", "{}") or "{}") or {"file": ADAPTED_FILE}
