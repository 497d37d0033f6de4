"""CCAD(F)'s Fine Compression Module tau_theta (papers/ccad.md sec. 3.2 "Fine Feature Bank", eq. 7-8).

Reading of eq. 7-8. D_bs in R^{zeta x d} is the batch-wise feature space (zeta patch features
of the current batch, from the latent encoder E, eq. 4-5 applied to the batch), B_c in
R^{xi x d} the Coarse Feature Bank. Q = D_bs theta_Q, K = B_c theta_W, V = B_c theta_V and
B_f = softmax(Q K^T / sqrt(d_k)) V theta_B in R^{zeta x d}. So the Fine Feature Bank has one
row per *batch patch* (zeta rows, not xi): row i is an attention-weighted mixture of bank
rows selected by patch i (a learned, soft k-NN retrieval of "the most relevant global
feature information from B_c for each data sample"). The module is computed per image:
the input ``B x n x d`` gives ``B x n x d_out`` and image b's context is its own n rows
(the paper's aim is per-sample selection; since the queries are independent rows, this
equals computing B_f on the flattened batch and splitting it by image). At test time D_bs
comes from the test image itself. Multi-head: the paper says "a multi-head cross-attention
layer" with theta_Q, theta_W, theta_V in R^{d x d_k} and theta_B in R^{d_k x d}; we split
d_k into ``num_heads`` heads of ``d_k / num_heads`` and scale each head by
``1/sqrt(d_k / num_heads)`` (for one head this is exactly eq. 8's ``1/sqrt(d_k)``). No
biases, no norms: eq. 7-8 are bias-free linear maps.

:func:`latent_patch_features` builds D_bs (and, over the training set, the features that the
coreset compresses into B_c) from the latent z = E(x): CCAD(F) takes both from the latent
encoder so they share a distribution (sec. 3.2; sec. 4.4 "same feature maps ... to generate
D_bs and B_c").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


def latent_patch_features(z: torch.Tensor, kernel: int = 3, stride: int = 1) -> torch.Tensor:
    """Patch features of the latent encoder E: ``B x C x h x w`` -> ``B x (h'*w') x (C*kernel^2)``.

    Each feature is the ``kernel x kernel`` neighbourhood of one latent cell, flattened
    channel-major (``F.unfold`` order: c, then the kernel rows/columns), with replicate padding
    at the border so every cell has a full neighbourhood drawn from the latent itself. With
    the default 3x3 a 4-channel SD KL latent gives d = 36 (a lone cell's 4 numbers say little
    about local structure; its neighbourhood does, like PatchCore's 3x3 aggregation), a
    32-channel TAEF2 latent d = 288. ``stride`` > 1 subsamples the centre cells
    (h' = ceil(h / stride)) to shorten the FFB; rows are in raster order of the centres.
    """
    if z.dim() != 4:
        raise ValueError(f"z must be B x C x h x w, got shape {tuple(z.shape)}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int, got {kernel}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    pad = kernel // 2
    zp = F.pad(z, (pad, pad, pad, pad), mode="replicate") if pad else z
    cols = F.unfold(zp, kernel_size=kernel, stride=stride)  # B x (C*k*k) x L
    return cols.transpose(1, 2).contiguous()


class FineCompressionModule(ModelMixin, ConfigMixin):
    """tau_theta(D_bs; B_c) -> B_f, eq. 7-8 (one multi-head cross-attention layer).

    Args:
        feature_dim: d of D_bs and B_c (``9 * C`` for :func:`latent_patch_features`).
        inner_dim: d_k (default d); must be divisible by ``num_heads``.
        num_heads: attention heads (``inner_dim / num_heads`` channels each).
        out_dim: width of B_f (default d, as eq. 8's ``R^{zeta x d}``).

    ``forward(queries, bank)``: ``queries`` = D_bs, ``B x n x d`` (or ``n x d``); ``bank`` =
    B_c, ``xi x d`` (shared) or ``B x xi x d``. Returns B_f, ``B x n x out_dim``.
    """

    @register_to_config
    def __init__(self, feature_dim: int, inner_dim: Optional[int] = None, num_heads: int = 1,
                 out_dim: Optional[int] = None) -> None:
        super().__init__()
        d = int(feature_dim)
        dk = int(inner_dim or d)
        do = int(out_dim or d)
        if d < 1 or dk < 1 or do < 1 or int(num_heads) < 1:
            raise ValueError(f"feature_dim/inner_dim/out_dim/num_heads must be >= 1, got {d}, {dk}, {do}, {num_heads}")
        if dk % int(num_heads):
            raise ValueError(f"inner_dim={dk} must be divisible by num_heads={num_heads}")
        self.heads = int(num_heads)
        self.to_q = nn.Linear(d, dk, bias=False)   # theta_Q
        self.to_k = nn.Linear(d, dk, bias=False)   # theta_W
        self.to_v = nn.Linear(d, dk, bias=False)   # theta_V
        self.to_out = nn.Linear(dk, do, bias=False)  # theta_B

    def attention_weights(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d_head)) per head: ``B x heads x n x xi`` (rows sum to 1)."""
        q, k, _ = self._qkv(queries, bank)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)

    def _qkv(self, queries: torch.Tensor, bank: torch.Tensor):
        d = self.config.feature_dim
        if queries.dim() == 2:
            queries = queries.unsqueeze(0)
        if bank.dim() == 2:
            bank = bank.unsqueeze(0)
        if queries.dim() != 3 or bank.dim() != 3 or queries.shape[-1] != d or bank.shape[-1] != d:
            raise ValueError(
                f"queries must be (B x) n x {d} and bank (B x) xi x {d}, "
                f"got {tuple(queries.shape)} and {tuple(bank.shape)}"
            )
        b = queries.shape[0]
        if bank.shape[0] not in (1, b):
            raise ValueError(f"bank batch {bank.shape[0]} does not match the queries' batch {b}")
        w = self.to_q.weight
        queries = queries.to(device=w.device, dtype=w.dtype)
        bank = bank.to(device=w.device, dtype=w.dtype)
        h = self.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # B x L x dk -> B x h x L x dk/h
            return x.reshape(x.shape[0], x.shape[1], h, -1).transpose(1, 2)

        q = split(self.to_q(queries))
        k = split(self.to_k(bank)).expand(b, -1, -1, -1)
        v = split(self.to_v(bank)).expand(b, -1, -1, -1)
        return q, k, v

    def forward(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(queries, bank)
        # softmax(Q K^T / sqrt(d_head)) V, eq. 8 (scale = 1/sqrt(d_head), SDPA's default)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
        return self.to_out(o)  # ... V theta_B
