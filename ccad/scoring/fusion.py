"""Good-only fusion of a method's anomaly map with the bank's nearest-neighbour map.

CCAD's premise (papers/ccad.md sec. 1 and 3.2) is that feature-based and reconstruction-based
evidence are complementary: the Coarse Feature Bank knows what normal patches look like, the
diffusion model knows how a normal image is put together. This module lets any method's map be
combined with a PatchCore nearest-neighbour map (Roth et al. 2022, eq. 6: the distance of each
test patch to its nearest row of a coreset memory of good patches) without any anomalous
example:

    z_c(p) = (M_c(p) - mu_c) / sd_c                  for c in {method, bank}
    M(p)   = w * z_method(p) + (1 - w) * z_bank(p)

``mu_c`` and ``sd_c`` are the mean and standard deviation of component ``c``'s map over every
pixel of the held-out good images (the calibration slice: never training images, whose patches
are in the memory, and never test labels): ``scoring.fusion_norm = "std"``. With ``"quantile"``
they are the median and the distance from the median to the 99.9th percentile of those pixels,
so 1 means "as unusual as the most unusual 0.1 % of good pixels" for both maps (robust to a
saturating map such as DeCo-Diff's clipped eq. 15, whose small spread makes every z-score huge).
``w`` (and the normalisation) is, with ``scoring.fusion_weight_fit = "synthetic"`` (the
default), the weight of a grid that best separates the held-out good images from copies of them given
synthetic anomalies (Perlin masks filled with foreign procedural texture, the DRAEM/GLAD
recipe of :mod:`ccad.data.anomaly_synth`) - good images only, no real defect and no test label
(:meth:`BankFusion.fit_weight`); with ``"fixed"`` it is ``scoring.fusion_weight`` (0.5: the two
kinds of evidence count equally). On MTD (benchmarks/results/README.md) the fitted weight did
better than the fixed 0.5. The threshold is then calibrated on the fused image scores of
the same good images.

The memory is fitted on the good training images at its own resolution
(``scoring.fusion_image_size``, default 256 px, the PatchCore setting), with the bank's backbone
and layers, so a method trained at 128 px can be fused with a 256-px PatchCore map; the detector
then reads images at the larger of the two sizes and returns maps at that size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .anomaly_map import gaussian_blur, scaled_sigma

FUSION_DIR = "fusion"
STATS_FILE = "stats.json"
VIEWS = ("fused", "method", "bank")
WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
NORMS = ("std", "quantile")


@dataclass
class ComponentStats:
    """Location and scale of one component's map on held-out good images."""

    mean: float
    std: float
    n_images: int = 0
    median: Optional[float] = None
    q_hi: Optional[float] = None  # the 99.9th percentile

    def normalise(self, maps: torch.Tensor, norm: str = "std") -> torch.Tensor:
        if norm == "quantile":
            if self.median is None or self.q_hi is None:
                raise RuntimeError("fusion: these statistics have no quantiles (fitted by an older ccad); "
                                   "re-calibrate the detector")
            return (maps - float(self.median)) / max(float(self.q_hi) - float(self.median), 1e-8)
        if norm != "std":
            raise ValueError(f"fusion norm must be 'std' or 'quantile', got {norm!r}")
        return (maps - float(self.mean)) / max(float(self.std), 1e-8)

    @classmethod
    def fit(cls, maps: np.ndarray | torch.Tensor) -> "ComponentStats":
        a = torch.as_tensor(maps, dtype=torch.float64)
        if a.numel() == 0:
            raise ValueError("fusion: no held-out good maps to fit the normalisation on")
        flat = a.flatten().numpy()
        med, hi = np.quantile(flat, [0.5, 0.999])
        return cls(mean=float(a.mean()), std=float(a.std(unbiased=False)), n_images=int(a.shape[0]),
                   median=float(med), q_hi=float(hi))


