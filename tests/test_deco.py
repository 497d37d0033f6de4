"""DeCo-Diff engine pieces (ccad/diffusion/deco.py, ccad/models/deco_net.py): small generated tensors only."""
from __future__ import annotations

import math

import pytest
import torch

from ccad.diffusion.deco import (
    deco_anomaly_map,
    deco_correct,
    deco_forward,
    deco_loss,
    deco_scheduler,
    deco_timesteps,
    deco_training_pair,
    random_patch_mask,
    shuffle_patches,
)
from ccad.models.deco_net import build_deco_unet, count_parameters


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coded_latents(b: int = 6, c: int = 2, h: int = 16, w: int = 16) -> torch.Tensor:
    """Latent whose value encodes (image, channel, y, x): b*1e4 + c*1e3 + y*w + x."""
    bi = torch.arange(b).view(b, 1, 1, 1) * 10000.0
    ci = torch.arange(c).view(1, c, 1, 1) * 1000.0
    pos = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    return bi + ci + pos


# ----------------------------------------------------------------------------- schedule
def test_scheduler_is_squared_cosine_with_ten_steps():
    s = deco_scheduler()
    ab = s.alphas_cumprod.double()
    assert ab.numel() == 10
    assert bool((ab[1:] < ab[:-1]).all()) and 0 < float(ab[-1]) < 1e-3
    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    expect = [f((i + 1) / 10) / f(0) for i in range(9)]
    assert torch.allclose(ab[:9], torch.tensor(expect, dtype=torch.float64), atol=1e-6)


def test_deco_timesteps_follow_the_respaced_schedule():
    assert deco_timesteps(10, 5) == [8, 6, 4, 2, 0]
    assert deco_timesteps(10, 10) == list(range(9, -1, -1))
    assert deco_timesteps(10, 2) == [5, 0]
    assert deco_timesteps(10, 1) == [0]
    assert deco_timesteps(10, 3, start_t=9) == [9, 4, 0]


