"""PatchCore (Roth et al. 2022), the bank-only baseline every seed paper compares with.

The backbone's locally averaged patch features of every good image are reduced to a memory of
``ratio`` of all patches by the streaming greedy k-center coreset; a test patch scores its
distance to the nearest memory row, the map is upsampled and Gaussian-smoothed. The Coarse
Feature Bank (CCAD eq. 5-6) is drawn from the same memory, so one pass over the images gives
both (see :func:`bank_from_memory`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError, at_least
from ..scoring.anomaly_map import gaussian_blur, scaled_sigma
from .base import Context, Method, MethodOutput, register_method, saved_part

MEMORY_FILE = "patchcore.safetensors"


@dataclass
class PatchCoreConfig:
    """PatchCore memory bank: coreset ``ratio`` of all patches, ``k`` nearest neighbours;
    ``coreset`` names the selection settings (``ccad.features.coreset.CORESET_MODES``: ``fast``,
    the default, or ``legacy``, the slower selection of earlier versions)."""

    ratio: float = 0.01
    k: int = 1
    coreset: str = "fast"

    def validate(self) -> None:
        from ..features.coreset import CORESET_MODES

        if not 0.0 < float(self.ratio) <= 1.0:
            raise ConfigError(f"method.ratio (PatchCore coreset ratio) must be in (0, 1], got {self.ratio}")
        at_least(self, 1, "k")
        if self.coreset not in CORESET_MODES:
            raise ConfigError(f"method.coreset must be one of {sorted(CORESET_MODES)}, got {self.coreset!r}")


def bank_from_memory(pc: Any, samples: Sequence[Any], bank_size: int, image_size: int, batch_size: int = 8,
                     seed: int = 0) -> Any:
    """The Coarse Feature Bank (eq. 5-6) as a greedy k-center coreset of the PatchCore memory.

    The memory is itself a greedy coreset of every training patch, and k-center coresets
    compose (a point is within the memory's covering radius of a memory row, which is within
    the bank's radius of a bank row), so this needs no second pass over the images.
    """
    from .. import __version__
    from ..features import FeatureBank
    from ..features.coreset import greedy_coreset, validate_bank_size
    from ..features.stream import ImageStream

    xi = validate_bank_size(bank_size)
    memory = pc.memory_bank
    idx = greedy_coreset(memory, xi, seed=seed)
    feats = memory[idx].float().cpu()
    bb = pc.backbone
    meta = {
        "backbone": getattr(bb, "name", type(bb).__name__), "layers": list(getattr(bb, "layers", [])),
        "image_size": int(image_size), "xi": int(feats.shape[0]), "xi_requested": xi,
        "feature_dim": int(feats.shape[1]), "n_images": int(pc.n_images), "n_patches": int(pc.n_patches),
        "grid": list(pc.grid) if pc.grid else None,
        "source_hash": ImageStream(list(samples), image_size, batch_size).source_hash(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ccad_version": __version__,
        "skipped": list(pc.skipped),
        "coreset": {"method": "greedy k-center of the PatchCore memory (itself a streaming greedy coreset)",
                    "memory_rows": int(memory.shape[0]), "seed": seed},
    }
    return FeatureBank(feats, meta)


@register_method
class PatchCore(Method):
    name = "patchcore"
    title = "PatchCore (baseline, bank only)"
    description = "nearest-neighbour distance to a 1 % coreset memory of backbone patch features"
    paper = "Roth et al. 2022"
    space = "feature"
    Config = PatchCoreConfig
    trainable = False
    multi_class = False

    @classmethod
    def migrate_v1(cls, old: dict[str, Any]) -> Any:
        return old.get("patchcore")

    def __init__(self, config: PatchCoreConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.scorer: Any = None

    def _backbone(self) -> Any:
        from ..features import get_backbone

        bc = self.ctx.bank_config
        return get_backbone(bc.backbone, layers=tuple(bc.layers), weights=bc.weights).to(self.ctx.device)

    def build_bank(self, train: Sequence[Any]) -> Any:
        """Fit the memory, then draw the bank from it (one pass); a second small pass only when
        the memory holds fewer than 4 xi rows to draw well-spread rows from."""
        from ..features import FeatureBank, PatchCoreScorer

        bc, ctx = self.ctx.bank_config, self.ctx
        bb = self._backbone()
        self.scorer = PatchCoreScorer(bb, ratio=self.config.ratio, k=self.config.k, image_size=ctx.image_size,
                                      batch_size=bc.batch_size, seed=ctx.seed, coreset=self.config.coreset)
        self.scorer.fit(list(train), progress=ctx.progress, cancel=ctx.cancel)
        if self.scorer.memory_bank.shape[0] >= 4 * bc.size:
            return bank_from_memory(self.scorer, train, bc.size, ctx.image_size, bc.batch_size, ctx.seed)
        return FeatureBank.build(list(train), bb, size=bc.size, image_size=ctx.image_size,
                                 batch_size=bc.batch_size, progress=ctx.progress, cancel=ctx.cancel, seed=ctx.seed)

    def build(self, train: Sequence[Any]) -> None:
        if self.scorer is None:  # a bank was given: the memory still needs its own pass
            self.build_bank(train)

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> MethodOutput:
        from ..scoring.domain import patch_median

        raw = self.scorer.score_maps(x).float()
        maps = F.interpolate(raw, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return MethodOutput(gaussian_blur(maps, scaled_sigma(self.ctx.scoring.sigma, x.shape[-1])),
                            domain=patch_median(raw))

    def to(self, device: torch.device) -> "PatchCore":
        if self.scorer is not None and hasattr(self.scorer, "to"):
            self.scorer.to(device)
        return self

    def card(self) -> dict[str, Any]:
        rows = None if self.scorer is None else int(self.scorer.memory_bank.shape[0])
        return {"parameters": None, "memory_rows": rows}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.scorer.to_tensors().items()},
                  str(Path(directory) / MEMORY_FILE))

    @classmethod
    def load(cls, directory: Path, config: PatchCoreConfig, ctx: Context) -> "PatchCore":
        from safetensors.torch import load_file

        from ..features import PatchCoreScorer

        f = saved_part(directory, MEMORY_FILE, "PatchCore's memory bank")
        method = cls(config, ctx)
        method.scorer = PatchCoreScorer.from_tensors(load_file(str(f)), method._backbone())
        return method
