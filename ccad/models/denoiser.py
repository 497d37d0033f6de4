"""The CCAD(V) pixel-space denoiser: a diffusers UNet whose cross-attention context is the bank.

CCAD (papers/ccad.md, sec. 3.3, Fig. 3a): CCAD(V) replaces the attention layers of DDAD's
guided-diffusion UNet (attention at the 32/16/8 feature grids) by Global-feature Conditioned
Blocks, ResBlock -> self-attention -> cross-attention whose keys/values come from the Coarse
Feature Bank B_c (xi x d). diffusers' ``UNet2DConditionModel`` has exactly this block
structure in ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` / ``UNetMidBlock2DCrossAttn``
(ResnetBlock2D followed by a Transformer2DModel: LN+self-attn, LN+cross-attn, LN+FF), so the
bank, projected by a learned ``Linear(d -> cross_attention_dim)`` + LayerNorm, is passed as
``encoder_hidden_states`` ("a new modality condition").

Attention is only placed at the feature grids listed in ``attention_resolutions`` (32/16/8 as
in the paper; the presets never put attention on a grid larger than 32 x 32 tokens: at 64^2 or
128^2 tokens one CPU forward takes tens of seconds). Levels above use plain
``DownBlock2D`` / ``UpBlock2D`` (ResBlocks only).

Input range: the network works on images in [-1, 1]. Convert ``[0, 1]`` images with
:func:`images_to_model` (``2x - 1``) and back with :func:`model_to_images`.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .presets import unet_preset


def images_to_model(images: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] to the denoiser's range [-1, 1] (``2x - 1``)."""
    return images * 2.0 - 1.0


def model_to_images(x: torch.Tensor) -> torch.Tensor:
    """Map denoiser-range tensors in [-1, 1] back to images in [0, 1] (clamped)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def project_bank(bank: torch.Tensor, proj: nn.Linear, norm: nn.LayerNorm, batch: Optional[int],
                 owner: str) -> torch.Tensor:
    """The GCB context of a bank (CCAD Fig. 3a/3b: "a new modality condition"):
    ``LayerNorm(Linear(bank))``, ``B x xi x c``, from ``xi x d`` (one bank for the batch, e.g.
    B_c) or ``B x xi x d`` (per image, e.g. the FFB B_f of eq. 8); ``batch`` expands a shared
    bank (None: as it is). Errors name ``owner``'s ``bank_dim`` or the batch that disagrees."""
    if not torch.is_tensor(bank):
        raise TypeError(f"bank must be a torch.Tensor (xi x d or B x xi x d), got {type(bank).__name__}")
    if bank.dim() == 2:
        bank = bank.unsqueeze(0)
    if bank.dim() != 3:
        raise ValueError(f"bank must be xi x d or B x xi x d, got shape {tuple(bank.shape)}")
    if bank.shape[-1] != proj.in_features:
        raise ValueError(f"bank feature dim {bank.shape[-1]} does not match {owner}.bank_dim={proj.in_features}")
    if batch is not None and bank.shape[0] not in (1, batch):
        raise ValueError(f"bank batch {bank.shape[0]} does not match the input batch {batch}")
    w = proj.weight
    ctx = norm(proj(bank.to(device=w.device, dtype=w.dtype)))
    return ctx.expand(batch, -1, -1) if batch is not None and ctx.shape[0] != batch else ctx


