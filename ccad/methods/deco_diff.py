"""DeCo-Diff: deviation correction in the latent space (DeCo-Diff §4, supplement D).

Training (eq. 10-12): random patch masks (r_mask ~ U[0, 0.7], patch sizes {1, 2, 4, 8} latent
cells) choose the latent patches that deviate, some of them by patches of other images of the
batch (r_shuffle ~ U[0, 0.3]); the network (a diffusers ``UNet2DModel``, unconditional) predicts
the deviation eta over T = 10 steps. Inference (eq. 13-14): no forward noising: the test latent
itself is z_T, and 5 deterministic correction steps give z~_0. Map (eq. 15): the geometric mean
of the clipped latent and pixel deviations, ``gamma_l = 0.2``, ``gamma_p = 0.4`` (pixel
deviation between the decoded latent and the decoded correction, in [-1, 1] units as the paper's
gamma_p assumes). One model covers every category (multi-class).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from diffusers import UNet2DModel
from torch import nn

from ..config import ConfigError, ScoringConfig
from ..models.deco_net import build_deco_unet
from .base import Context, MethodOutput, check_preset, register_method
from .latent import DEFAULT_AUTOENCODER, LatentMethod, check_autoencoder_spec


@dataclass
class DecoDiffConfig:
    """DeCo-Diff settings (paper defaults): ``T`` training steps, ``steps`` correction steps,
    ``r_mask_max`` / ``r_shuffle_max``, the map's ``gamma_l`` / ``gamma_p``, ``strategy``
    ("z_t-1" as the paper's default, or "z0", table 3). Filled in at build time:
    ``latent_channels``, ``latent_scale``, ``latent_shift``."""

    preset: str = "small"
    autoencoder: str = DEFAULT_AUTOENCODER
    T: int = 10
    steps: int = 5
    r_mask_max: float = 0.7
    r_shuffle_max: float = 0.3
    gamma_l: float = 0.2
    gamma_p: float = 0.4
    strategy: str = "z_t-1"
    latent_channels: Optional[int] = None
    latent_scale: Optional[float] = None
    latent_shift: Optional[float] = None

    def validate(self) -> None:
        check_preset(self.preset)
        check_autoencoder_spec(self.autoencoder)
        if not 1 <= int(self.steps) <= int(self.T):
            raise ConfigError(f"method.steps must be in 1..T={self.T}, got {self.steps}")
        if not 0 <= float(self.r_mask_max) <= 1 or not 0 <= float(self.r_shuffle_max) <= 1:
            raise ConfigError("method.r_mask_max and method.r_shuffle_max must be in [0, 1]")
        if float(self.gamma_l) <= 0 or float(self.gamma_p) <= 0:
            raise ConfigError("method.gamma_l and method.gamma_p must be > 0")
        if self.strategy not in ("z_t-1", "z0"):
            raise ConfigError(f"method.strategy must be 'z_t-1' or 'z0', got {self.strategy!r}")


@register_method
class DecoDiff(LatentMethod):
    name = "deco-diff"
    title = "DeCo-Diff: deviation correction"
    description = "latent UNet trained on masked deviations; corrects the test latent without noising; multi-class"
    paper = "DeCo-Diff sec. 4, eq. 10-15"
    Config = DecoDiffConfig
    uses_bank = False
    default_image_size = 256

    @classmethod
    def default_scoring(cls) -> ScoringConfig:
        # the reference implementation's image score is the map's max (ccad.diffusion.deco.deco_anomaly_map);
        # the mean of the top 1 % (scoring.score="topk", topk_ratio=0.01) stays an option: eq. 15's map
        # saturates at 1 where both deviations exceed gamma, which can tie many maxima
        return ScoringConfig(score="max", sigma=0.0)

    components = {"net": UNet2DModel}
    # sec. 4's learned part is the correction; its ablation takes zero correction steps (z_tilde = z0),
    # which leaves eq. 15's pixel term between the input and its autoencoder round trip
    ablation = "zero correction steps (the autoencoder round trip alone: eq. 15's pixel term, input vs decode(z0))"

    def __init__(self, config: DecoDiffConfig, ctx: Context) -> None:
        from ..diffusion.deco import deco_scheduler

        super().__init__(config, ctx)
        self.scheduler = deco_scheduler(int(config.T))

    def build(self, train: Sequence[Any]) -> None:
        ae = self.load_autoencoder()
        self.modules["net"] = build_deco_unet(self.config.preset, int(ae.latent_channels), self.latent_size())

    def training_loss(self, modules: nn.ModuleDict, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        from ..diffusion.deco import deco_loss

        c = self.config
        return deco_loss(modules["net"], batch["latent"], self.scheduler, generator,
                         r_mask_max=float(c.r_mask_max), r_shuffle_max=float(c.r_shuffle_max))

    @torch.no_grad()
    def _correct(self, modules: nn.ModuleDict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ..diffusion.deco import deco_correct

        z0 = self.encode(x)
        return z0, deco_correct(modules["net"], z0, self.scheduler, steps=int(self.config.steps),
                                strategy=self.config.strategy)

    def preview(self, modules: nn.ModuleDict, image: torch.Tensor) -> Optional[np.ndarray]:
        _, z_tilde = self._correct(modules, image)
        return self.decode(z_tilde)[0].permute(1, 2, 0).cpu().numpy()

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> MethodOutput:
        from ..diffusion.deco import deco_anomaly_map

        c = self.config
        if self.ablate:  # the ablation view: the network is never called
            from ..diffusion.deco import deco_pixel_term

            x_rt = self.decode(self.encode(x))
            return MethodOutput(deco_pixel_term(x, x_rt, float(c.gamma_p)), x_rt)
        z0, z_tilde = self._correct(self.modules, x)
        x0, x_tilde = self.decode(z0), self.decode(z_tilde)
        maps = deco_anomaly_map(z0, z_tilde, x0, x_tilde, gamma_l=float(c.gamma_l), gamma_p=float(c.gamma_p))
        return MethodOutput(maps, x_tilde)

    def card(self) -> dict[str, Any]:
        c = self.config
        return {**super().card(), "reconstruction": {"strategy": f"deviation correction ({c.strategy})",
                                                     "steps": c.steps, "T": c.T, "gamma_l": c.gamma_l,
                                                     "gamma_p": c.gamma_p}}
