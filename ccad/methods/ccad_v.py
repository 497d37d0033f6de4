"""CCAD(V): the pixel-space denoiser conditioned on the Coarse Feature Bank (CCAD sec. 3.3, Fig. 3a).

Training: eq. 15, ``|| eps - eps_Theta(x_t; B_c) ||^2`` on good images in [-1, 1], with the
noise schedule of this method's ``diffusion`` section (so a changed beta schedule or T is the one
trained with and the one sampled with). Inference: DDAD-guided DDIM from the test image noised to
T' (eq. 12-14 with eq. 18's direction term), then the feature-cosine anomaly map of eq. 16 between
the image and its reconstruction.
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import at_least, DiffusionConfig
from ..models.denoiser import BankConditionedUNet, DenoiserConfig, images_to_model, model_to_images
from ..scoring.anomaly_map import anomaly_map
from .base import Context, Method, MethodOutput, check_preset, register_method

LEGACY_WEIGHTS = "denoiser.safetensors"  # version-1 folders kept the denoiser at the top level


@dataclass
class CCADVConfig:
    """CCAD(V) settings: the denoiser preset (tiny: tests, small: CPU, base: GPU, DDAD-like), the
    built architecture (``denoiser``, filled in at build time: its ``bank_dim`` is the width of
    the bank actually built), and the schedule + reconstruction (``diffusion``).
    ``domain_adapt_epochs`` > 0 fine-tunes the scoring extractor on (x, x_hat) pairs of good
    images after training (D3AD eq. 10, as DDAD does; :mod:`ccad.methods.adaptation`); 0 = off."""

    preset: str = "small"
    denoiser: Optional[DenoiserConfig] = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    preview_steps: int = 5
    domain_adapt_epochs: int = 0

    def validate(self) -> None:
        check_preset(self.preset)
        self.diffusion.validate()
        at_least(self, 0, "domain_adapt_epochs")
        if self.denoiser is not None:
            self.denoiser.validate()


def make_scheduler_of(d: DiffusionConfig) -> Any:
    from ..diffusion import make_scheduler

    return make_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)


@register_method
class CCADV(Method):
    name = "ccad-v"
    title = "CCAD(V): pixel-space, coarse bank"
    description = "pixel-space UNet with the coarse feature bank as cross-attention context, DDAD-guided reconstruction"
    paper = "CCAD sec. 3.3, Fig. 3a, eq. 12-16"
    space = "pixel"
    Config = CCADVConfig
    components = {"denoiser": BankConditionedUNet}
    # CCAD sec. 3.3 / Table 5: the bank condition improves the reconstruction; its ablation removes it
    ablation = "no bank condition (an all-zero bank as the cross-attention context)"
    default_image_size = 128

    @classmethod
    def migrate_v1(cls, old: dict[str, Any]) -> dict[str, Any]:
        return {"denoiser": old.get("denoiser"), "diffusion": old.get("diffusion") or {}}

    def __init__(self, config: CCADVConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.scheduler = make_scheduler_of(config.diffusion)

    def build(self, train: Sequence[Any]) -> None:
        bank_dim = int(self.ctx.bank.features.shape[1])
        spec = DenoiserConfig.preset(self.config.preset, sample_size=self.ctx.image_size, bank_dim=bank_dim)
        self.config.denoiser = spec
        self.modules["denoiser"] = BankConditionedUNet.from_spec(spec)

    def training_loss(self, modules: nn.ModuleDict, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        from ..diffusion import epsilon_loss

        x0 = images_to_model(batch["image"])
        return epsilon_loss(modules["denoiser"], x0, self.ctx.bank_tensor(), self.scheduler, generator=generator)

    @torch.no_grad()
    def _reconstruct(self, denoiser: nn.Module, x: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        from ..diffusion import ddad_reconstruct
        from ..diffusion.objectives import image_generators

        d = self.config.diffusion
        # one generator per image, each seeded alike: an image's DDAD noise (eta > 0) and so its
        # score are the same alone and in any batch (predict == predict_many, any batch size)
        gen = image_generators(d.seed, x.shape[0], x.device)
        bank = self.ctx.bank_tensor().to(x.device)
        if self.ablate:  # the ablation view: the same UNet with the bank condition removed
            bank = torch.zeros_like(bank)
        n = d.steps if steps is None else min(int(steps), d.start_step)
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            x_hat = ddad_reconstruct(denoiser, images_to_model(x), bank, self.scheduler,
                                     start_step=d.start_step, steps=n, guidance=d.guidance, eta=d.eta, generator=gen)
        return model_to_images(x_hat.float())

    def preview(self, modules: nn.ModuleDict, image: torch.Tensor) -> Optional[np.ndarray]:
        x_hat = self._reconstruct(modules["denoiser"], image, steps=self.config.preview_steps)
        return x_hat[0].permute(1, 2, 0).float().cpu().numpy()

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> MethodOutput:
        sc = self.ctx.scoring
        x_hat = self._reconstruct(self.modules["denoiser"], x)
        maps = anomaly_map(x, x_hat, self.ctx.scoring_backbone(), pixel_weight=sc.pixel_weight, sigma=sc.sigma,
                           match=sc.feature_match or "same", radius=sc.match_radius)
        return MethodOutput(maps, x_hat)

    def to(self, device: torch.device) -> "CCADV":
        super().to(device)
        if torch.device(device).type == "cuda":
            self.modules.to(memory_format=torch.channels_last)
        return self

    def card(self) -> dict[str, Any]:
        d = self.config.diffusion
        return {**super().card(), "reconstruction": {"strategy": d.strategy, "start_step": d.start_step,
                                                     "steps": d.steps, "guidance": d.guidance},
                "bank_condition_read": self.bank_is_read()}

    @classmethod
    def load(cls, directory: Path, config: CCADVConfig, ctx: Context) -> "CCADV":
        legacy = Path(directory) / LEGACY_WEIGHTS
        if not (Path(directory) / "denoiser").is_dir() and legacy.is_file():
            if config.denoiser is None:
                raise FileNotFoundError(f"{directory}: {LEGACY_WEIGHTS} without a denoiser config")
            method = cls(config, ctx)
            method.modules["denoiser"] = BankConditionedUNet.load_legacy(legacy, config.denoiser)
            return method._warn_if_bank_unread(directory)
        return super().load(directory, config, ctx)._warn_if_bank_unread(directory)

    def _denoiser_spec(self) -> Optional[DenoiserConfig]:
        return DenoiserConfig.from_config(self.modules["denoiser"].config) if "denoiser" in self.modules else None

    def bank_is_read(self) -> bool:
        """Whether this model's denoiser has a cross-attention block, i.e. reads the bank."""
        spec = self._denoiser_spec()
        return spec is None or spec.reads_bank()

    def _warn_if_bank_unread(self, directory: Path) -> "CCADV":
        spec = self._denoiser_spec()
        if spec is not None and not spec.reads_bank():
            warnings.warn(
                f"{directory}: this CCAD(V) model's denoiser has no cross-attention block at its "
                f"input size (attention_resolutions {list(spec.attention_resolutions)}, "
                f"grids {spec.level_resolutions()}), "
                "so it never reads the bank: it reconstructs as an unconditioned DDPM. Models built "
                "by this version attend on the deepest level at such sizes; retrain to get the bank "
                "condition.", UserWarning, stacklevel=3)
        return self
