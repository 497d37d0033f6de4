"""One latent autoencoder interface for the latent methods (CCAD(C)/(F), D3AD, DeCo-Diff, GLAD).

:class:`LatentAutoencoder` wraps one of three backends and speaks one convention:

* ``encode(images)``: ``B x 3 x H x W`` images in [0, 1] (H, W multiples of 8) ->
  latents ``B x C x H/8 x W/8`` scaled to unit variance, ``(raw - shift) * scale``;
* ``decode(latents)``: the inverse, images clamped to [0, 1].

Backends (``kind``):

* ``"kl"``: diffusers ``AutoencoderKL`` (SD's f8, 4 channels). Images go in as [-1, 1].
  ``encode`` takes the **posterior mean**, not a sample: a reconstruction-based anomaly map
  compares x with x_hat, and sampling the posterior would add encoder noise that differs per
  call (the same good image would get a different map each time) with no benefit at test time.
  Default scaling: the config's ``scaling_factor`` / ``shift_factor`` (0.18215 / 0 for SD1.5).
* ``"tiny"``: diffusers ``AutoencoderTiny`` (TAESD family). Its encoder output is *already* in
  the scaled latent space of the VAE it was distilled from (its config has
  ``scaling_factor=1.0``, ``shift_factor=0``); ``AutoencoderTiny.scale_latents`` maps latents to
  [0, 1] only for storing them as 8-bit images and is not used here. diffusers' tiny
  encoder/decoder take and return [-1, 1] images (they convert to TAESD's [0, 1] inside).
* ``"taef2"``: the project's :class:`ccad.models.taef2.TAEF2` (f8, 32 channels, [0, 1] in
  and out). Its raw latents are roughly in [-3, 3] with std ~0.7, so :meth:`fit_scaling`
  (or ``build_latent_cache(..., fit_scaling=True)``) sets scale/shift from good images.

The autoencoder is frozen (``requires_grad=False``, always in eval mode) and ``encode`` /
``decode`` run under ``torch.no_grad``. :meth:`LatentAutoencoder.save_pretrained` writes the
backend in diffusers format plus ``autoencoder.json`` (the ``vae/`` subfolder of a saved
detector). Building one from a spec string: :func:`ccad.models.autoencoder_load.load_autoencoder`;
checking a spec without loading it: :mod:`ccad.models.autoencoder_check`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .taef2 import TAEF2

__all__ = [
    "LatentAutoencoder",
    "AutoencoderNotFound",
    "AUTOENCODER_KINDS",
    "AUTOENCODER_META",
    "AUTOENCODER_HOWTO",
]

AUTOENCODER_META = "autoencoder.json"
AUTOENCODER_KINDS = ("kl", "tiny", "taef2")
_KIND_ALIASES = {"kl": "kl", "vae": "kl", "autoencoderkl": "kl", "tiny": "tiny", "taesd": "tiny",
                 "autoencodertiny": "tiny", "taef2": "taef2"}
_TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")

AUTOENCODER_HOWTO = (
    "Provide one with `ccad train --option autoencoder=SPEC` (Python: the method config's "
    "`autoencoder` field, or load_autoencoder(SPEC)), where SPEC is "
    "taef2:/path/to/folder-with-taef2_encoder.pth (and taef2_decoder.pth beside it), "
    "or kl:stabilityai/sd-vae-ft-mse after `huggingface-cli download stabilityai/sd-vae-ft-mse` "
    "(or tiny:madebyollin/taesd after `huggingface-cli download madebyollin/taesd`; with "
    "HF_HUB_OFFLINE=1 only the local cache is used), "
    "or a local diffusers folder: kl:/path/to/folder (config.json + "
    "diffusion_pytorch_model.safetensors, or a Stable Diffusion pipeline folder with vae/), "
    "or a saved detector's vae/ folder."
)


class AutoencoderNotFound(FileNotFoundError):
    """The requested autoencoder is not on disk, not in the Hub cache and cannot be downloaded."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        self.reason = reason
        super().__init__(f"autoencoder {spec!r} not found: {reason}. {AUTOENCODER_HOWTO}")

    def __reduce__(self):
        return (type(self), (self.spec, self.reason))


def _backend_class(kind: str) -> type:
    from diffusers import AutoencoderKL, AutoencoderTiny

    return {"kl": AutoencoderKL, "tiny": AutoencoderTiny, "taef2": TAEF2}[kind]


