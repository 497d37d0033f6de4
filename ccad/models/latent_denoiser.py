"""The CCAD(C) / CCAD(F) latent denoiser: SD-style UNet + ControlNet, context = the feature bank.

CCAD (papers/ccad.md sec. 3.3, Fig. 2, Fig. 3b, eq. 9-11): the latent variants follow DiAD /
ControlNet on SD 1.5. The denoiser eps_Theta(z_t; x; B) is a latent UNet whose Basic
Transformer Blocks are replaced by Global-feature Conditioned Blocks (GCB, Fig. 3b):
LN + self-attention -> LN + cross-attention -> LN + feed-forward, each with a skip
connection, where the cross-attention keys/values are the feature bank (B_c for CCAD(C),
the Fine Feature Bank B_f = tau_theta(D_bs; B_c) for CCAD(F)). That is exactly diffusers'
``BasicTransformerBlock`` inside the ``CrossAttn*Block2D`` blocks of
``UNet2DConditionModel`` when ``encoder_hidden_states`` is the (projected) bank instead of a
text embedding ("a new modality condition"). The input image x enters through a
``ControlNetModel`` (DiAD's semantic-guided branch): its conditioning embedding takes the
image at pixel resolution (f8: 8x the latent grid) and its zero-initialised residuals are
added to the UNet's skip connections and middle block (the standard diffusers ControlNet
pattern, :func:`latent_eps`).

Pieces:
    * :func:`build_latent_unet` / :func:`latent_unet_kwargs`: presets ``tiny`` / ``small`` / ``base``
      (``UNET_PRESETS["latent"]``, :mod:`ccad.models.presets`).
    * :func:`build_controlnet`: ``ControlNetModel.from_unet`` with an f8 conditioning embedding.
    * :class:`BankProjector`: ``Linear(d -> cross_attention_dim)`` + ``LayerNorm`` on the bank.
    * :func:`latent_eps`: eps = UNet(z_t, t, ctx, + ControlNet(z_t, t, ctx, x) residuals).

All are diffusers ``ModelMixin``s, so each saves with ``save_pretrained(dir/"unet")`` etc. and
loads alone with ``from_pretrained(dir, subfolder="unet")``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from diffusers import ConfigMixin, ControlNetModel, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from .denoiser import project_bank
from .presets import unet_preset

#: the autoencoder downsampling factor the ControlNet conditioning embedding must match (SD KL / TAEF2: f8)
LATENT_DOWNSCALE = 8


def latent_unet_kwargs(preset: str, latent_channels: int, sample_size: int,
                       cross_attention_dim: Optional[int] = None) -> dict[str, Any]:
    """The ``UNet2DConditionModel(**kwargs)`` arguments of a preset (no model is built).

    Level i runs on a ``sample_size / 2**i`` grid; it is a ``CrossAttnDownBlock2D`` (GCB, Fig. 3b)
    when that grid is at most the preset's ``max_attention_grid`` (never above 32 x 32 tokens)
    and, for ``base``, the level is one of SD's three attention levels; otherwise a plain
    ``DownBlock2D``. The middle block always has the GCB (its grid is the smallest). The head
    count per level is ``channels / attention_head_dim`` and is passed as diffusers'
    ``attention_head_dim`` (that argument means *number of heads*, diffusers issue #2011).
    ``base`` uses SD 1.5's fixed 8 heads.
    """
    p = unet_preset("latent", preset)
    if int(latent_channels) < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    blocks = tuple(int(c) for c in p["block_out_channels"])
    levels = len(blocks)
    sample_size = int(sample_size)
    while levels > 1 and sample_size % (2 ** (levels - 1)):
        levels -= 1  # tiny latents: drop the deepest levels rather than fail
    blocks = blocks[:levels]
    if sample_size < 2 ** (levels - 1):
        raise ValueError(f"sample_size={sample_size} too small for {levels} levels")
    max_grid = min(32, int(p["max_attention_grid"]))
    att_levels = p.get("attention_levels")
    down, heads = [], []
    for i, c in enumerate(blocks):
        grid = sample_size // (2 ** i)
        att = grid <= max_grid and (att_levels is None or i in att_levels)
        down.append("CrossAttnDownBlock2D" if att else "DownBlock2D")
        heads.append(int(p["num_heads"]) if p.get("num_heads") else max(1, c // int(p["attention_head_dim"])))
    up = tuple("CrossAttnUpBlock2D" if d == "CrossAttnDownBlock2D" else "UpBlock2D" for d in reversed(down))
    return dict(
        sample_size=sample_size,
        in_channels=int(latent_channels),
        out_channels=int(latent_channels),
        down_block_types=tuple(down),
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=blocks,
        layers_per_block=int(p["layers_per_block"]),
        norm_num_groups=int(p["norm_num_groups"]),
        cross_attention_dim=int(cross_attention_dim or p["cross_attention_dim"]),
        attention_head_dim=tuple(heads),  # number of heads per level (diffusers naming quirk)
    )


def _load_pretrained_unet(pretrained: Union[str, os.PathLike]) -> UNet2DConditionModel:
    """``UNet2DConditionModel`` from a local folder / Hub id: a pipeline folder (``unet/`` inside) or a UNet folder."""
    p = Path(str(pretrained))
    if p.is_dir():
        if (p / "unet" / "config.json").is_file():
            return UNet2DConditionModel.from_pretrained(str(p), subfolder="unet")
        if (p / "config.json").is_file():
            return UNet2DConditionModel.from_pretrained(str(p))
        raise FileNotFoundError(f"{p}: neither {p / 'unet' / 'config.json'} nor {p / 'config.json'} exists")
    try:  # a Hub id: SD-style repositories keep the UNet in unet/
        return UNet2DConditionModel.from_pretrained(str(pretrained), subfolder="unet")
    except (OSError, ValueError):
        return UNet2DConditionModel.from_pretrained(str(pretrained))


def _adapt_channels(unet: UNet2DConditionModel, channels: int) -> UNet2DConditionModel:
    """Swap conv_in / conv_out for ``channels`` latent channels, reusing the pretrained filters.

    New input channel j takes pretrained input channel ``j % C_old`` (scaled by ``C_old / C_new``
    so a unit-variance latent gives conv_in activations of the same size); new output channel j
    copies pretrained output filter ``j % C_old`` (and bias). The config is updated so
    ``save_pretrained`` / ``from_pretrained`` round-trip the adapted model.
    """
    old = int(unet.config.in_channels)
    if old == channels and int(unet.config.out_channels) == channels:
        return unet
    with torch.no_grad():
        ci = unet.conv_in
        new_in = nn.Conv2d(channels, ci.out_channels, ci.kernel_size, ci.stride, ci.padding)
        idx = torch.arange(channels) % ci.in_channels
        new_in.weight.copy_(ci.weight[:, idx] * (ci.in_channels / channels))
        new_in.bias.copy_(ci.bias)
        co = unet.conv_out
        new_out = nn.Conv2d(co.in_channels, channels, co.kernel_size, co.stride, co.padding)
        idx = torch.arange(channels) % co.out_channels
        new_out.weight.copy_(co.weight[idx])
        new_out.bias.copy_(co.bias[idx])
    unet.conv_in = new_in.to(ci.weight.device, ci.weight.dtype)
    unet.conv_out = new_out.to(co.weight.device, co.weight.dtype)
    unet.register_to_config(in_channels=channels, out_channels=channels)
    return unet


def build_latent_unet(preset: str, latent_channels: int, sample_size: int,
                      cross_attention_dim: Optional[int] = None,
                      pretrained: Optional[Union[str, os.PathLike]] = None) -> UNet2DConditionModel:
    """The GCDM latent UNet eps_Theta(z_t; B) of CCAD(C)/(F) (Fig. 3b GCB; eq. 10-11).

    Args:
        preset: ``tiny`` (tests), ``small`` (CPU benchmark), ``base`` (GPU, SD 1.5 widths).
        latent_channels: C of the autoencoder latent (4 for SD KL, 32 for TAEF2).
        sample_size: latent grid side h = w (32 for 256 px images at f8).
        cross_attention_dim: width of the context (the :class:`BankProjector` output);
            None -> the preset's (64 / 128 / 768).
        pretrained: a local folder or Hub id of an SD-style UNet (a pipeline folder with
            ``unet/`` or a UNet folder). Its architecture wins over the preset (the preset is
            ignored; read ``unet.config.cross_attention_dim`` for the projector width); conv_in /
            conv_out are adapted when ``latent_channels`` differs (see :func:`_adapt_channels`),
            and ``sample_size`` is recorded in the config. None -> random init.
    """
    if pretrained is not None:
        unet = _load_pretrained_unet(pretrained)
        unet = _adapt_channels(unet, int(latent_channels))
        unet.register_to_config(sample_size=int(sample_size))
        if cross_attention_dim is not None and int(cross_attention_dim) != int(unet.config.cross_attention_dim):
            raise ValueError(
                f"cross_attention_dim={cross_attention_dim} differs from the pretrained UNet's "
                f"{unet.config.cross_attention_dim}; pass None and project the bank to the UNet's width"
            )
        return unet
    return UNet2DConditionModel(**latent_unet_kwargs(preset, latent_channels, sample_size, cross_attention_dim))


def _default_embedding_channels(unet: UNet2DConditionModel) -> tuple[int, ...]:
    # SD's (16, 32, 96, 256) at SD widths; a 4x cheaper f8 embedding for the small CPU models
    # (the embedding runs at pixel resolution, the SD one alone costs ~1 GMAC at 256 px).
    return (16, 32, 96, 256) if int(unet.config.block_out_channels[0]) >= 320 else (8, 16, 32, 64)


def build_controlnet(unet: UNet2DConditionModel, conditioning_channels: int = 3,
                     conditioning_embedding_out_channels: Optional[Sequence[int]] = None,
                     load_weights_from_unet: bool = True) -> ControlNetModel:
    """The image-condition branch (DiAD's semantic-guided network; CCAD eq. 9-10's ``x`` argument).

    ``ControlNetModel.from_unet`` copies the UNet's encoder (and its weights) and adds
    zero-initialised 1x1 convs on every residual, so a fresh ControlNet leaves the UNet output
    unchanged. Its ``ControlNetConditioningEmbedding`` has one stride-2 conv per consecutive
    pair of ``conditioning_embedding_out_channels``; we require ``len - 1 == log2(8) = 3`` so a
    ``B x 3 x 8h x 8w`` image lands on the ``h x w`` latent grid (f8). Default: SD's
    ``(16, 32, 96, 256)`` for SD-width UNets, ``(8, 16, 32, 64)`` for the small presets.
    """
    ch = tuple(int(c) for c in (conditioning_embedding_out_channels or _default_embedding_channels(unet)))
    n_down = int(round(math.log2(LATENT_DOWNSCALE)))
    if len(ch) - 1 != n_down:
        raise ValueError(
            f"conditioning_embedding_out_channels={ch} gives {len(ch) - 1} stride-2 convs; the f{LATENT_DOWNSCALE} "
            f"latent needs {n_down} (i.e. {n_down + 1} entries)"
        )
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=ch,
                                     load_weights_from_unet=load_weights_from_unet,
                                     conditioning_channels=int(conditioning_channels))


class BankProjector(ModelMixin, ConfigMixin):
    """Bank -> cross-attention context: ``LayerNorm(Linear(d -> cross_attention_dim))`` (GCB input, Fig. 3b).

    ``forward(bank, batch=None)``: ``bank`` is ``xi x d`` (one bank shared by the batch, e.g. B_c)
    or ``B x xi x d`` (per-image, e.g. the FFB B_f of eq. 8); returns ``B x xi x c``
    (``batch`` expands a shared bank; default 1).
    """

    @register_to_config
    def __init__(self, bank_dim: int, cross_attention_dim: int) -> None:
        super().__init__()
        if int(bank_dim) < 1 or int(cross_attention_dim) < 1:
            raise ValueError(f"bank_dim and cross_attention_dim must be >= 1, got {bank_dim}, {cross_attention_dim}")
        self.proj = nn.Linear(int(bank_dim), int(cross_attention_dim))
        self.norm = nn.LayerNorm(int(cross_attention_dim))

    def forward(self, bank: torch.Tensor, batch: Optional[int] = None) -> torch.Tensor:
        return project_bank(bank, self.proj, self.norm, batch, "BankProjector")


def _timesteps(t: Union[int, torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor([int(t)])
    t = t.to(device)
    if t.dim() == 0 or t.numel() == 1:
        t = t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or length-{batch}, got shape {tuple(t.shape)}")
    return t


def latent_eps(unet: UNet2DConditionModel, controlnet: Optional[ControlNetModel],
               projector: Optional[nn.Module], z_t: torch.Tensor, t: Union[int, torch.Tensor],
               bank: torch.Tensor, control_image: Optional[torch.Tensor] = None,
               control_scale: float = 1.0) -> torch.Tensor:
    """eps_Theta^t(z_t; x; B) of eq. 9-11 (B = B_c for CCAD(C), B_f = tau_theta(D_bs; B_c) for CCAD(F)).

    ctx = projector(bank) (``B x xi x c``; ``projector=None`` means ``bank`` already is the
    context); the ControlNet runs on (z_t, t, ctx, control_image) and its down / mid residuals
    (times ``control_scale``) are added to the UNet's skips and middle block. ``controlnet=None``
    (or ``control_image=None``) runs the UNet alone.

    Args:
        z_t: noised latents ``B x C x h x w``.
        t: int, 0-d or length-B timesteps.
        bank: ``xi x d`` or ``B x xi x d`` (or the context itself when ``projector`` is None).
        control_image: the input image x, ``B x 3 x 8h x 8w`` (pixel resolution, f8); the value
            range is the caller's convention ([0, 1] as ControlNet hints), used consistently in
            training and reconstruction.
    Returns eps, ``B x C x h x w``.
    """
    if z_t.dim() != 4:
        raise ValueError(f"z_t must be B x C x h x w, got shape {tuple(z_t.shape)}")
    b = z_t.shape[0]
    ts = _timesteps(t, b, z_t.device)
    if projector is not None:
        ctx = projector(bank, batch=b)
    else:
        ctx = bank.unsqueeze(0) if bank.dim() == 2 else bank
        if ctx.shape[0] != b:
            ctx = ctx.expand(b, -1, -1)
    ctx = ctx.to(device=z_t.device, dtype=z_t.dtype)
    down_res = mid_res = None
    if controlnet is not None and control_image is not None:
        h, w = z_t.shape[-2:]
        if control_image.dim() != 4 or control_image.shape[0] != b or \
                tuple(control_image.shape[-2:]) != (LATENT_DOWNSCALE * h, LATENT_DOWNSCALE * w):
            raise ValueError(
                f"control_image must be {b} x 3 x {LATENT_DOWNSCALE * h} x {LATENT_DOWNSCALE * w} (f{LATENT_DOWNSCALE} "
                f"of the {h} x {w} latent), got shape {tuple(control_image.shape)}"
            )
        down_res, mid_res = controlnet(z_t, ts, encoder_hidden_states=ctx,
                                       controlnet_cond=control_image.to(device=z_t.device, dtype=z_t.dtype),
                                       conditioning_scale=float(control_scale), return_dict=False)
    return unet(z_t, ts, encoder_hidden_states=ctx, down_block_additional_residuals=down_res,
                mid_block_additional_residual=mid_res, return_dict=False)[0]

