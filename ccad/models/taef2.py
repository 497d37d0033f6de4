"""TAEF2: the project's own module for a tiny f8 latent autoencoder with 32 latent channels.

The layer layout is derived from the key lists of the real weights
(``../shared/weights/taef2_{encoder,decoder}_keys.txt``, MIT, see ``taef2.LICENSE``); indices
are ``nn.Sequential`` positions, so :meth:`TAEF2.from_original_weights` maps the original state
dicts one to one onto ``encoder.layers.<i>`` / ``decoder.layers.<i>``:

Encoder (index: module)::

    0 conv3x3(3, C)          1 Block
    2 down(C)                3-5 Block x3
    6 down(C)                7-9 Block x3
    10 down(C)               11-13 Block x3 with pool branch
    14 conv3x3(C, latent)

Decoder::

    0 Clamp tanh(x/3)*3      1 conv3x3(latent, C)   2 ReLU
    3-5 Block x3 with pool   6 Upsample x2          7 conv3x3 no bias
    8-10 Block x3            11 Upsample x2         12 conv3x3 no bias
    13-15 Block x3           16 Upsample x2         17 conv3x3 no bias
    18 Block                 19 conv3x3(C, 3)

``down`` is a 3x3 stride-2 conv without bias. ``Block`` is a residual block:
``relu(conv(x') + skip(x'))`` with ``conv`` = conv3x3, ReLU, conv3x3, ReLU, conv3x3, ``skip``
identity (all blocks are C -> C in TAEF2; a 1x1 conv when the widths differ), and, in the
blocks next to the latent, ``x' = x + pool(x)`` where ``pool`` = 1x1 conv C->4C (no bias),
GroupNorm(4, 4C), ReLU, 1x1 conv 4C->C (no bias). The GroupNorm branch gives these blocks a
per-image global statistic that plain 3x3 convs cannot see.

Input convention (measured with the real weights, see ``tests/test_autoencoder.py``): the
encoder takes images in **[0, 1]** (the TAESD convention). Encode+decode of 256 px synthetic
textures (``ccad.data.synthetic.generate_texture``, seed 0) gives PSNR 22.7 (fibrous), 26.4
(granular), 41.5 (cloud), 22.1 (woven), 31.3 dB (speckle) with [0, 1] inputs, but only ~7 dB
when the same images are fed as [-1, 1]. The block order was checked the same way: adding the
pool branch to the input of both the conv path and the skip gives the numbers above; applying
the skip to the un-pooled input gives 14-18 dB, dropping the branch 13-17 dB. The decoder
output is in [0, 1] and is clamped there. Raw latents lie roughly in [-3, 3] (not unit
variance: :class:`ccad.models.autoencoder.LatentAutoencoder` fits a scale/shift).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["TAEF2", "TAEF2Block", "TAEF2Encoder", "TAEF2Decoder"]


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    """Soft clamp of the decoder input to (-3, 3): ``tanh(x / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class TAEF2Block(nn.Module):
    """``relu(conv(x') + skip(x'))`` with ``x' = x + pool(x)`` when the pool branch is present."""

    def __init__(self, n_in: int, n_out: int, pool: bool = False, pool_groups: int = 4,
                 pool_mult: int = 4) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        if pool:
            hid = pool_mult * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, hid, 1, bias=False),
                nn.GroupNorm(pool_groups, hid),
                nn.ReLU(),
                nn.Conv2d(hid, n_in, 1, bias=False),
            )
        else:
            self.pool = None
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class TAEF2Encoder(nn.Module):
    """Images in [0, 1] -> raw latents (``latent_channels`` x H/8 x W/8)."""

    def __init__(self, in_channels: int = 3, latent_channels: int = 32, channels: int = 64,
                 blocks_per_stage: int = 3, pool_groups: int = 4, pool_mult: int = 4) -> None:
        super().__init__()
        c = channels
        layers: list[nn.Module] = [_conv(in_channels, c), TAEF2Block(c, c)]
        for stage in range(3):
            layers.append(_conv(c, c, stride=2, bias=False))
            pool = stage == 2
            layers.extend(TAEF2Block(c, c, pool, pool_groups, pool_mult) for _ in range(blocks_per_stage))
        layers.append(_conv(c, latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TAEF2Decoder(nn.Module):
    """Raw latents -> images clamped to [0, 1] (8x the latent size)."""

    def __init__(self, out_channels: int = 3, latent_channels: int = 32, channels: int = 64,
                 blocks_per_stage: int = 3, pool_groups: int = 4, pool_mult: int = 4) -> None:
        super().__init__()
        c = channels
        layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, c), nn.ReLU()]
        for stage in range(3):
            pool = stage == 0
            layers.extend(TAEF2Block(c, c, pool, pool_groups, pool_mult) for _ in range(blocks_per_stage))
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(_conv(c, c, bias=False))
        layers.append(TAEF2Block(c, c))
        layers.append(_conv(c, out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z).clamp(0, 1)


class TAEF2(ModelMixin, ConfigMixin):
    """The TAEF2 tiny autoencoder as a diffusers model (``save_pretrained``/``from_pretrained``).

    ``encode(images in [0, 1]) -> raw latents``; ``decode(raw latents) -> images in [0, 1]``.
    Load the original ``.pth`` files with :meth:`from_original_weights`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 32,
                 channels: int = 64, blocks_per_stage: int = 3, pool_groups: int = 4,
                 pool_mult: int = 4, downscale: int = 8) -> None:
        super().__init__()
        if downscale != 8:
            raise ValueError(f"TAEF2 has three stride-2 stages (downscale 8), got downscale={downscale}")
        kw = dict(latent_channels=latent_channels, channels=channels,
                  blocks_per_stage=blocks_per_stage, pool_groups=pool_groups, pool_mult=pool_mult)
        self.encoder = TAEF2Encoder(in_channels=in_channels, **kw)
        self.decoder = TAEF2Decoder(out_channels=out_channels, **kw)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``B x 3 x H x W`` in [0, 1] (H, W multiples of 8) -> raw latents."""
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images in [0, 1]."""
        return self.decoder(latents)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    @classmethod
    def from_original_weights(cls, encoder_pth: str | os.PathLike[str],
                              decoder_pth: str | os.PathLike[str], **config) -> "TAEF2":
        """Build a TAEF2 from the original ``taef2_encoder.pth`` / ``taef2_decoder.pth`` files.

        The files are plain (fp16) state dicts keyed by ``nn.Sequential`` index; they are read
        with ``torch.load(weights_only=True)`` (no pickled code) and loaded strictly, in float32.
        A missing, unexpected or mis-shaped key raises ``ValueError`` naming the file and the
        first mismatching key.
        """
        model = cls(**config)
        for part, path in (("encoder", encoder_pth), ("decoder", decoder_pth)):
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"TAEF2 {part} weights not found: {path}")
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict):
                raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
            target = getattr(model, part).layers
            own = target.state_dict()
            missing = [k for k in own if k not in sd]
            unexpected = [k for k in sd if k not in own]
            if missing:
                raise ValueError(f"{path}: TAEF2 {part} key '{missing[0]}' is missing from the file "
                                 f"({len(missing)} missing); is this the {part} file?")
            if unexpected:
                raise ValueError(f"{path}: unexpected key '{unexpected[0]}' for the TAEF2 {part} "
                                 f"({len(unexpected)} unexpected); check the config (channels, blocks)")
            for k, v in own.items():
                if tuple(sd[k].shape) != tuple(v.shape):
                    raise ValueError(f"{path}: key '{k}' has shape {tuple(sd[k].shape)}, the TAEF2 "
                                     f"{part} expects {tuple(v.shape)}")
            target.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return model
