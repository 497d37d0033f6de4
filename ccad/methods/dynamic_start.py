"""D3AD's dynamic implicit conditioning as a reusable start-step policy (papers/d3ad.md sec. 4.1, Algorithm 2).

:class:`DynamicStartMixin` gives a method the KNN memory of its training images' features
(``Y_Train``), their leave-one-out mean L1 KNN distances and the |B| equal-width bins over them, and
the per-image start step ``T_hat = floor(b / |B| * T_max)`` (minimum bin, rounded) of a batch. D3AD
uses it, and the CCAD latent variants with ``diffusion.start_policy = "dynamic"``. A method supplies
:meth:`DynamicStartMixin.dic_params` (K, n_bins, min_bin, T_max, round_to, knn_layer, knn_pool); the
features come from ``ctx.scoring_backbone()`` (the domain-adapted one, when adapted). The memory and
bins are saved as ``d3ad_conditioning.safetensors`` in the detector folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..config import ConfigError
from .base import saved_part

CONDITIONING_FILE = "d3ad_conditioning.safetensors"


class DynamicStartMixin:
    """KNN memory + bins + per-image start steps (Algorithm 2) for a :class:`ccad.methods.base.Method`."""

    ctx: Any
    knn_features: Optional[torch.Tensor]
    train_distances: Optional[torch.Tensor]
    bin_edges: Optional[torch.Tensor]

    def init_conditioning(self) -> None:
        self.knn_features = None  # N x D training features Y_Train
        self.train_distances = None  # N leave-one-out mean KNN distances
        self.bin_edges = None  # n_bins + 1 equal-width edges

    def dic_params(self) -> dict[str, int]:
        raise NotImplementedError

    def _layer_index(self) -> int:
        layer = int(self.dic_params()["knn_layer"])
        layers = [int(i) for i in getattr(self.ctx.scoring_backbone(), "layers", ())]
        if layer not in layers:
            raise ConfigError(f"the KNN layer {layer} (method.knn_layer) is not one of the scoring backbone's "
                              f"layers {layers} (scoring.score_layers)")
        return layers.index(layer)

    @torch.no_grad()
    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """y0 = phi_j(x0) (Algorithm 2 line 4), ``B x D``."""
        from ..diffusion.d3ad import image_features

        return image_features(self.ctx.scoring_backbone(), x.to(self.ctx.device), self._layer_index(),
                              int(self.dic_params()["knn_pool"]))

    @torch.no_grad()
    def fit_conditioning(self, train: Sequence[Any]) -> None:
        """Y_Train, the leave-one-out mean KNN distances of the training set and the equal-width
        bins over them (sec. 4.1 "Bin construction")."""
        from ..data.dataset import iter_batches
        from ..diffusion.d3ad import fit_bins, knn_mean_distance

        p = self.dic_params()
        feats = [self.image_features(b["image"]).cpu()
                 for b in iter_batches(list(train), self.ctx.image_size, batch_size=self.ctx.bank_config.batch_size)]
        if not feats:
            raise ConfigError("dynamic start steps need good training images for the KNN memory")
        mem = torch.cat(feats)
        if mem.shape[0] < 2:
            raise ConfigError("dynamic start steps need at least 2 good training images (leave-one-out distances)")
        self.knn_features = mem
        self.train_distances = knn_mean_distance(mem, mem, k=int(p["K"]), leave_one_out=True).cpu()
        self.bin_edges = fit_bins(self.train_distances, int(p["n_bins"]))

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """ybar0 of Algorithm 2 line 6 for a batch (mean L1 distance to the K nearest training images)."""
        from ..diffusion.d3ad import knn_mean_distance

        if self.knn_features is None:
            raise RuntimeError("the KNN memory of the dynamic start steps is not fitted (build() or load() first)")
        return knn_mean_distance(self.image_features(x), self.knn_features.to(self.ctx.device),
                                 k=int(self.dic_params()["K"])).cpu()

    def start_steps(self, x: torch.Tensor) -> torch.Tensor:
        """T_hat per image, g(x0, X_Train, T_max) of Algorithm 2 (a CPU LongTensor). Stored nowhere:
        the method returns it in its output (``MethodOutput.start_steps``), since inference runs
        from several threads at once."""
        from ..diffusion.d3ad import start_steps

        p = self.dic_params()
        return start_steps(self.distances(x), self.bin_edges, int(p["T_max"]), int(p["min_bin"]), int(p["round_to"]))

    def fixed_start(self) -> int:
        """The one start step of the fixed-start variant (the ablation view of a dynamic start): the
        start Algorithm 2 gives the median good training image (median of the start steps of the
        training set's leave-one-out KNN distances), so good images start about where they would
        dynamically and only the per-image adaptation is removed."""
        from ..diffusion.d3ad import start_steps

        if self.train_distances is None or self.bin_edges is None:
            raise RuntimeError("the KNN memory of the dynamic start steps is not fitted (build() or load() first)")
        p = self.dic_params()
        steps = start_steps(self.train_distances, self.bin_edges, int(p["T_max"]), int(p["min_bin"]),
                            int(p["round_to"]))
        return int(steps.median())

    def conditioning_card(self) -> dict[str, Any]:
        from ..diffusion.d3ad import bin_start_step

        p = self.dic_params()
        facts: dict[str, Any] = {"T_max": int(p["T_max"]), "n_bins": int(p["n_bins"]), "min_bin": int(p["min_bin"]),
                                 "K": int(p["K"])}
        if self.bin_edges is not None:
            n = int(p["n_bins"])
            steps = bin_start_step(torch.arange(1, n + 1), n, int(p["T_max"]), int(p["min_bin"]), int(p["round_to"]))
            facts["bin_edges"] = [round(float(e), 6) for e in self.bin_edges]
            facts["start_step_per_bin"] = {b + 1: int(s) for b, s in enumerate(steps)}
            facts["n_train_features"] = int(self.knn_features.shape[0]) if self.knn_features is not None else None
        return facts

    def save_conditioning(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.knn_features is None or self.bin_edges is None or self.train_distances is None:
            raise RuntimeError("nothing to save: the KNN memory and bins of the dynamic start steps were never fitted")
        save_file({"features": self.knn_features.float().contiguous(),
                   "train_distances": self.train_distances.float().contiguous(),
                   "bin_edges": self.bin_edges.double().contiguous()},
                  str(Path(directory) / CONDITIONING_FILE), metadata={k: str(v) for k, v in self.dic_params().items()})

    def load_conditioning(self, directory: Path) -> None:
        from safetensors.torch import load_file

        path = saved_part(directory, CONDITIONING_FILE, "the KNN memory and bins of its dynamic start steps")
        t = load_file(str(path))
        self.knn_features, self.train_distances, self.bin_edges = t["features"], t["train_distances"], t["bin_edges"]
