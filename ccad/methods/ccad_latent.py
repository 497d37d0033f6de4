"""CCAD(C) and CCAD(F): latent-space denoisers conditioned on a feature bank (CCAD sec. 3.3, Fig. 3b).

Both work on unit-variance latents ``z0 = E(x)`` of one autoencoder (:mod:`ccad.methods.latent`)
and train eq. 10-11, ``|| eps - eps_Theta^t(z_t; x; B) ||^2``:

- the denoiser is a diffusers ``UNet2DConditionModel`` whose cross-attention context is the
  projected bank (the GCB of Fig. 3b: LN + SelfAttn -> LN + CrossAttn(bank) -> LN + FF), plus a
  ``ControlNetModel`` branch fed the input image x (DiAD's semantic-guided role, which the paper
  builds on; ``controlnet=False`` drops it);
- CCAD(C) conditions on the Coarse Feature Bank B_c built from the ImageNet backbone (eq. 6);
- CCAD(F) builds B_c from the latent encoder's own patch features (METHOD.md item 8) and refines
  it per image with the Fine Compression Module: ``B_f = tau_theta(D_bs; B_c)`` (eq. 7-8), Q from
  the image's own latent patch features, K / V from B_c; tau is trained jointly (eq. 10).

Reconstruction (eq. 9 / 19): noise the test latent to ``start_step`` (default T - 1, the paper's
start from z_T), DDIM back in ``steps`` steps (10 by default, eq. 18's direction term), decode,
then the anomaly map of eq. 16 between x and the decoded reconstruction, plus
``latent_weight`` times the latent distance ``|z0 - z0_hat|`` (optional; 0 by default). One
model covers every category of the training data (multi-class); no category at inference.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, at_least
from ..scoring.anomaly_map import anomaly_map
from .base import Context, MethodOutput, check_preset, register_method
from .dynamic_start import DynamicStartMixin
from .latent import DEFAULT_AUTOENCODER, LatentMethod, check_autoencoder_spec, latent_bank


@dataclass
class LatentDiffusionConfig:
    """The noise schedule (SD's: scaled-linear beta 0.00085 ... 0.012, T = 1000) and the DDIM
    reconstruction of eq. 9 / 19 (``start_step`` None = T - 1; ``eta`` 0 = deterministic).

    ``start_policy``: "fixed" (every image starts at ``start_step``) or "dynamic": D3AD's per-image
    start step (papers/d3ad.md sec. 4.1, Algorithm 2; :mod:`ccad.methods.dynamic_start`) with
    T_max = ``start_step`` and D3AD's defaults (K = 20 L1 neighbours of the scoring extractor's
    layer-2 features, 10 equal-width bins, minimum bin 2); the batch is grouped by start step."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    start_step: Optional[int] = None
    steps: int = 10
    eta: float = 0.0
    seed: int = 0
    start_policy: str = "fixed"

    def validate(self) -> None:
        T = int(self.num_train_timesteps)
        if self.start_policy not in ("fixed", "dynamic"):
            raise ConfigError(f"method.diffusion.start_policy must be 'fixed' or 'dynamic', got {self.start_policy!r}")
        if self.start_step is not None and not 1 <= int(self.start_step) < T:
            raise ConfigError(f"method.diffusion.start_step must be in 1..{T - 1} (or None for T-1), "
                              f"got {self.start_step}")
        at_least(self, 1, "steps", section="method.diffusion")


