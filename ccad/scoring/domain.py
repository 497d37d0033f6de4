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

    D(x) > factor * max_good D      (factor = :data:`DOMAIN_FACTOR` = 1.25 from 10 held-out good
                                     images on, :data:`DOMAIN_FACTOR_FEW` = 1.5 below).

Why the maximum and a factor rather than a quantile: the calibration slice is small (often 2-20
images), so any high quantile of it is its maximum anyway, and the maximum already covers every
good image seen; the factor leaves room for good images a little unlike the slice (lighting,
position) while staying far below what a foreign image gives (on the synthetic textures of the
tests and the bundled demo a foreign texture or plain noise is at 2-6x the good maximum, see
tests/test_trust_engine.py). The factor was 1.5 until measured on real data (issue 21 item 2): a
PatchCore bank from 60 MTD training good images, calibrated on its own held-out good images
(max D 22.65), gave the 80 *other* MTD training good images D at most 1.08x that maximum, while an
8000x6000 random-noise frame (averaged to a faint mottle by the antialiased resize) sat at 1.51x,
just through a 1.5x limit, and a foreign synthetic texture ("cloud") at 1.56x; flat black, grey,
white and red frames at 2.5-2.7x. 1.25 keeps more than twice the good images' measured spread
(1.08) and flags all of those with a margin. Chosen on good images and foreign images only, never
on defects. The app's verdict box says OUT OF DOMAIN first for such an image. With fewer than
:data:`DOMAIN_MIN_IMAGES` held-out good images the maximum is a poor estimate of the good range (a
new good image exceeds the maximum of n with probability 1/(n+1)), so the factor stays 1.5 there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only patch_median takes tensors; the export runtime uses DomainStats without torch
    import torch

DOMAIN_FACTOR = 1.25
DOMAIN_FACTOR_FEW = 1.5
DOMAIN_MIN_IMAGES = 10
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
    def fit(cls, good: Any, factor: Optional[float] = None, source: str = "") -> "DomainStats":
        """The limit from the held-out good images' distances; ``factor`` None: by their number
        (:data:`DOMAIN_FACTOR`, or :data:`DOMAIN_FACTOR_FEW` below :data:`DOMAIN_MIN_IMAGES`)."""
        g = np.asarray(good, np.float64).ravel()
        if factor is None:
            factor = DOMAIN_FACTOR if g.size >= DOMAIN_MIN_IMAGES else DOMAIN_FACTOR_FEW
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
