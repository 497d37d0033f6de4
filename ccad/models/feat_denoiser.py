"""The denoiser of ``feat-diff``: a small conv + transformer net over the bank's 32 x 32 feature grid.

``eps_theta(z_t, t; B_c)`` (CCAD eq. 11 in feature space, :mod:`ccad.methods.feat_diff`). Built from
diffusers' own blocks so it saves / loads like every other network (``ModelMixin, ConfigMixin``):

    conv_in 1x1 (C -> w) -> ResnetBlock2D(w) at h x w            (skip)
    -> stride-2 conv (w -> 2w) -> ResnetBlock2D(2w) at h/2 x w/2
    -> BasicTransformerBlock(2w): LN + SelfAttn -> LN + CrossAttn(bank) -> LN + FF
       (the GCB of CCAD Fig. 3b; context = the projected Coarse Feature Bank)
    -> nearest x2 + conv (2w -> w), concat skip -> ResnetBlock2D(2w -> w) -> GN, SiLU, 1x1 (w -> C)

The time step enters every ResnetBlock2D through diffusers' sinusoidal ``Timesteps`` +
``TimestepEmbedding``. Attention runs only on the half grid (256 tokens at 256 px), never above
32 x 32 (DESIGN.md's CPU facts). ``diffusers.UNet2DConditionModel`` (the CCAD(C) UNet) would do the
same job; on the 2-core CPU its ``tiny`` preset costs ~10 s per training step of 16 feature maps,
this net about a fifth of that at the same width.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .presets import UNET_PRESETS, unet_preset

#: the rows of the one preset table (:data:`ccad.models.presets.UNET_PRESETS` ``["feat"]``), by name
FEAT_DENOISER_PRESETS = UNET_PRESETS["feat"]


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class FeatDenoiser(ModelMixin, ConfigMixin):
    """``forward(z_t, t, encoder_hidden_states) -> eps`` on ``B x C x h x w`` features (h, w even)."""

    @register_to_config
    def __init__(self, in_channels: int, width: int = 48, head_dim: int = 32, cross_attention_dim: int = 96) -> None:
        super().__init__()
        w, c = int(width), int(in_channels)
        if w < 2 or c < 1 or (2 * w) % int(head_dim):
            raise ValueError(f"FeatDenoiser: need width >= 2, in_channels >= 1 and 2*width divisible by head_dim, "
                             f"got width={width}, in_channels={in_channels}, head_dim={head_dim}")
        temb = 4 * w
        self.time_proj = Timesteps(w, True, 0)
        self.time_embedding = TimestepEmbedding(w, temb)
        self.conv_in = nn.Conv2d(c, w, 1)
        self.res_in = ResnetBlock2D(in_channels=w, out_channels=w, temb_channels=temb, groups=_groups(w))
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.res_mid = ResnetBlock2D(in_channels=2 * w, out_channels=2 * w, temb_channels=temb, groups=_groups(2 * w))
        self.gcb = BasicTransformerBlock(2 * w, (2 * w) // int(head_dim), int(head_dim),
                                         cross_attention_dim=int(cross_attention_dim), activation_fn="geglu")
        self.up = nn.Conv2d(2 * w, w, 3, padding=1)
        self.res_out = ResnetBlock2D(in_channels=2 * w, out_channels=w, temb_channels=temb, groups=_groups(w))
        self.norm_out = nn.GroupNorm(_groups(w), w)
        self.conv_out = nn.Conv2d(w, c, 1)

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, int],
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, _, h, w = sample.shape
        if h % 2 or w % 2:
            raise ValueError(f"FeatDenoiser needs an even feature grid, got {h} x {w}")
        t = timestep if torch.is_tensor(timestep) else torch.tensor([int(timestep)], device=sample.device)
        t = t.to(sample.device).reshape(-1).expand(b) if t.numel() == 1 else t.to(sample.device)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        skip = self.res_in(self.conv_in(sample), emb)
        x = self.res_mid(self.down(skip), emb)
        hh, ww = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
        tokens = self.gcb(tokens, encoder_hidden_states=encoder_hidden_states.to(tokens.dtype))
        x = tokens.transpose(1, 2).reshape(b, -1, hh, ww)
        x = self.up(F.interpolate(x, size=(h, w), mode="nearest"))
        x = self.res_out(torch.cat([x, skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(x)))


def build_feat_denoiser(preset: str, in_channels: int) -> FeatDenoiser:
    """The denoiser of preset ``preset`` (``UNET_PRESETS["feat"]``: tiny / small / base) over
    ``in_channels`` feature channels; an unknown name is a ``ValueError`` listing the known ones."""
    return FeatDenoiser(int(in_channels), **unet_preset("feat", preset))