class _Moments:
    """Streaming mean / variance of all latent values (float64 sums)."""

    def __init__(self) -> None:
        self.n = 0
        self.s = 0.0
        self.s2 = 0.0

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        x = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        x = x.to("cpu", torch.float64)
        self.n += x.numel()
        self.s += float(x.sum())
        self.s2 += float((x * x).sum())

    def mean_std(self) -> tuple[float, float]:
        if self.n < 2:
            raise ValueError("fit_scaling needs at least two latent values")
        mean = self.s / self.n
        var = max(self.s2 / self.n - mean * mean, 0.0)
        std = var ** 0.5
        if not np.isfinite(std) or std < 1e-8:
            raise ValueError(f"latents have (near) zero variance (std={std:.3g}); cannot fit a scale")
        return mean, std


class LatentAutoencoder(nn.Module):
    """A frozen autoencoder mapping [0, 1] images to unit-variance latents and back.

    Args:
        backend: an ``AutoencoderKL``, ``AutoencoderTiny`` or :class:`TAEF2`.
        kind: ``"kl"``, ``"tiny"`` or ``"taef2"`` (inferred from ``backend`` when ``None``).
        scale, shift: latent scaling, ``latent = (raw - shift) * scale``. ``None`` takes the
            backend config's ``scaling_factor`` / ``shift_factor`` (1 / 0 for TAEF2).
        spec: the spec string it was loaded from (recorded in ``autoencoder.json`` and in the
            latent cache hash).

    Attributes: ``kind``, ``latent_channels``, ``downscale`` (8), ``scale``, ``shift``,
    ``fitted`` (True once :meth:`fit_scaling` set the scaling), ``spec``.
    """

    def __init__(self, backend: nn.Module, kind: str | None = None, scale: float | None = None,
                 shift: float | None = None, spec: str | None = None, fitted: bool = False) -> None:
        super().__init__()
        if kind is None:
            kind = _infer_kind(backend)
        kind = _norm_kind(kind)
        self.kind = kind
        self.backend = backend
        self.backend.requires_grad_(False)
        self.backend.eval()
        cfg = backend.config
        if scale is None:
            scale = float(getattr(cfg, "scaling_factor", None) or 1.0)
        if shift is None:
            shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.scale = float(scale)
        self.shift = float(shift)
        self.fitted = bool(fitted)
        self.spec = spec or f"{kind}:<in-memory>"
        self.latent_channels = int(cfg.latent_channels)
        self.downscale = self._downscale()

    # ------------------------------------------------------------------ properties / module
    def _downscale(self) -> int:
        cfg = self.backend.config
        if self.kind == "kl":
            return 2 ** (len(cfg.block_out_channels) - 1)
        if self.kind == "tiny":
            return int(cfg.upsampling_scaling_factor) ** (len(cfg.encoder_block_out_channels) - 1)
        return int(cfg.downscale)

    @property
    def device(self) -> torch.device:
        return next(self.backend.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backend.parameters()).dtype

    def train(self, mode: bool = True) -> "LatentAutoencoder":
        """The backend stays in eval mode (it is frozen); this only sets the wrapper's flag."""
        super().train(mode)
        self.backend.eval()
        return self

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, latent_channels={self.latent_channels}, downscale={self.downscale}, "
                f"scale={self.scale:.6g}, shift={self.shift:.6g}, spec={self.spec!r}")

    # ------------------------------------------------------------------ encode / decode
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downscale or w % self.downscale:
            raise ValueError(f"image size {h}x{w} must be a multiple of {self.downscale} "
                             f"for a {self.kind} autoencoder")
        return images.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the backend's raw (unscaled) latents, float32."""
        x = self._check_images(images)
        if self.kind == "kl":
            z = self.backend.encode(x * 2 - 1).latent_dist.mean  # posterior mean: deterministic
        elif self.kind == "tiny":
            z = self.backend.encode(x * 2 - 1).latents
        else:
            z = self.backend.encode(x)
        return z.float()

    @torch.no_grad()
    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images in [0, 1], float32."""
        z = raw.to(device=self.device, dtype=self.dtype)
        if self.kind in ("kl", "tiny"):
            x = (self.backend.decode(z).sample + 1) / 2
        else:
            x = self.backend.decode(z)
        return x.float().clamp(0, 1)

    def scale_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """``(raw - shift) * scale``."""
        return (raw - self.shift) * self.scale

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents / scale + shift``."""
        return latents / self.scale + self.shift

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``B x 3 x H x W`` in [0, 1] -> unit-variance latents ``B x C x H/8 x W/8``."""
        return self.scale_latents(self.encode_raw(images))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]."""
        return self.decode_raw(self.unscale_latents(latents))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(images))``."""
        return self.decode(self.encode(images))

    # ------------------------------------------------------------------ scaling
    def set_scaling(self, scale: float, shift: float, fitted: bool = True) -> None:
        self.scale = float(scale)
        self.shift = float(shift)
        self.fitted = bool(fitted)

    def fit_scaling(self, latents_raw: torch.Tensor | np.ndarray | Iterable[torch.Tensor]) -> tuple[float, float]:
        """Set ``shift = mean`` and ``scale = 1 / std`` of raw latents of good images.

        One scalar pair over all channels (the diffusers ``scaling_factor`` / ``shift_factor``
        convention), so ``encode`` gives zero-mean, unit-variance latents on those images.
        ``latents_raw`` is a tensor/array or an iterable of batches. Returns ``(scale, shift)``.
        """
        m = _Moments()
        if isinstance(latents_raw, (torch.Tensor, np.ndarray)):
            m.update(latents_raw)
        else:
            for z in latents_raw:
                m.update(z)
        mean, std = m.mean_std()
        self.set_scaling(1.0 / std, mean, fitted=True)
        return self.scale, self.shift

    def fit_scaling_from_images(self, images: torch.Tensor | Iterable[torch.Tensor],
                                batch_size: int = 8) -> tuple[float, float]:
        """Encode good images (a ``B x 3 x H x W`` tensor or an iterable of batches) and
        :meth:`fit_scaling` on their raw latents. Returns ``(scale, shift)``."""
        if isinstance(images, torch.Tensor):
            batches: Iterable[torch.Tensor] = images.split(batch_size)
        else:
            batches = images
        return self.fit_scaling(self.encode_raw(b) for b in batches)

    def fingerprint(self) -> str:
        """A short string identifying the weights (spec + per-tensor sums), for cache hashes."""
        import hashlib

        h = hashlib.sha256(f"{self.kind}|{self.spec}".encode())
        with torch.no_grad():
            for name, p in self.backend.state_dict().items():
                h.update(f"{name}:{tuple(p.shape)}:{float(p.double().sum()):.10e}".encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ saving / loading
    def meta(self) -> dict[str, Any]:
        return dict(format=1, kind=self.kind, scale=self.scale, shift=self.shift, fitted=self.fitted,
                    spec=self.spec, latent_channels=self.latent_channels, downscale=self.downscale)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write the backend in diffusers format (config.json + diffusion_pytorch_model.safetensors)
        and ``autoencoder.json`` (kind, scale, shift, spec)."""
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save_pretrained(str(d), safe_serialization=True, **kwargs)
        (d / AUTOENCODER_META).write_text(json.dumps(self.meta(), indent=2))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], subfolder: str | None = None,
                        spec: str | None = None) -> "LatentAutoencoder":
        """Reload a folder written by :meth:`save_pretrained` (alone, no detector needed)."""
        d = Path(directory)
        if subfolder:
            d = d / subfolder
        meta_path = d / AUTOENCODER_META
        if not meta_path.is_file():
            raise AutoencoderNotFound(str(d), f"no {AUTOENCODER_META} in {d}")
        meta = json.loads(meta_path.read_text())
        kind = _norm_kind(meta["kind"])
        backend = _backend_class(kind).from_pretrained(str(d))
        return cls(backend, kind, scale=meta.get("scale"), shift=meta.get("shift"),
                   spec=spec or meta.get("spec"), fitted=meta.get("fitted", False))


# ---------------------------------------------------------------------- kinds
def _norm_kind(kind: str) -> str:
    k = _KIND_ALIASES.get(str(kind).strip().lower())
    if k is None:
        raise ValueError(f"unknown autoencoder kind {kind!r}; use one of {', '.join(AUTOENCODER_KINDS)}")
    return k


def _infer_kind(backend: nn.Module) -> str:
    name = type(backend).__name__
    if isinstance(backend, TAEF2):
        return "taef2"
    if name == "AutoencoderTiny":
        return "tiny"
    if name == "AutoencoderKL":
        return "kl"
    raise ValueError(f"cannot infer the autoencoder kind of a {name}; pass kind=")
