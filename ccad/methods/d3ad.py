"""D3AD: dynamic implicit conditioning in a latent diffusion model (papers/d3ad.md sec. 4, App. A).

- Denoiser: an *unconditional* latent UNet (sec. 4: "we adopt the architecture of unconditional
  latent diffusion model"; sec. 5: "an unconditional Unet from Rombach et al."), a diffusers
  ``UNet2DModel`` (:func:`ccad.models.deco_net.build_deco_unet`, the same builder DeCo-Diff
  uses), trained with the plain eps-loss of eq. 6 ("without modifications") on the cached latents
  of the shared autoencoder. Schedule (App. A.1): T = 1000, betas 0.0015 ... 0.0195 on LDM's
  "linear" schedule, which is diffusers' ``scaled_linear`` (LDM squares a linspace of sqrt(beta)).
- Dynamic implicit conditioning (sec. 4.1, Algorithm 2): the mean L1 distance of the image's
  block-2 features (``knn_layer``) to its K = 20 nearest training images, placed into |B| = 10
  equal-width bins fitted on the training set's leave-one-out distances, gives the per-image
  start step ``T_hat = floor(b / |B| * T_max)`` (minimum bin 2, T_max = 80, rounded to a
  multiple of 10). The training features and bin edges are saved with the model
  (``d3ad_conditioning.safetensors``). The features come from the scoring extractor phi (the
  paper uses one ResNet-34 for the DIC and the map, sec. 5); after domain adaptation the DIC
  memory and bins are refitted with the adapted phi (sec. 4.3: "domain-adapted features for both
  the dynamic implicit conditioning and ... f_map").
- Reconstruction (Algorithm 1): noiseless scaling ``z_T_hat = sqrt(abar_T_hat) z0``, DDIM with
  skip 10 (eq. 7, sigma = 0), optional DDAD correction (eq. 8, ``guidance``: App. A.1 uses 0
  or 7-10), one run per distinct start step of the batch.
- Map (eq. 9): ``lambda * ||z0 - z0_hat||_1 + (1 - lambda) * f_map``, lambda = 0.85, f_map the
  feature cosine map of blocks 2 and 3 (``scoring.score_layers``, App. A.1), each map divided by
  its mean over held-out good images (the selection part of the held-out slice, never the
  training images the UNet reconstructs best; the training images only when nothing was held
  out; the paper's "normalized" is unspecified), Gaussian sigma = 4,
  image score = max (sec. 4.2).
- Domain adaptation (sec. 4.3, eq. 10): ``domain_adapt_epochs`` (App. A.1: 0 to 3) through the
  shared hook :mod:`ccad.methods.adaptation`.
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
from .base import Context, MethodOutput, check_preset, register_method
from .dynamic_start import CONDITIONING_FILE, DynamicStartMixin  # noqa: F401  (CONDITIONING_FILE re-exported)
from .latent import DEFAULT_AUTOENCODER, LatentMethod, check_autoencoder_spec

NORM_FILE = "d3ad_normalisation.json"  # where l_norm / f_norm were fitted (fitted state, beside the weights)



@dataclass
class D3ADConfig:
    """D3AD settings (paper defaults, App. A.1 / sec. 5).

    ``preset``: the latent UNet size (tiny / small / base, :data:`ccad.models.presets.UNET_PRESETS` ``["deco"]``);
    ``K``, ``n_bins``, ``min_bin``, ``T_max``, ``round_to``: the DIC (Algorithm 2); ``knn_layer``:
    the scoring extractor's layer of the KNN features (block 2), ``knn_pool``: average-pool that map
    to ``knn_pool x knn_pool`` before the KNN (0 = the full map as the paper; pooling caps the
    saved memory); ``skip`` / ``steps``: the DDIM grid (skip 10 in T = 1000; ``steps`` None =
    T_hat // skip evaluations); ``guidance``: DDAD's temperature (eq. 8; 0 = none); ``lam``:
    eq. 9's lambda; ``norm_images``: held-out good images (the selection part) whose mean l_map /
    f_map normalise the two maps (0 = no normalisation); the schedule fields; ``domain_adapt_*``:
    eq. 10 (epochs 0 = off).
    Filled in at build time: ``latent_channels``, ``latent_scale``, ``latent_shift``. ``l_norm`` /
    ``f_norm`` are never written now (the fitted normalisers are fitted state, ``d3ad_normalisation.json``);
    they are read from models saved by an older ccad, which wrote them here.
    """

    preset: str = "small"
    autoencoder: str = DEFAULT_AUTOENCODER
    K: int = 20
    n_bins: int = 10
    min_bin: int = 2
    T_max: int = 80
    round_to: int = 10
    knn_layer: int = 2
    knn_pool: int = 16
    skip: int = 10
    steps: Optional[int] = None
    guidance: float = 0.0
    lam: float = 0.85
    norm_images: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    domain_adapt_epochs: int = 1
    domain_adapt_images: int = 32
    domain_adapt_lr: float = 1e-4
    latent_channels: Optional[int] = None
    latent_scale: Optional[float] = None
    latent_shift: Optional[float] = None
    l_norm: Optional[float] = None
    f_norm: Optional[float] = None

    def validate(self) -> None:
        check_preset(self.preset)
        check_autoencoder_spec(self.autoencoder)
        at_least(self, 1, "K", "n_bins", "T_max", "round_to", "skip")
        if not 1 <= int(self.min_bin) <= int(self.n_bins):
            raise ConfigError(f"method.min_bin must be in 1..n_bins={self.n_bins}, got {self.min_bin}")
        if not int(self.T_max) < int(self.num_train_timesteps):
            raise ConfigError(f"method.T_max must be < num_train_timesteps={self.num_train_timesteps}, "
                              f"got {self.T_max}")
        at_least(self, 1, "steps", optional=True)
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ConfigError(f"method.lam must be in [0, 1], got {self.lam}")
        at_least(self, 0, "knn_pool", "norm_images", "domain_adapt_epochs", "domain_adapt_images")


@register_method
class D3AD(DynamicStartMixin, LatentMethod):
    name = "d3ad"
    title = "D3AD: dynamic implicit conditioning"
    description = ("unconditional latent UNet; per-image start step from a KNN anomaly estimate, noiseless "
                   "scaling, latent + feature map; multi-class")
    paper = "D3AD sec. 4, Algorithms 1-2, eq. 6, 9, 10"
    Config = D3ADConfig
    uses_bank = False
    components = {"unet": UNet2DModel}
    default_image_size = 256
    # sec. 4.1's claim is the per-image start step; its ablation is one fixed start for every image
    # (the median good training image's; the map normalisers l_norm / f_norm stay the model's)
    ablation = "fixed start step (the median good training image's start, for every image)"

    @classmethod
    def default_scoring(cls) -> ScoringConfig:
        # App. A.1: the map uses feature blocks 2 and 3, Gaussian sigma = 4; image score = max (sec. 4.2)
        return ScoringConfig(score_layers=(2, 3), sigma=4.0, score="max")

    def __init__(self, config: D3ADConfig, ctx: Context) -> None:
        from ..diffusion import make_scheduler

        super().__init__(config, ctx)
        c = config
        self.scheduler = make_scheduler(c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end)
        self.init_conditioning()
        self.norm_fit: Optional[dict[str, Any]] = None  # where l_norm / f_norm were fitted (the card says)

    def dic_params(self) -> dict[str, int]:
        c = self.config
        return {"K": c.K, "n_bins": c.n_bins, "min_bin": c.min_bin, "T_max": c.T_max, "round_to": c.round_to,
                "knn_layer": c.knn_layer, "knn_pool": c.knn_pool}

    # ---- building and training ----------------------------------------------------------------
    def build(self, train: Sequence[Any]) -> None:
        ae = self.load_autoencoder()
        self.modules["unet"] = build_deco_unet(self.config.preset, int(ae.latent_channels), self.latent_size())
        self.fit_conditioning(train)

    def training_loss(self, modules: nn.ModuleDict, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        from ..diffusion.objectives import noise_prediction_loss

        unet = modules["unet"]
        return noise_prediction_loss(lambda z, t: unet(z, t).sample, batch["latent"], self.scheduler, generator)

    def after_training_phase(self) -> Optional[str]:
        first = super().after_training_phase()
        norm = f"fitting the map normalisers on {int(self.config.norm_images)} good images"
        return f"{first}, then {norm}" if first else norm

    def after_training(self, train: Sequence[Any]) -> None:
        """Domain adaptation (eq. 10, when ``domain_adapt_epochs`` > 0), then the DIC refitted
        with the adapted extractor, then the map normalisers from the selection part of the
        held-out good images (``ctx.held_out``; the training images only when nothing was held
        out, and the card says which)."""
        super().after_training(train)
        if getattr(self, "adapted", None):
            self.fit_conditioning(train)
        held = list(self.ctx.held_out)
        self.fit_normalisers(held if held else train)
        if self.norm_fit is not None:
            self.norm_fit["source"] = ("held-out good images (the selection part)" if held
                                       else "training images (nothing held out)")

    def selects_on_held_out(self) -> list[str]:
        return ["D3AD's map normalisation (l_norm, f_norm)"] if int(self.config.norm_images) > 0 else []

    @torch.no_grad()
    def fit_normalisers(self, train: Sequence[Any]) -> None:
        """l_norm / f_norm: the mean latent and feature maps over up to ``norm_images`` good images
        (``train``: whatever good images the caller gives; :meth:`after_training` gives the
        selection part of the held-out slice)."""
        from ..data.dataset import iter_batches

        c = self.config
        c.l_norm = c.f_norm = None  # fitted state, never the config (an older ccad wrote them here)
        self.norm_fit = None
        n = int(c.norm_images)
        if n <= 0:
            return
        samples = list(train)
        if len(samples) > n:
            keep = np.random.default_rng(int(self.ctx.seed)).choice(len(samples), n, replace=False)
            samples = [samples[i] for i in sorted(keep.tolist())]
        self.to(self.ctx.device)
        ls, fs = [], []
        for b in iter_batches(samples, self.ctx.image_size, batch_size=min(8, self.ctx.bank_config.batch_size)):
            x = b["image"].to(self.ctx.device)
            l_map, f_map, _, _ = self._parts_of_map(x)
            ls.append(l_map.flatten(1).mean(1))
            fs.append(f_map.flatten(1).mean(1))
        self.norm_fit = {"n_images": int(torch.cat(ls).numel()), "l_norm": max(float(torch.cat(ls).mean()), 1e-8),
                         "f_norm": max(float(torch.cat(fs).mean()), 1e-8)}

    def normalisers(self) -> tuple[Optional[float], Optional[float]]:
        """``(l_norm, f_norm)`` of eq. 9's normalisation: the fitted ones (:meth:`fit_normalisers`,
        fitted state), else those an older ccad wrote into the config (None: no normalisation)."""
        fit = self.norm_fit or {}
        if "l_norm" in fit and "f_norm" in fit:
            return float(fit["l_norm"]), float(fit["f_norm"])
        return self.config.l_norm, self.config.f_norm

    # ---- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def _reconstruct(self, modules: nn.ModuleDict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from ..diffusion.d3ad import d3ad_reconstruct

        c = self.config
        z0 = self.encode(x)
        # the ablation view: one fixed start step for every image (DynamicStartMixin.fixed_start)
        starts = (torch.full((x.shape[0],), self.fixed_start(), dtype=torch.long) if self.ablate
                  else self.start_steps(x))
        unet = modules["unet"]
        z_hat = d3ad_reconstruct(lambda z, t: unet(z, t).sample, z0, self.scheduler, starts,
                                 steps=None if c.steps is None else int(c.steps), skip=int(c.skip),
                                 guidance=float(c.guidance))
        return z0, z_hat, starts

    def preview(self, modules: nn.ModuleDict, image: torch.Tensor) -> Optional[np.ndarray]:
        _, z_hat, _ = self._reconstruct(modules, image)
        return self.decode(z_hat)[0].permute(1, 2, 0).cpu().numpy()

    @torch.no_grad()
    def _parts_of_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(l_map, f_map, x_hat, T_hat), both maps Gaussian-smoothed (sigma of ``scoring``), un-normalised."""
        from ..diffusion.d3ad import latent_l1_map
        from ..scoring.anomaly_map import anomaly_map, gaussian_blur, scaled_sigma

        sc = self.ctx.scoring
        z0, z_hat, starts = self._reconstruct(self.modules, x)
        x_hat = self.decode(z_hat)
        size = tuple(x.shape[-2:])
        l_map = gaussian_blur(latent_l1_map(z0, z_hat, size), scaled_sigma(sc.sigma, x.shape[-1]))
        f_map = anomaly_map(x, x_hat, self.ctx.scoring_backbone(), pixel_weight=sc.pixel_weight, sigma=sc.sigma,
                            match=sc.feature_match or "same", radius=sc.match_radius)
        return l_map, f_map, x_hat, starts

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> MethodOutput:
        """Eq. 9: lambda * l_map + (1 - lambda) * f_map (the blur is linear, so smoothing the parts
        equals smoothing A_map)."""
        from ..diffusion.d3ad import d3ad_anomaly_map

        l_map, f_map, x_hat, starts = self._parts_of_map(x)
        l_norm, f_norm = self.normalisers()
        return MethodOutput(d3ad_anomaly_map(l_map, f_map, float(self.config.lam), l_norm, f_norm), x_hat,
                            start_steps=starts)

    # ---- device, card, files ------------------------------------------------------------------
    def card(self) -> dict[str, Any]:
        c = self.config
        facts: dict[str, Any] = {"strategy": "noiseless scaling + DDIM from a per-image start step (Alg. 1-2)",
                                 "skip": c.skip, "steps": c.steps, "guidance": c.guidance, "lam": c.lam,
                                 **self.conditioning_card()}
        if self.norm_fit is not None:
            facts["map_normalisation"] = dict(self.norm_fit)
        elif c.l_norm is not None or c.f_norm is not None:
            facts["map_normalisation"] = {"l_norm": c.l_norm, "f_norm": c.f_norm,
                                          "source": "written into config.json by an older ccad"}
        return {**super().card(), "reconstruction": facts}

    def save(self, directory: Path) -> None:
        super().save(directory)
        self.save_conditioning(directory)
        f = Path(directory) / NORM_FILE
        if self.norm_fit is not None:
            f.write_text(json.dumps(self.norm_fit, indent=1))
        elif f.is_file():  # never leave another model's normalisers behind
            f.unlink()

    @classmethod
    def load(cls, directory: Path, config: D3ADConfig, ctx: Context) -> "D3AD":
        method = super().load(directory, config, ctx)
        method.load_conditioning(directory)
        f = Path(directory) / NORM_FILE
        if f.is_file():  # older models have none: their normalisers are in config.json (normalisers())
            try:
                method.norm_fit = json.loads(f.read_text())
            except ValueError as exc:
                raise ConfigError(f"{f}: not readable JSON ({exc})") from None
        return method