# ----------------------------------------------------------------------------- masks
def test_mask_ratio_and_patch_sizes_in_range_and_patches_aligned():
    b, h, w = 64, 32, 32
    mask, ks, ratios = random_patch_mask((b, 4, h, w), gen(1), return_info=True)
    assert mask.shape == (b, 1, h, w)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert set(ks.tolist()) <= {1, 2, 4, 8} and len(set(ks.tolist())) >= 3
    assert float(ratios.min()) >= 0.0 and float(ratios.max()) <= 0.7
    for i in range(b):
        k = int(ks[i])
        blocks = mask[i, 0].view(h // k, k, w // k, k)
        assert bool((blocks == blocks[:, :1, :, :1]).all()), "mask is not made of aligned k x k patches"
        n = (h // k) * (w // k)
        assert float(mask[i].mean()) == pytest.approx(round(float(ratios[i]) * n) / n)
    assert float(mask.mean()) == pytest.approx(0.35, abs=0.1)


def test_mask_given_patch_size_tensor_and_ragged_border():
    ks = torch.tensor([8, 8, 8])
    mask, got, _ = random_patch_mask((3, 1, 12, 12), gen(2), 1.0, ks, return_info=True)
    assert got.tolist() == [8, 8, 8] and mask.shape == (3, 1, 12, 12)
    assert bool((mask[:, :, :8, :8] == mask[:, :, :1, :1]).all())  # first full patch constant


def test_shuffle_uses_aligned_patches_of_other_images():
    z0 = coded_latents(b=6, c=2, h=16, w=16)
    ks = torch.tensor([1, 2, 4, 8, 2, 4])
    z_src, smask = shuffle_patches(z0, gen(3), 0.3, ks)
    assert smask.shape == (6, 1, 16, 16)
    keep = smask.expand_as(z0) == 0
    assert torch.equal(z_src[keep], z0[keep])
    assert float(smask.mean()) <= 0.3 + 1e-6 and float(smask.sum()) > 0
    src_img = torch.div(z_src, 10000, rounding_mode="floor")
    for i in range(6):
        m = smask[i, 0].bool()
        if not m.any():
            continue
        assert bool((src_img[i][:, m] != i).all()), "a shuffled patch came from the same image"
        # channel is preserved and a k x k patch is copied as a block (consecutive positions)
        ch = torch.div(z_src[i] % 10000, 1000, rounding_mode="floor")
        assert torch.equal(ch[:, m], torch.arange(2).view(2, 1).expand(2, int(m.sum())).float())
        k = int(ks[i])
        pos = (z_src[i, 0] % 1000).view(16 // k, k, 16 // k, k)
        mb = m.view(16 // k, k, 16 // k, k)
        rel = pos - pos[:, :1, :, :1]
        expect = (torch.arange(k).view(1, k, 1, 1) * 16 + torch.arange(k).view(1, 1, 1, k)).float()
        assert bool(((rel == expect) | ~mb).all())


# ----------------------------------------------------------------------------- training pair
def test_deco_forward_matches_eq_10_to_12_by_hand():
    s = deco_scheduler()
    g = gen(4)
    z0 = torch.randn(5, 4, 8, 8, generator=g)
    eps = torch.randn(5, 4, 8, 8, generator=g)
    mask = (torch.rand(5, 1, 8, 8, generator=g) > 0.5).float()
    t = torch.tensor([0, 2, 5, 8, 9])
    z_t, eta = deco_forward(z0, t, eps, mask, s)
    ab = s.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    c = (1 - ab.sqrt()) / (1 - ab).sqrt()
    eta_hand = (eps.double() - c * z0.double()) * mask
    zt_hand = mask * (ab.sqrt() * z0 + (1 - ab).sqrt() * eps) + (1 - mask) * z0
    assert torch.allclose(eta.double(), eta_hand, atol=1e-5)
    assert torch.allclose(z_t.double(), zt_hand.double(), atol=1e-5)
    off = mask.expand_as(z0) == 0
    assert bool((eta[off] == 0).all()) and torch.equal(z_t[off], z0[off])


def test_training_pair_target_zero_off_mask_and_gaussian_eps_on_mask():
    s = deco_scheduler()
    z0 = torch.randn(16, 4, 16, 16, generator=gen(5))
    z_t, t, eta, mask = deco_training_pair(z0, s, gen(6), r_shuffle_max=0.0)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 9
    off = mask.expand_as(z0) == 0
    on = ~off
    assert bool((eta[off] == 0).all()) and torch.equal(z_t[off], z0[off])
    ab = s.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    c = ((1 - ab.sqrt()) / (1 - ab).sqrt()).float()
    eps = (eta + c * z0)[on]  # invert eq. 11 on noised cells
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1.0) < 0.05
    s_t = (1 - ab).sqrt().float()
    assert torch.allclose(z_t, z0 + s_t * eta, atol=1e-6)


def test_training_pair_shuffle_replaces_eps_with_other_images_patches():
    s = deco_scheduler()
    z0 = coded_latents(b=8, c=2, h=16, w=16) / 1e5  # distinct small values, decodable
    _, t, eta, mask = deco_training_pair(z0, s, gen(7), r_shuffle_max=0.3, r_mask_max=0.7)
    ab = s.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    c = (1 - ab.sqrt()) / (1 - ab).sqrt()
    eps = eta.double() + c * z0.double()
    values = set((z0.double() * 1e5).round().long().flatten().tolist())
    on = mask.expand_as(z0).bool()
    hits = [int(v) in values for v in (eps[on] * 1e5).round().long().tolist()]
    frac = sum(hits) / max(1, len(hits))
    assert 0.0 < frac < 0.35  # some (not most) noised cells carry copied latent values


def test_training_pair_is_deterministic_under_a_fixed_generator():
    s = deco_scheduler()
    z0 = torch.randn(4, 4, 16, 16, generator=gen(8))
    a = deco_training_pair(z0, s, gen(9))
    b = deco_training_pair(z0, s, gen(9))
    c = deco_training_pair(z0, s, gen(10))
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    assert (a[0] - c[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- correction
@pytest.mark.parametrize("steps,strategy", [(5, "z_t-1"), (10, "z_t-1"), (2, "z_t-1"), (5, "z0")])
def test_oracle_network_recovers_z0_exactly(steps, strategy):
    s = deco_scheduler()
    g = gen(11)
    z0 = torch.randn(3, 4, 16, 16, generator=g)
    mask = random_patch_mask(z0.shape, g)
    eps = torch.randn(z0.shape, generator=g)
    t0 = deco_timesteps(10, steps)[0]
    z_t, eta_true = deco_forward(z0, torch.full((3,), t0), eps, mask, s)
    ab = s.alphas_cumprod.double()
    calls = []

    def oracle(z, t):  # the true deviation of the current state from z0
        calls.append(int(t[0]))
        eta = (z - z0) / float((1 - ab[int(t[0])]).sqrt())
        if len(calls) == 1:
            assert torch.allclose(eta, eta_true, atol=1e-5)  # eq. 13's eta is the training target
        return eta

    out = deco_correct(oracle, z_t, s, steps=steps, strategy=strategy)
    assert calls == deco_timesteps(10, steps)
    assert torch.allclose(out, z0, atol=1e-5)


def test_zero_network_leaves_the_latent_unchanged():
    s = deco_scheduler()
    z = torch.randn(2, 4, 8, 8, generator=gen(12))
    out = deco_correct(lambda z_t, t: torch.zeros_like(z_t), z, s)
    torch.testing.assert_close(out, z, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- map
def test_anomaly_map_zero_bounded_saturating_and_larger_on_a_deviation():
    g = gen(13)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    x0 = torch.rand(2, 3, 64, 64, generator=g)
    a0 = deco_anomaly_map(z0, z0.clone(), x0, x0.clone())
    assert a0.shape == (2, 1, 64, 64) and float(a0.abs().max()) == 0.0
    a_sat = deco_anomaly_map(z0, z0 + 5.0, x0, (x0 + 0.9).clamp(max=5), sigma_l=0, sigma_p=0)
    assert torch.allclose(a_sat, torch.ones_like(a_sat))
    z1, x1 = z0.clone(), x0.clone()
    z1[:, :, 2:4, 2:4] += 1.0
    x1[:, :, 16:32, 16:32] = 1.0 - x1[:, :, 16:32, 16:32]
    a = deco_anomaly_map(z0, z1, x0, x1)
    assert float(a.max()) <= 1.0 + 1e-6 and float(a.min()) >= 0.0
    inside, outside = a[:, :, 18:30, 18:30].mean(), a[:, :, 40:, 40:].mean()
    assert float(inside) > 0.3 and float(outside) < 0.05


def test_anomaly_map_formula_by_hand():
    z0 = torch.zeros(1, 4, 4, 4)
    x0 = torch.zeros(1, 3, 32, 32)
    a = deco_anomaly_map(z0, z0 + 0.1, x0, x0 + 0.1, sigma_l=0, sigma_p=0)
    # d_l = 0.1 -> 0.1/0.2; d_p = 0.1 * 2 ([-1, 1] units) -> 0.2/0.4; a = sqrt(0.5 * 0.5)
    assert torch.allclose(a, torch.full_like(a, 0.5), atol=1e-6)
    a_mean = deco_anomaly_map(z0, z0 + 0.1, x0, x0 + torch.tensor([0.3, 0.0, 0.0]).view(1, 3, 1, 1),
                              sigma_l=0, sigma_p=0, pixel_reduce="mean", pixel_scale=1.0)
    assert torch.allclose(a_mean, torch.full_like(a_mean, math.sqrt(0.5 * 0.25)), atol=1e-6)


# ----------------------------------------------------------------------------- network
def test_presets_are_unconditional_unets_with_attention_only_on_small_grids():
    tiny = build_deco_unet("tiny", 32, 32)
    assert tiny.config.class_embed_type is None and tiny.config.num_class_embeds is None
    assert all("Attn" not in b for b in tiny.config.down_block_types + tiny.config.up_block_types)
    assert not tiny.config.add_attention
    small = build_deco_unet("small", 4, 32)
    assert small.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert small.config.in_channels == small.config.out_channels == 4
    assert 1e5 < count_parameters(tiny) < count_parameters(small)
    z = torch.randn(2, 32, 32, 32)
    t = torch.tensor([0, 9])
    with torch.no_grad():
        out = tiny.eval()(z, t).sample
    assert out.shape == z.shape  # its speed is python -m benchmarks speed's business, not a timed test


def _toy_latents(n: int, generator: torch.Generator, template: torch.Tensor) -> torch.Tensor:
    return template + 0.1 * torch.randn((n,) + tuple(template.shape), generator=generator)


def test_short_training_lowers_the_loss_and_corrects_a_planted_patch():
    torch.manual_seed(0)
    s = deco_scheduler()
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    template = torch.stack([torch.sin(xx / 2.5), torch.cos(yy / 3.0), torch.sin((xx + yy) / 4.0),
                            torch.cos((xx - yy) / 3.5)])  # 4 x 16 x 16 "normal" latent
    net = build_deco_unet("tiny", 4, 16)
    data_g = gen(20)

    def eval_loss() -> float:
        with torch.no_grad():
            g = gen(99)
            return sum(float(deco_loss(net, _toy_latents(16, g, template), s, g)) for _ in range(4)) / 4

    before = eval_loss()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    train_g = gen(21)
    net.train()
    for _ in range(200):
        loss = deco_loss(net, _toy_latents(8, data_g, template), s, train_g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)

    normal = _toy_latents(2, gen(30), template)
    anomalous = normal.clone()
    anomalous[:, :, 4:8, 4:8] += 2.5
    corrected = deco_correct(net, anomalous, s)
    err_in = (anomalous - normal)[:, :, 4:8, 4:8].abs().mean()
    err_out = (corrected - normal)[:, :, 4:8, 4:8].abs().mean()
    assert float(err_out) < 0.5 * float(err_in), (float(err_in), float(err_out))
    # normal regions stay (roughly) where they were
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[2:10, 2:10] = False
    assert float((corrected - anomalous)[:, :, keep].abs().mean()) < 0.3