class _DenoiserLayout:
    """The block layout, validation, presets and JSON of :data:`DenoiserConfig` (its fields are
    :class:`BankConditionedUNet`'s ``register_to_config`` arguments, documented there)."""

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        self.validate()

    # ------------------------------------------------------------------ validation
    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    def level_resolutions(self) -> list[int]:
        """Feature-grid size of every down level (level i: ``sample_size / 2**i``)."""
        return [self.sample_size // (2 ** i) for i in range(self.levels)]

    def validate(self) -> "DenoiserConfig":
        where = "DenoiserConfig"
        if self.levels < 1:
            raise ValueError(f"{where}.block_out_channels must list at least one level")
        factor = 2 ** (self.levels - 1)
        if self.sample_size < factor or self.sample_size % factor:
            raise ValueError(
                f"{where}.sample_size={self.sample_size} must be a multiple of 2**(levels-1)={factor} "
                f"for {self.levels} levels {self.block_out_channels}"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"{where}.norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                    f"entry, got {self.block_out_channels}"
                )
            if self.attention_resolutions and c % self.attention_head_dim:
                raise ValueError(
                    f"{where}.attention_head_dim={self.attention_head_dim} must divide every "
                    f"block_out_channels entry, got {self.block_out_channels}"
                )
        if self.bank_dim < 1 or self.cross_attention_dim < 1:
            raise ValueError(f"{where}.bank_dim and cross_attention_dim must be >= 1")
        if self.layers_per_block < 1:
            raise ValueError(f"{where}.layers_per_block must be >= 1, got {self.layers_per_block}")
        return self

    # ------------------------------------------------------------------ block layout
    def down_block_types(self) -> tuple[str, ...]:
        att = set(self.attention_resolutions)
        return tuple("CrossAttnDownBlock2D" if r in att else "DownBlock2D" for r in self.level_resolutions())

    def up_block_types(self) -> tuple[str, ...]:
        # up block i works at the grid of down level (levels - 1 - i)
        return tuple(
            "CrossAttnUpBlock2D" if d == "CrossAttnDownBlock2D" else "UpBlock2D"
            for d in reversed(self.down_block_types())
        )

    def mid_block_type(self) -> str:
        mid = self.level_resolutions()[-1]
        if self.attention_resolutions and mid <= max(self.attention_resolutions):
            return "UNetMidBlock2DCrossAttn"
        return "UNetMidBlock2D"  # ResBlocks only

    def reads_bank(self) -> bool:
        """Whether any block cross-attends to the bank: a level whose grid is in
        ``attention_resolutions``, or the middle block. Without one the bank condition is never
        read (the network is an unconditioned DDPM UNet)."""
        return ("CrossAttnDownBlock2D" in self.down_block_types()
                or self.mid_block_type() == "UNetMidBlock2DCrossAttn")

    def heads_per_level(self) -> tuple[int, ...]:
        return tuple(max(1, c // self.attention_head_dim) for c in self.block_out_channels)

    # ------------------------------------------------------------------ presets / io
    @classmethod
    def preset(cls, name: str, sample_size: Optional[int] = None, bank_dim: Optional[int] = None,
               **overrides: Any) -> "DenoiserConfig":
        """A row of ``UNET_PRESETS["bank"]`` (:mod:`ccad.models.presets`): ``tiny`` (tests),
        ``small`` (CPU demos at 64-128 px), ``base`` (DDAD-like, GPU, 256 px); ``overrides`` are
        further fields."""
        kwargs = unet_preset("bank", name)
        if sample_size is not None:
            kwargs["sample_size"] = int(sample_size)
        if bank_dim is not None:
            kwargs["bank_dim"] = int(bank_dim)
        kwargs.update(overrides)
        levels = len(kwargs["block_out_channels"])
        while levels > 1 and kwargs["sample_size"] % (2 ** (levels - 1)):
            levels -= 1  # small inputs: drop the deepest levels rather than fail
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])[:levels]
        spec = cls(**kwargs)
        if spec.attention_resolutions and not spec.reads_bank() and "attention_resolutions" not in overrides:
            # the preset's grids (tiny: 16 and 8, sized for 64 px) are absent at this input size
            # (tiny at 128 px runs at 128 / 64 / 32): attend on the deepest level and the middle block
            # instead, so the bank condition (CCAD sec. 3.3, eqs. 12-13) is read at every size
            kwargs["attention_resolutions"] = (spec.level_resolutions()[-1],)
            spec = cls(**kwargs)
        return spec

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_config(cls, config: Any) -> "DenoiserConfig":
        """The spec of a built model's ``.config`` (the one record of its architecture)."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DenoiserConfig":
        if not isinstance(data, dict):
            raise ValueError(f"DenoiserConfig: expected a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"DenoiserConfig: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


class BankConditionedUNet(ModelMixin, ConfigMixin):
    """eps_Theta(x_t; B_c): the CCAD(V) denoiser (CCAD eq. 15; GCB of Fig. 3a).

    ``forward(x_t, timesteps, bank) -> eps`` where ``x_t`` is ``B x 3 x S x S`` in [-1, 1]
    (noised), ``timesteps`` is an int, a 0-d tensor or a length-B tensor, and ``bank`` is the
    Coarse Feature Bank ``xi x d`` (shared by the batch) or ``B x xi x d``.

    A diffusers ``ModelMixin, ConfigMixin``: ``save_pretrained(dir)`` writes ``config.json`` and
    ``diffusion_pytorch_model.safetensors``, ``from_pretrained(dir)`` reads them. The
    ``register_to_config`` arguments below are the one record of the architecture: the model's
    ``.config`` holds them, :data:`DenoiserConfig` is a dataclass with exactly these fields (made
    from this signature), ``self.spec`` is the validated view of ``.config`` and
    :meth:`from_spec` builds from a ``DenoiserConfig``.

    Args:
        sample_size: input height = width in pixels (a multiple of ``2 ** (levels - 1)``).
        in_channels / out_channels: 3 for RGB pixel-space CCAD(V).
        block_out_channels: channels per resolution level (level i runs at ``sample_size / 2**i``).
        layers_per_block: ResBlocks per level (diffusers' ``layers_per_block``).
        attention_resolutions: feature-grid sizes (e.g. 32, 16, 8) whose levels get the
            GCB (self-attn + cross-attn on the bank). The middle block gets it when its grid is
            at most ``max(attention_resolutions)``.
        cross_attention_dim: width the bank is projected to (the UNet's context width).
        bank_dim: d, the feature dimension of the bank (xi x d).
        attention_head_dim: channels per attention head (the real head size; converted to a
            per-level head count for diffusers, whose ``attention_head_dim`` argument is
            historically the number of heads, see diffusers issue #2011).
        norm_num_groups: GroupNorm groups (must divide every entry of block_out_channels).
        transformer_layers: transformer layers per GCB.
        dropout: ResBlock dropout.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 64, in_channels: int = 3, out_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 attention_resolutions: tuple[int, ...] = (32, 16, 8), cross_attention_dim: int = 64,
                 bank_dim: int = 64, attention_head_dim: int = 32, norm_num_groups: int = 8,
                 transformer_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.spec = spec = DenoiserConfig.from_config(self.config)
        self.bank_proj = nn.Linear(spec.bank_dim, spec.cross_attention_dim)
        self.bank_norm = nn.LayerNorm(spec.cross_attention_dim)
        self.unet = UNet2DConditionModel(
            sample_size=spec.sample_size,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            down_block_types=spec.down_block_types(),
            up_block_types=spec.up_block_types(),
            mid_block_type=spec.mid_block_type(),
            block_out_channels=spec.block_out_channels,
            layers_per_block=spec.layers_per_block,
            norm_num_groups=spec.norm_num_groups,
            cross_attention_dim=spec.cross_attention_dim,
            # diffusers reads this argument as the number of heads per level (issue #2011)
            attention_head_dim=spec.heads_per_level(),
            transformer_layers_per_block=spec.transformer_layers,
            dropout=spec.dropout,
        )

    @classmethod
    def from_spec(cls, spec: DenoiserConfig) -> "BankConditionedUNet":
        return cls(**spec.validate().to_dict())

    def encode_bank(self, bank: torch.Tensor, batch: int) -> torch.Tensor:
        """Project the bank (``xi x d`` or ``B x xi x d``) to the cross-attention context ``B x xi x c``."""
        return project_bank(bank, self.bank_proj, self.bank_norm, batch, "DenoiserConfig")

    def forward(self, x_t: torch.Tensor, timesteps: Union[int, torch.Tensor], bank: torch.Tensor) -> torch.Tensor:
        if x_t.dim() != 4 or x_t.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"x_t must be B x {self.spec.in_channels} x H x W, got shape {tuple(x_t.shape)}"
            )
        b = x_t.shape[0]
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([int(timesteps)], device=x_t.device)
        timesteps = timesteps.to(x_t.device)
        if timesteps.dim() == 0 or timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(b)
        ctx = self.encode_bank(bank, b)
        return self.unet(x_t, timesteps, encoder_hidden_states=ctx).sample

    # ------------------------------------------------------------------ persistence
    @classmethod
    def load_legacy(cls, weights: Union[str, Path], spec: DenoiserConfig) -> "BankConditionedUNet":
        """Read a version-1 checkpoint (one ``denoiser.safetensors`` + its config as a dict)."""
        from safetensors.torch import load_file

        model = cls.from_spec(spec)
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return model


#: The architecture of :class:`BankConditionedUNet` as a plain dataclass (JSON round trip, the
#: ``method.denoiser`` config section): its fields, types and defaults are the model's
#: ``register_to_config`` arguments, read from the constructor's signature (one source); the
#: layout, validation and presets come from ``_DenoiserLayout``.
DenoiserConfig = dataclasses.make_dataclass(
    "DenoiserConfig",
    [(p.name, p.annotation, dataclasses.field(default=p.default))
     for p in list(inspect.signature(BankConditionedUNet.__init__).parameters.values())[1:]],
    bases=(_DenoiserLayout,), namespace={"__module__": __name__})
DenoiserConfig.__doc__ = ("Architecture of :class:`BankConditionedUNet` (plain values; JSON round trip); the "
                          "fields are its constructor's arguments.")
