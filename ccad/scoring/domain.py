"""Is this image like the good images the model was built on? A per-image out-of-domain measure.

An anomaly detector trained on one product is only meaningful on images of that product: on a
foreign image (another texture, another part, a blank frame) it still gives a score, often a
confident "anomalous" and sometimes, worse, "good". The nearest-neighbour memory every
bank-based detector holds answers the question directly. For each patch ``p`` of the image, the
PatchCore patch score (Roth et al. 2022, eq. 6) is its distance to the nearest memory row,
``s(p) = min_m ||f(p) - m||_2``; the image's *domain distance* is the median over its patches,

    D(x) = median_p s(p).

A defect changes a few patches (the median moves little); a foreign image changes nearly every
patch (the median moves with them). The limit comes from good images only: ``D`` of each
held-out good calibration image is stored at calibration time (``calibration.json``, key
``domain``), and an image is *out of domain* when

    D(x) > factor * max_good D      (factor = :data:`DOMAIN_FACTOR` = 1.5).

Why the maximum and a factor rather than a quantile: the calibration slice is small (often 2-20
images), so any high quantile of it is its maximum anyway, and the maximum already covers every
good image seen; the factor leaves room for good images a little unlike the slice (lighting,
position) while staying far below what a foreign image gives (on the synthetic textures of the
tests and the bundled demo a foreign texture or plain noise is at 2-6x the good maximum, see
tests/test_trust_engine.py). The flag is a warning shown beside the verdict, never a verdict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only patch_median takes tensors; the export runtime uses DomainStats without torch
    import torch

DOMAIN_FACTOR = 1.5
RULE = "factor x max over the held-out good images of the median patch nearest-neighbour distance"


def patch_median(distances: torch.Tensor) -> torch.Tensor:
    """``D(x)``: the median over patches of per-patch nearest-neighbour distances (``B x ...`` -> ``B``)."""
    return distances.reshape(distances.shape[0], -1).float().median(dim=1).values


@dataclass
class DomainStats:
    """The good images' domain distances and the limit derived from them (good images only)."""

    good: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    limit: float = float("nan")
    factor: float = DOMAIN_FACTOR
    source: str = ""  # which memory the distances are to (fusion memory, PatchCore memory, feature bank)

    @classmethod
    def fit(cls, good: Any, factor: float = DOMAIN_FACTOR, source: str = "") -> "DomainStats":
        g = np.asarray(good, np.float64).ravel()
        if g.size == 0:
            raise ValueError("domain statistics need at least one held-out good image")
        if not np.all(np.isfinite(g)):
            raise ValueError("domain distances of the good images contain NaN or inf")
        return cls(good=g.astype(np.float32), limit=float(factor * g.max()), factor=float(factor), source=source)

    def check_finite(self) -> None:
        if not np.isfinite(self.limit) or not np.all(np.isfinite(np.asarray(self.good, np.float64))):
            raise ValueError("the out-of-domain limit or the good images' domain distances are NaN or inf")

    def to_dict(self) -> dict[str, Any]:
        return {"good": [float(v) for v in self.good], "limit": float(self.limit), "factor": self.factor,
                "source": self.source, "rule": RULE}

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> Optional["DomainStats"]:
        if not d:
            return None
        return cls(good=np.asarray(d.get("good", []), np.float32), limit=float(d.get("limit", float("nan"))),
                   factor=float(d.get("factor", DOMAIN_FACTOR)), source=str(d.get("source", "")))