@dataclass
class CCADLatentConfig:
    """CCAD(C)/(F) settings.

    ``preset``: the UNet / ControlNet size (tiny: tests, small: CPU, base: SD 1.5 widths, a GPU);
    ``pretrained_unet``: an SD-style UNet (a local folder or Hub id) to initialise from (random
    init when None); ``autoencoder``: the latent autoencoder spec; ``controlnet``: the input-image
    branch; ``latent_weight``: weight of the optional latent-distance term of the map;
    ``cross_attention_dim``: the bank's projected width; ``domain_adapt_epochs`` > 0 fine-tunes the
    scoring extractor on (x, x_hat) pairs of good images after training (D3AD eq. 10). Filled in at build time:
    ``latent_channels``, ``latent_scale``, ``latent_shift``, ``bank_dim``.
    """

    preset: str = "small"
    autoencoder: str = DEFAULT_AUTOENCODER
    pretrained_unet: Optional[str] = None
    controlnet: bool = True
    cross_attention_dim: int = 128
    latent_weight: float = 0.0
    domain_adapt_epochs: int = 0
    diffusion: LatentDiffusionConfig = field(default_factory=LatentDiffusionConfig)
    latent_channels: Optional[int] = None
    latent_scale: Optional[float] = None
    latent_shift: Optional[float] = None
    bank_dim: Optional[int] = None

    def validate(self) -> None:
        check_preset(self.preset)
        check_autoencoder_spec(self.autoencoder)
        at_least(self, 0, "latent_weight", "domain_adapt_epochs")
        self.diffusion.validate()


@dataclass
class CCADFConfig(CCADLatentConfig):
    """CCAD(F) adds the Fine Compression Module (eq. 7-8): ``fcm_heads`` attention heads over the
    latent patch features of a ``bank_kernel`` x ``bank_kernel`` neighbourhood; the coarse latent
    bank draws ``bank_per_image`` patches of every good image into its streaming coreset;
    ``query_stride`` subsamples the query grid (the fine bank has one row per query patch). A head count
    that does not divide the bank width is lowered to the largest one that does, with a warning, and
    written back into the config."""

    fcm_heads: int = 4
    bank_kernel: int = 3
    bank_per_image: int = 64
    query_stride: int = 2

    def validate(self) -> None:
        super().validate()
        at_least(self, 1, "fcm_heads", "bank_kernel", "query_stride")
        at_least(self, 0, "bank_per_image")


def fcm_head_count(bank_dim: int, requested: int) -> int:
    """The largest head count <= ``requested`` that divides ``bank_dim`` (the FCM's width, eq. 7-8)."""
    for h in range(max(1, int(requested)), 0, -1):
        if int(bank_dim) % h == 0:
            return h
    return 1


def _scheduler_of(d: LatentDiffusionConfig) -> Any:
    from ..diffusion import make_scheduler

    return make_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)


def _components(controlnet: bool, fcm: bool) -> dict[str, type]:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ..models.fcm import FineCompressionModule
    from ..models.latent_denoiser import BankProjector

    comps: dict[str, type] = {"unet": UNet2DConditionModel, "bank_proj": BankProjector}
    if controlnet:
        comps["controlnet"] = ControlNetModel
    if fcm:
        comps["fcm"] = FineCompressionModule
    return comps


