"""Short domain adaptation of the scoring extractor on (x, x_hat) pairs of good images.

D3AD eq. 10: ``L_DA(x, x_hat) = sum_j GAP(1 - cos(phi_j(x), phi_j(x_hat)))`` pulls the features
of an image and its reconstruction together, so the map stops flagging reconstruction
artefacts. Minimising eq. 10 alone has a trivial solution (a constant feature map), so, as in
DDAD's implementation, a second term keeps the tuned features of ``x`` close to the frozen
ImageNet features: ``L = L_DA(x, x_hat) + lambda * sum_j GAP(1 - cos(phi_j(x), phi0_j(x)))``.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F


def _cos_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((1 - F.cosine_similarity(x, y, dim=1, eps=1e-6)).mean() for x, y in zip(a, b))


def domain_adapt(
    extractor: torch.nn.Module,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 1,
    lr: float = 1e-4,
    reg: float = 1.0,
    progress: Optional[Callable[[int, float], None]] = None,
) -> torch.nn.Module:
    """Return a fine-tuned copy of ``extractor`` (its ``layer_maps`` trained on eq. 10 + regulariser).

    ``pairs`` yields ``(x, x_hat)`` batches in [0, 1]; it is iterated ``epochs`` times (pass a
    list or a re-iterable loader). BatchNorm statistics stay frozen (eval mode): the batches are
    small and all of one texture, so their statistics would be a poor replacement.
    """
    frozen = extractor
    tuned = copy.deepcopy(extractor)
    params = [p for p in tuned.parameters()]
    for p in params:
        p.requires_grad_(True)
    tuned.eval()
    opt = torch.optim.AdamW(params, lr=lr)
    step = 0
    pairs = list(pairs)
    for _ in range(int(epochs)):
        for x, x_hat in pairs:
            with torch.enable_grad():
                fx = tuned.layer_maps(x)
                fxh = tuned.layer_maps(x_hat)
                with torch.no_grad():
                    f0 = frozen.layer_maps(x)
                loss = _cos_gap(fx, fxh) + reg * _cos_gap(fx, [f.detach() for f in f0])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step += 1
            if progress is not None:
                progress(step, float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    return tuned
