"""The one table of network presets: ``tiny`` (tests), ``small`` (CPU), ``base`` (GPU) per network family.

Families (the builder that reads each row):

* ``"bank"``: :class:`ccad.models.denoiser.BankConditionedUNet` (CCAD(V), pixel space; the row's
  keys are its ``register_to_config`` arguments). Attention only on the feature grids listed in
  ``attention_resolutions`` (papers/ccad.md Fig. 3a: 32/16/8), never above 32 x 32 tokens.
* ``"latent"``: :func:`ccad.models.latent_denoiser.latent_unet_kwargs` (CCAD(C)/(F), Fig. 3b):
  ``attention_head_dim`` is the real per-head width (converted to diffusers' head counts),
  ``max_attention_grid`` the largest grid (tokens per side) that gets a GCB, ``num_heads`` /
  ``attention_levels`` SD 1.5's fixed heads and attention levels.
* ``"deco"``: :func:`ccad.models.deco_net.build_deco_unet`, the plain ``UNet2DModel`` of
  DeCo-Diff, D3AD and GLAD (papers/deco-diff.md sec. 5.1): attention on levels whose grid side is
  at most ``attn_max_grid`` (None: no attention).

* ``"feat"``: :class:`ccad.models.feat_denoiser.FeatDenoiser`, feat-diff's conv + transformer net
  on the bank's feature grid (the row's keys are its ``register_to_config`` arguments besides
  ``in_channels``: width w, attention head width, context width).

Parameter counts and CPU timings of the rows are in the builders' docstrings.
"""
from __future__ import annotations

from typing import Any

#: the preset names every trained method offers (``method.preset``)
PRESET_NAMES = ("tiny", "small", "base")

UNET_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "bank": {
        # tests; trains in seconds on CPU at 32-64 px (32-64 channels, 1 ResBlock per level)
        "tiny": dict(sample_size=64, block_out_channels=(32, 64, 64), layers_per_block=1,
                     attention_resolutions=(16, 8), cross_attention_dim=64, attention_head_dim=32,
                     norm_num_groups=8),
        # CPU demos at 64-128 px (a few M parameters)
        "small": dict(sample_size=128, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
                      attention_resolutions=(32, 16, 8), cross_attention_dim=128, attention_head_dim=32,
                      norm_num_groups=16),
        # DDAD-like for GPUs at 256 px (six levels 256..8, attention at 32/16/8, ~40 M)
        "base": dict(sample_size=256, block_out_channels=(64, 64, 128, 128, 256, 256), layers_per_block=2,
                     attention_resolutions=(32, 16, 8), cross_attention_dim=256, attention_head_dim=64,
                     norm_num_groups=32),
    },
    "latent": {
        # tests: two levels, GCB only at the 16x16 level and the middle (the 32x32 level is ResBlocks only)
        "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=32,
                     cross_attention_dim=64, norm_num_groups=8, max_attention_grid=16),
        # CPU benchmark: three levels 32/16/8, GCB at every level and the middle (~53 ms/image
        # UNet+ControlNet, 2 threads)
        "small": dict(block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=64,
                      cross_attention_dim=128, norm_num_groups=16, max_attention_grid=32),
        # GPU: SD 1.5 widths and layout (GCB at the first three levels, 8 heads, context 768)
        "base": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=None,
                     num_heads=8, cross_attention_dim=768, norm_num_groups=32, max_attention_grid=32,
                     attention_levels=(0, 1, 2)),
    },
    "deco": {
        "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attn_max_grid=None, norm_num_groups=8,
                     attention_head_dim=32, dropout=0.0),
        "small": dict(block_out_channels=(64, 128, 256), layers_per_block=1, attn_max_grid=16,
                      norm_num_groups=16, attention_head_dim=32, dropout=0.0),
        "base": dict(block_out_channels=(128, 256, 512), layers_per_block=2, attn_max_grid=16,
                     norm_num_groups=32, attention_head_dim=64, dropout=0.0),
    },
    "feat": {
        # width w and attention head width (tiny: tests, small: CPU default, base: a GPU)
        "tiny": dict(width=16, head_dim=16, cross_attention_dim=32),
        "small": dict(width=48, head_dim=32, cross_attention_dim=96),
        "base": dict(width=128, head_dim=64, cross_attention_dim=256),
    },
}

#: how errors name each family (the words users saw before the tables were merged)
_FAMILY_NAMES = {"bank": "denoiser", "latent": "latent UNet", "deco": "DeCo net", "feat": "feat-diff"}


def unet_preset(family: str, name: str) -> dict[str, Any]:
    """A copy of ``UNET_PRESETS[family][name]``; a ``ValueError`` names the family and the known
    presets for an unknown one."""
    if family not in UNET_PRESETS:
        raise ValueError(f"unknown UNet family {family!r}; choose one of {sorted(UNET_PRESETS)}")
    table = UNET_PRESETS[family]
    if name not in table:
        raise ValueError(f"unknown {_FAMILY_NAMES[family]} preset {name!r}; choose one of {sorted(table)}")
    return dict(table[name])
