"""DeCo-Diff's deviation predictor eta_theta(z_t, t) (papers/deco-diff.md eq. 12, section 5.1, supp. D.1).

The paper uses an attention UNet with a timestep embedding (following latent diffusion), no class
or text conditioning: DeCo-Diff is unconditional and one model serves all classes. Its default
"UNet-L" has 256 base channels, channel multipliers (1, 2, 4), 2 residual blocks per level,
attention at downsampling factors {1, 2, 4} and dropout 0.4 (395M parameters; XS = 64 channels,
25M). Here the network is a plain diffusers ``UNet2DModel`` (no cross-attention, no
``class_embed_type``) whose in/out channels are the latent channels, called as
``net(z_t, t).sample`` -> eta (same shape as ``z_t``). ``t`` is the 0-based scheduler index
(``0 .. T-1``; paper step ``t = index + 1``), see ``ccad.diffusion.deco``.

Departures from the paper, on purpose (CPU budget): attention only on grids of at most
``attn_max_grid`` cells (16 x 16 by default, none for ``tiny``) instead of at every level, and
much smaller widths. Dropout defaults to 0 (the paper's 0.4 is for 800 epochs on a large
model; pass ``dropout=0.4`` to follow it).

Presets (parameters measured with ``count_parameters`` at ``sample_size=32``; CPU forward
times are best-of-7 wall clock for a ``B x C x 32 x 32`` latent on this project's 2-core dev
machine under ``torch.no_grad``):

=======  ===============  ======  ==========  ==========  ==========  ==================================
preset   channels         layers  attention   params C=4  params C=32 forward (CPU)
=======  ===============  ======  ==========  ==========  ==========  ==================================
tiny     (32, 64)         1       none        0.64 M      0.65 M      B=2, C=32, 1 thread: 30 ms/batch
small    (64, 128, 256)   1       grids <=16  11.12 M     11.15 M     C=4, 2 threads: 33 ms/img (B=1),
                                                                      20 ms/img (B=4); 1 thread ~70-100
base     (128, 256, 512)  2       grids <=16  64.15 M     64.21 M     GPU preset (cf. paper XS 25M, S 99M)
=======  ===============  ======  ==========  ==========  ==========  ==================================

At a 32 x 32 latent "grids <= 16" means attention on the 16 x 16 and 8 x 8 levels and in the
mid block. Rerun ``python -m ccad.models.deco_net`` to re-measure on another machine (numbers
swing 2-5x when other jobs share the cores).
"""
from __future__ import annotations

from diffusers import UNet2DModel

from .presets import UNET_PRESETS, unet_preset


def build_deco_unet(preset: str = "small", latent_channels: int = 4, sample_size: int = 32,
                    **overrides) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` predicting DeCo-Diff's deviation eta (eq. 11-12).

    ``preset`` names a row of ``UNET_PRESETS["deco"]`` (:mod:`ccad.models.presets`: tiny / small /
    base); ``overrides`` replace its fields (``block_out_channels``, ``layers_per_block``,
    ``attn_max_grid``, ``norm_num_groups``, ``attention_head_dim``, ``dropout``). Level ``i``
    works on a ``sample_size / 2**i`` grid; it gets self-attention iff that side is ``<=
    attn_max_grid`` (the mid block likewise). Unconditional: no class embedding, no
    cross-attention. The built model's ``.config`` is the record of what was built.
    """
    p = unet_preset("deco", preset)
    unknown = sorted(set(overrides) - set(p))
    if unknown:
        raise ValueError(f"unknown DeCo net field(s) {unknown}; known: {sorted(p)}")
    p.update(overrides)
    n_levels = len(p["block_out_channels"])
    if int(sample_size) % (2 ** (n_levels - 1)) != 0:
        raise ValueError(f"sample_size {sample_size} must be divisible by {2 ** (n_levels - 1)}")
    grids = [int(sample_size) // (2 ** i) for i in range(n_levels)]
    max_grid = p["attn_max_grid"]
    attn = [max_grid is not None and g <= max_grid for g in grids]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=int(sample_size),
        in_channels=int(latent_channels),
        out_channels=int(latent_channels),
        block_out_channels=tuple(p["block_out_channels"]),
        layers_per_block=int(p["layers_per_block"]),
        down_block_types=down,
        up_block_types=up,
        add_attention=bool(max_grid is not None and grids[-1] <= max_grid),
        attention_head_dim=int(p["attention_head_dim"]),
        norm_num_groups=int(p["norm_num_groups"]),
        dropout=float(p["dropout"]),
        class_embed_type=None,
        num_class_embeds=None,
    )


def count_parameters(net) -> int:
    return sum(int(q.numel()) for q in net.parameters())


def _benchmark() -> None:  # pragma: no cover - manual measurement helper
    import time

    import torch

    def timed(net, z, reps=10):
        t = torch.zeros(z.shape[0], dtype=torch.long)
        with torch.no_grad():
            for _ in range(2):
                net(z, t)
            t0 = time.perf_counter()
            for _ in range(reps):
                net(z, t)
        return (time.perf_counter() - t0) / reps * 1000

    for name in UNET_PRESETS["deco"]:
        for c in (4, 32):
            net = build_deco_unet(name, c, 32).eval()
            msg = f"{name:5s} C={c:2d} params={count_parameters(net) / 1e6:.2f}M"
            if name != "base":
                for threads, b in ((1, 2), (2, 1), (2, 2)):
                    torch.set_num_threads(threads)
                    msg += f" | {threads}thr B={b}: {timed(net, torch.randn(b, c, 32, 32)):.1f}ms"
            print(msg, flush=True)


if __name__ == "__main__":  # pragma: no cover
    _benchmark()