class _CCADLatentBase(DynamicStartMixin, LatentMethod):
    Config = CCADLatentConfig
    # CCAD sec. 3.3 / Table 5: the bank condition improves the reconstruction; its ablation removes it
    ablation = "no bank condition (an all-zero bank as the cross-attention context; no FCM)"
    needs_images = True
    uses_fcm = False
    default_image_size = 256

    def __init__(self, config: Any, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.needs_images = bool(config.controlnet)
        self.scheduler = _scheduler_of(config.diffusion)
        self.init_conditioning()

    @property
    def dynamic(self) -> bool:
        return self.config.diffusion.start_policy == "dynamic"

    def dic_params(self) -> dict[str, int]:
        """D3AD's DIC defaults (papers/d3ad.md sec. 5) with T_max = this method's start step."""
        from .d3ad import D3ADConfig

        d, dc = self.config.diffusion, D3ADConfig()
        t_max = d.start_step if d.start_step is not None else int(d.num_train_timesteps) - 1
        return {"K": dc.K, "n_bins": dc.n_bins, "min_bin": dc.min_bin, "T_max": int(t_max), "round_to": dc.round_to,
                "knn_layer": dc.knn_layer, "knn_pool": dc.knn_pool}

    # components depend on the config (ControlNet optional): the instance decides what it saves
    @property
    def _parts(self) -> dict[str, type]:
        return _components(bool(self.config.controlnet), self.uses_fcm)

    def build(self, train: Sequence[Any]) -> None:
        from ..models.fcm import FineCompressionModule
        from ..models.latent_denoiser import BankProjector, build_controlnet, build_latent_unet

        c = self.config
        ae = self.load_autoencoder()
        size = self.latent_size()
        unet = build_latent_unet(c.preset, int(ae.latent_channels), size, c.cross_attention_dim,
                                 pretrained=c.pretrained_unet)
        ctx_dim = int(unet.config.cross_attention_dim)
        c.cross_attention_dim = ctx_dim
        bank_dim = int(self.ctx.bank.features.shape[1])
        c.bank_dim = bank_dim
        self.modules["unet"] = unet
        self.modules["bank_proj"] = BankProjector(bank_dim, ctx_dim)
        if c.controlnet:
            self.modules["controlnet"] = build_controlnet(unet)
        if self.uses_fcm:
            heads = fcm_head_count(bank_dim, int(c.fcm_heads))
            if heads != int(c.fcm_heads):
                warnings.warn(f"method.fcm_heads={c.fcm_heads} does not divide the bank width {bank_dim}; the FCM "
                              f"uses {heads} heads (the largest count <= {c.fcm_heads} that does), and the saved "
                              f"config says so", UserWarning, stacklevel=2)
                c.fcm_heads = heads
            self.modules["fcm"] = FineCompressionModule(bank_dim, num_heads=heads)
        if self.dynamic:
            self.fit_conditioning(train)

    def after_training(self, train: Sequence[Any]) -> None:
        """Domain adaptation (D3AD eq. 10, when ``domain_adapt_epochs`` > 0); with dynamic start steps the
        KNN memory and bins are then refitted with the adapted extractor they are queried with
        (D3AD sec. 4.3: "domain-adapted features for both the dynamic implicit conditioning and f_map")."""
        super().after_training(train)
        if self.dynamic and getattr(self, "adapted", None):
            self.fit_conditioning(train)

    # ---- the condition -----------------------------------------------------------------------
    def _bank(self, modules: nn.ModuleDict, z0: torch.Tensor) -> torch.Tensor:
        """B_c (shared, CCAD(C)) or the per-image fine bank B_f = tau(D_bs; B_c) (CCAD(F), eq. 7-8)."""
        bank = self.ctx.bank_tensor().to(z0.device)
        if self.ablate:  # the ablation view: the bank condition removed (identical zero rows, FCM skipped)
            return torch.zeros_like(bank)
        if not self.uses_fcm:
            return bank
        from ..models.fcm import latent_patch_features

        c = self.config
        queries = latent_patch_features(z0, kernel=int(c.bank_kernel), stride=int(c.query_stride))
        return modules["fcm"](queries, bank)

    def _eps_fn(self, modules: nn.ModuleDict, z0: torch.Tensor, image: Optional[torch.Tensor]) -> Any:
        from ..models.latent_denoiser import latent_eps

        bank = self._bank(modules, z0)
        controlnet = modules["controlnet"] if "controlnet" in modules else None

        def eps_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return latent_eps(modules["unet"], controlnet, modules["bank_proj"], z_t, t, bank,
                              control_image=image if controlnet is not None else None)

        return eps_fn

    def training_loss(self, modules: nn.ModuleDict, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        from ..diffusion.latent import latent_eps_loss

        z0 = batch["latent"]
        return latent_eps_loss(self._eps_fn(modules, z0, batch.get("image")), z0, self.scheduler, generator)

    @torch.no_grad()
    def _reconstruct(self, modules: nn.ModuleDict, x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(z0, z0_hat, x_hat, start steps or None)``. Every image draws its noise from its own
        generator seeded with ``diffusion.seed``, so its reconstruction is the one it gets alone,
        whatever batch (or start-step group) it is in."""
        from ..diffusion.latent import latent_ddim_reconstruct
        from ..diffusion.objectives import image_generators

        d = self.config.diffusion
        z0 = self.encode(x)
        gens = image_generators(int(d.seed), x.shape[0], x.device)
        if not self.dynamic:
            z_hat = latent_ddim_reconstruct(self._eps_fn(modules, z0, x), z0, self.scheduler, start_step=d.start_step,
                                            steps=int(d.steps), eta=float(d.eta), generator=gens)
            return z0, z_hat, self.decode(z_hat), None
        starts = self.start_steps(x)  # D3AD Algorithm 2: one DDIM run per distinct start step
        z_hat = torch.empty_like(z0)
        for s in torch.unique(starts).tolist():
            idx = (starts == s).nonzero().flatten().to(z0.device)
            z_hat[idx] = latent_ddim_reconstruct(self._eps_fn(modules, z0[idx], x[idx]), z0[idx], self.scheduler,
                                                 start_step=int(s), steps=min(int(d.steps), int(s)), eta=float(d.eta),
                                                 generator=[gens[i] for i in idx.tolist()])
        return z0, z_hat, self.decode(z_hat), starts

    def preview(self, modules: nn.ModuleDict, image: torch.Tensor) -> Optional[np.ndarray]:
        x_hat = self._reconstruct(modules, image)[2]
        return x_hat[0].permute(1, 2, 0).cpu().numpy()

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> MethodOutput:
        from ..diffusion.latent import latent_distance_map

        sc, c = self.ctx.scoring, self.config
        z0, z_hat, x_hat, starts = self._reconstruct(self.modules, x)
        maps = anomaly_map(x, x_hat, self.ctx.scoring_backbone(), pixel_weight=sc.pixel_weight, sigma=sc.sigma,
                           match=sc.feature_match or "same", radius=sc.match_radius)
        if c.latent_weight > 0:
            maps = maps + float(c.latent_weight) * latent_distance_map(z0, z_hat, x.shape[-2:])
        return MethodOutput(maps, x_hat, start_steps=starts)

    def card(self) -> dict[str, Any]:
        d = self.config.diffusion
        start = d.start_step if d.start_step is not None else int(d.num_train_timesteps) - 1
        facts = {"strategy": "ddim from the noised latent (eq. 9/19)", "start_step": start, "steps": d.steps,
                 "eta": d.eta, "controlnet": bool(self.config.controlnet), "start_policy": d.start_policy}
        if self.dynamic:
            facts["dynamic_start"] = self.conditioning_card()
        return {**super().card(), "reconstruction": facts}

    def component_classes(self) -> dict[str, type]:
        return self._parts

    def save(self, directory: Any) -> None:
        from pathlib import Path

        super().save(directory)  # the networks, vae/ and an adapted extractor (LatentMethod / Method)
        if self.dynamic:
            self.save_conditioning(Path(directory))

    @classmethod
    def load(cls, directory: Any, config: Any, ctx: Context) -> "_CCADLatentBase":
        from pathlib import Path

        method = super().load(directory, config, ctx)
        if method.dynamic:
            method.load_conditioning(Path(directory))
        return method


@register_method
class CCADC(_CCADLatentBase):
    name = "ccad-c"
    title = "CCAD(C): latent-space, coarse bank"
    description = ("latent UNet + ControlNet with the backbone's coarse feature bank as cross-attention context; "
                   "multi-class")
    paper = "CCAD sec. 3.3, Fig. 3b, eq. 11, 19"
    Config = CCADLatentConfig


@register_method
class CCADF(_CCADLatentBase):
    name = "ccad-f"
    title = "CCAD(F): latent-space, FCM-refined bank"
    description = ("latent UNet + ControlNet conditioned on the fine bank tau(D_bs; B_c) of the latent encoder's "
                   "features (FCM, eq. 7-8); multi-class")
    paper = "CCAD sec. 3.2-3.3, eq. 7-10"
    Config = CCADFConfig
    uses_fcm = True

    def build_bank(self, train: Sequence[Any]) -> Any:
        c = self.config
        return latent_bank(self, train, self.ctx.bank_config.size, int(c.bank_kernel), int(c.bank_per_image),
                           self.ctx.seed)
