"""What the latent methods share: the autoencoder, the latent cache, the ``vae/`` subfolder.

Every latent method (CCAD(C), CCAD(F), DeCo-Diff) works on ``z = E(x)``, the image encoded by
one :class:`ccad.models.autoencoder.LatentAutoencoder` (diffusers ``AutoencoderKL`` /
``AutoencoderTiny`` from a Hub id or a folder, or the project's TAEF2 module) and scaled to unit
variance. Training encodes the training set once into a memory-mapped cache in the run folder
(:func:`ccad.data.latent_cache.build_latent_cache`), so an epoch costs only the denoiser; the
autoencoder's scale / shift fitted on the good training latents are written back into the
method's config, and the autoencoder itself is saved in the detector folder's ``vae/``
subfolder (loadable alone with ``LatentAutoencoder.from_pretrained``), as a diffusers pipeline
keeps its VAE.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..config import ConfigError
from .base import Context, Method, saved_part

VAE_FOLDER = "vae"

DEFAULT_AUTOENCODER = "kl:stabilityai/sd-vae-ft-mse"  # SD's f8 KL autoencoder, the papers' choice


def check_autoencoder_spec(spec: str) -> None:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("method.autoencoder must name an autoencoder, e.g. kl:stabilityai/sd-vae-ft-mse, "
                          "tiny:madebyollin/taesd, taef2:/path/to/folder (holding taef2_encoder.pth and "
                          "taef2_decoder.pth), or a saved vae/ folder")


class LatentMethod(Method):
    """Base of the latent methods: owns ``self.autoencoder`` (frozen, never trained) and the cache.

    Subclass configs have the fields ``autoencoder`` (a spec for
    :func:`ccad.models.autoencoder_load.load_autoencoder`), ``latent_scale`` / ``latent_shift``
    (filled in at build time) and ``latent_channels`` (filled in).
    """

    space = "latent"
    multi_class = True
    needs_images = False  # the training batches also carry the pixel image (ControlNet input)
    build_phase = "loading the autoencoder and building the model"
    training_data_phase = "encoding the training images into latents (once; cached in the run folder)"

    def __init__(self, config: Any, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.autoencoder: Any = None

    # ---- the autoencoder ----------------------------------------------------------------------
    def load_autoencoder(self) -> Any:
        if self.autoencoder is None:
            from ..models.autoencoder_load import load_autoencoder

            c = self.config
            self.autoencoder = load_autoencoder(c.autoencoder, device=self.ctx.device, scale=c.latent_scale,
                                                shift=c.latent_shift)
            c.latent_channels = int(self.autoencoder.latent_channels)
        return self.autoencoder

    def latent_size(self) -> int:
        ae = self.load_autoencoder()
        if self.ctx.image_size % int(ae.downscale):
            raise ConfigError(f"image_size {self.ctx.image_size} must be a multiple of the autoencoder's "
                              f"downscale factor {ae.downscale}")
        return self.ctx.image_size // int(ae.downscale)

    def latent_cache(self, train: Sequence[Any]) -> Any:
        """Encode the training images once (or reuse the run folder's cache); fit the latent scaling
        on them unless the autoencoder already has a known one (KL's ``scaling_factor``)."""
        from ..data.latent_cache import build_latent_cache

        if getattr(self, "_cache", None) is not None:
            return self._cache
        ae = self.load_autoencoder()
        run_dir = self.ctx.run_dir or Path(tempfile.mkdtemp(prefix="ccad-latents-"))
        fit = self.config.latent_scale is None and not getattr(ae, "fitted", False) and ae.kind == "taef2"
        cache = build_latent_cache(list(train), ae, self.ctx.image_size, Path(run_dir) / "latents",
                                   batch_size=self.ctx.bank_config.batch_size, progress=self.ctx.progress,
                                   cancel=self.ctx.cancel, fit_scaling=fit, with_images=self.needs_images)
        self.config.latent_scale, self.config.latent_shift = float(ae.scale), float(ae.shift)
        self._cache = cache
        return cache

    def training_dataset(self, train: Sequence[Any]) -> Any:
        return self.latent_cache(train)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.load_autoencoder().encode(x).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.load_autoencoder().decode(z).float().clamp(0, 1)

    # ---- device, card, files --------------------------------------------------------------------
    def to(self, device: torch.device) -> "LatentMethod":
        super().to(device)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
        return self

    def card(self) -> dict[str, Any]:
        ae = self.autoencoder
        return {**super().card(), "autoencoder": {"spec": self.config.autoencoder,
                                                  "kind": None if ae is None else ae.kind,
                                                  "latent_channels": self.config.latent_channels}}

    def save(self, directory: Path) -> None:
        super().save(directory)
        self.load_autoencoder().save_pretrained(Path(directory) / VAE_FOLDER)

    @classmethod
    def load(cls, directory: Path, config: Any, ctx: Context) -> "LatentMethod":
        from ..models.autoencoder import LatentAutoencoder

        method = super().load(directory, config, ctx)
        vae = saved_part(directory, VAE_FOLDER, f"its autoencoder ({cls.name})", folder=True)
        method.autoencoder = LatentAutoencoder.from_pretrained(vae).to(ctx.device)
        method.autoencoder.set_scaling(config.latent_scale, config.latent_shift)
        return method


def latent_bank(method: LatentMethod, train: Sequence[Any], size: int, kernel: int, per_image: int,
                seed: int) -> Any:
    """The Coarse Feature Bank of CCAD(F) built with the latent encoder E (METHOD.md item 8), so
    D_bs and B_c share a distribution: the greedy k-center coreset (streamed) of the latent patch
    features (a ``kernel`` x ``kernel`` neighbourhood of each latent cell) of the good images.

    ``per_image`` patches are drawn at random from every image before the stream (a 32 x 32
    latent has 1024 cells; drawing keeps the stream small; 0 = all)."""
    from datetime import datetime, timezone

    from .. import __version__
    from ..features import FeatureBank
    from ..features.coreset import StreamingCoreset, validate_bank_size
    from ..models.fcm import latent_patch_features

    xi = validate_bank_size(size)
    cache = method.latent_cache(train)
    stream = StreamingCoreset(xi, seed=seed)
    g = torch.Generator().manual_seed(seed)
    n = len(cache)
    for start in range(0, n, 32):
        if method.ctx.cancel is not None and method.ctx.cancel():
            from ..errors import Cancelled

            raise Cancelled("latent bank build cancelled")
        z = torch.from_numpy(cache.latents[start:start + 32].astype("float32"))
        feats = latent_patch_features(z, kernel=kernel)  # B x n x d
        if per_image and feats.shape[1] > per_image:
            idx = torch.stack([torch.randperm(feats.shape[1], generator=g)[:per_image] for _ in range(len(z))])
            feats = torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[-1]))
        stream.update(feats.reshape(-1, feats.shape[-1]))
        if method.ctx.progress is not None:
            method.ctx.progress(min(start + 32, n), n)
    feats = stream.result().float()
    meta = {"backbone": f"latent:{method.config.autoencoder}", "layers": [], "image_size": method.ctx.image_size,
            "xi": int(feats.shape[0]), "xi_requested": xi, "feature_dim": int(feats.shape[1]), "n_images": n,
            "n_patches": int(stream.seen), "kernel": kernel, "skipped": [list(e) for e in cache.errors],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ccad_version": __version__,
            "coreset": {"method": "streaming greedy k-center of latent patch features", "per_image": per_image,
                        "seed": seed}}
    return FeatureBank(feats, meta)


def optional_int(value: Optional[int]) -> Optional[int]:
    return None if value is None else int(value)