@dataclass
class BankFusion:
    """The nearest-neighbour memory and the good-image statistics of both components.

    ``scorer`` is a fitted :class:`ccad.features.PatchCoreScorer`; ``stats`` maps ``"method"``
    and ``"bank"`` to :class:`ComponentStats` once :meth:`fit_stats` has run.
    """

    scorer: Any
    weight: float = 0.5
    sigma: float = 4.0
    norm: str = "std"
    stats: dict[str, ComponentStats] = field(default_factory=dict)
    weight_fit: Optional[dict[str, Any]] = None

    @property
    def image_size(self) -> int:
        return int(self.scorer.image_size)

    @property
    def fitted(self) -> bool:
        return {"method", "bank"} <= set(self.stats)

    @classmethod
    def fit(cls, train: Sequence[Any], backbone: Any, image_size: int = 256, ratio: float = 0.01,
            weight: float = 0.5, sigma: float = 4.0, batch_size: int = 8, seed: int = 0, progress: Any = None,
            cancel: Any = None, norm: str = "std") -> "BankFusion":
        """Fit the memory on the good training images (one backbone pass, streaming coreset)."""
        from ..features import PatchCoreScorer

        scorer = PatchCoreScorer(backbone, ratio=ratio, image_size=image_size, batch_size=batch_size, seed=seed)
        scorer.fit(list(train), progress=progress, cancel=cancel)
        return cls(scorer=scorer, weight=float(weight), sigma=float(sigma), norm=norm)

    @torch.no_grad()
    def bank_maps(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """PatchCore maps ``B x 1 x H x W`` at ``size`` (upsampled, Gaussian-smoothed as PatchCore's)."""
        return self.maps_from_raw(self.scorer.score_maps(x.float()).float(), size)

    def maps_from_raw(self, raw: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """:meth:`bank_maps` from the raw patch distances ``B x 1 x h x w`` (``scorer.score_maps``)."""
        maps = F.interpolate(raw.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return gaussian_blur(maps, scaled_sigma(self.sigma, int(size[-1])))

    def fit_stats(self, method_maps: np.ndarray | torch.Tensor, bank_maps: np.ndarray | torch.Tensor) -> None:
        """Normalisation of both components from their maps on held-out good images."""
        self.stats = {"method": ComponentStats.fit(method_maps), "bank": ComponentStats.fit(bank_maps)}

    def combine(self, method_maps: torch.Tensor, bank_maps: torch.Tensor, view: str = "fused") -> torch.Tensor:
        """The map of one view: ``fused`` (the weighted sum of normalised maps), or one component
        alone (``method`` / ``bank``, raw, exactly as that component scores on its own)."""
        if view == "method":
            return method_maps
        if view == "bank":
            return bank_maps
        if view != "fused":
            raise ValueError(f"fusion view must be one of {', '.join(VIEWS)}, got {view!r}")
        if not self.fitted:
            raise RuntimeError("fusion: the good-image normalisation is not fitted yet (calibrate the detector "
                               "on held-out good images first)")
        w = float(self.weight)
        return (w * self.stats["method"].normalise(method_maps, self.norm)
                + (1.0 - w) * self.stats["bank"].normalise(bank_maps.to(method_maps.device), self.norm))

    def fit_weight(self, good: tuple[torch.Tensor, torch.Tensor], synthetic: tuple[torch.Tensor, torch.Tensor],
                   masks: torch.Tensor, score_fn: Any, grid: Sequence[float] = WEIGHT_GRID,
                   norms: Sequence[str] = NORMS) -> float:
        """Choose ``weight`` from ``grid`` (and the normalisation from ``norms``) on good images and
        synthetic anomalies made from them.

        ``good`` / ``synthetic`` are ``(method maps, bank maps)`` of the good images and of their
        synthetic-anomaly copies (``masks``: ``N x 1 x H x W`` of the pasted regions);
        ``score_fn`` turns maps into image scores (the detector's own). The objective is the mean
        of the image AUROC (good vs synthetic) and the pixel AUROC (pasted pixels vs all
        others); ties go to the weight nearest 0.5. Needs :meth:`fit_stats` first."""
        from ..metrics import auroc, pixel_auroc

        labels = np.r_[np.zeros(good[0].shape[0]), np.ones(synthetic[0].shape[0])]
        all_masks = torch.cat([torch.zeros_like(good[0]), masks.to(good[0])])[:, 0].numpy() > 0.5
        table = []
        for norm in norms:
            self.norm = norm
            for w in grid:
                self.weight = float(w)
                maps = torch.cat([self.combine(*good), self.combine(*synthetic)])
                img = auroc(labels, score_fn(maps).numpy())
                pix = pixel_auroc(all_masks, maps[:, 0].numpy())
                table.append((norm, float(w), round(float(img), 5), round(float(pix), 5)))
        # ties: the configured normalisation first, then the weight nearest 0.5
        best = max(table, key=lambda r: ((r[2] + r[3]) / 2, r[0] == norms[0], -abs(r[1] - 0.5)))
        self.norm, self.weight = best[0], best[1]
        self.weight_fit = {"source": "synthetic anomalies on the held-out good images", "n_good": len(good[0]),
                           "n_synthetic": len(synthetic[0]),
                           "grid": [{"norm": n, "weight": w, "image_auroc": i, "pixel_auroc": p}
                                    for n, w, i, p in table]}
        return self.weight

    def to(self, device: Any) -> "BankFusion":
        self.scorer.to(device)
        return self

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory) / FUSION_DIR
        self.scorer.save(d)
        meta = {"weight": self.weight, "sigma": self.sigma, "norm": self.norm, "weight_fit": self.weight_fit,
                "stats": {k: vars(v) for k, v in self.stats.items()}}
        (d / STATS_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, backbone: Any) -> "BankFusion":
        from ..features import PatchCoreScorer

        d = Path(directory) / FUSION_DIR
        if not (d / STATS_FILE).is_file():
            raise FileNotFoundError(f"{d / STATS_FILE}: missing; a detector saved with scoring.fusion='bank' "
                                    f"has the folder {FUSION_DIR}/")
        meta = json.loads((d / STATS_FILE).read_text())
        scorer = PatchCoreScorer.load(d, backbone=backbone)
        stats = {k: ComponentStats(**v) for k, v in (meta.get("stats") or {}).items()}
        return cls(scorer=scorer, weight=float(meta.get("weight", 0.5)), sigma=float(meta.get("sigma", 4.0)),
                   stats=stats, weight_fit=meta.get("weight_fit"), norm=str(meta.get("norm", "std")))

    def card(self) -> dict[str, Any]:
        return {"kind": "bank nearest-neighbour map, normalised on held-out good images",
                "weight_of_method_map": self.weight, "norm": self.norm,
                "weight_source": (self.weight_fit or {}).get("source", "fixed (scoring.fusion_weight)"),
                "image_size": self.image_size,
                "memory_rows": None if self.scorer.memory_bank is None else int(self.scorer.memory_bank.shape[0]),
                "stats": {k: {"mean": round(v.mean, 6), "std": round(v.std, 6), "n_images": v.n_images}
                          for k, v in self.stats.items()}}


def bank_backbone(bank_config: Any, device: Optional[torch.device] = None) -> Any:
    """The bank's backbone (name, layers, weights from :class:`ccad.config.BankConfig`)."""
    from ..features import get_backbone

    bb = get_backbone(bank_config.backbone, layers=tuple(bank_config.layers), weights=bank_config.weights)
    return bb.to(device) if device is not None else bb
