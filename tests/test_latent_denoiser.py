"""CCAD(C)/(F) latent networks (GCB UNet, ControlNet, BankProjector, FCM eq. 7-8) and latent diffusion
(eq. 9-11, 19)."""
from __future__ import annotations

import math

import pytest
import torch

from ccad.diffusion.latent import (
    latent_ddim_reconstruct,
    latent_distance_map,
    latent_eps_loss,
    latent_start_step,
)
from ccad.diffusion.schedule import make_scheduler
from ccad.models.fcm import FineCompressionModule, latent_patch_features
from ccad.models.latent_denoiser import (
    BankProjector,
    build_controlnet,
    build_latent_unet,
    latent_eps,
    latent_unet_kwargs,
)


def _tiny(c: int = 4, size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    unet = build_latent_unet("tiny", c, size).eval()
    proj = BankProjector(16, unet.config.cross_attention_dim).eval()
    return unet, proj


def _randomise_zero_convs(controlnet, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
        conv = controlnet.controlnet_cond_embedding.conv_out
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("c", [4, 32])
def test_shapes_tiny_with_controlnet(c):
    unet, proj = _tiny(c, 8)
    cn = build_controlnet(unet).eval()
    z = torch.randn(2, c, 8, 8)
    bank = torch.randn(10, 16)
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        eps = latent_eps(unet, cn, proj, z, 500, bank, img)
        eps2 = latent_eps(unet, None, proj, z, torch.tensor([3, 900]), bank.expand(2, -1, -1))
    assert eps.shape == z.shape and eps2.shape == z.shape
    assert torch.isfinite(eps).all()
    with pytest.raises(ValueError, match="f8"):
        latent_eps(unet, cn, proj, z, 5, bank, torch.rand(2, 3, 32, 32))


def test_presets_config_and_build():
    for preset in ("tiny", "small", "base"):
        kw = latent_unet_kwargs(preset, 4, 32)
        assert kw["in_channels"] == kw["out_channels"] == 4
        assert kw["mid_block_type"] == "UNetMidBlock2DCrossAttn"
        # attention only at grids <= 32 tokens per side
        for i, t in enumerate(kw["down_block_types"]):
            if t == "CrossAttnDownBlock2D":
                assert 32 // 2 ** i <= 32
        assert len(kw["attention_head_dim"]) == len(kw["block_out_channels"])
    base = latent_unet_kwargs("base", 4, 32)
    assert base["block_out_channels"] == (320, 640, 1280, 1280) and base["cross_attention_dim"] == 768
    assert base["down_block_types"][:3] == ("CrossAttnDownBlock2D",) * 3
    assert base["down_block_types"][3] == "DownBlock2D"
    assert base["attention_head_dim"] == (8, 8, 8, 8)  # SD 1.5: 8 heads (diffusers' head-count naming)
    small = build_latent_unet("small", 32, 32)
    assert small.config.in_channels == 32 and small.config.cross_attention_dim == 128
    assert "CrossAttnDownBlock2D" in small.config.down_block_types
    # real head width 64 -> heads = channels / 64
    assert tuple(small.config.attention_head_dim) == (1, 2, 2)
    with pytest.raises(ValueError, match="preset"):
        latent_unet_kwargs("huge", 4, 32)


def test_tiny_forward_at_32x32():
    unet = build_latent_unet("tiny", 4, 32).eval()
    proj = BankProjector(64, unet.config.cross_attention_dim)
    z, bank = torch.randn(2, 4, 32, 32), torch.randn(2, 64, 64)
    with torch.no_grad():
        eps = latent_eps(unet, None, proj, z, 10, bank)
    assert eps.shape == z.shape and torch.isfinite(eps).all()  # speed: python -m benchmarks speed, not a timed test


def test_context_conditions_and_row_permutation_invariance():
    unet, proj = _tiny(4, 8)
    z = torch.randn(2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(12, 16, generator=g)
    other = torch.randn(12, 16, generator=g)
    perm = torch.randperm(12, generator=g)
    with torch.no_grad():
        e1 = latent_eps(unet, None, proj, z, 300, bank)
        e2 = latent_eps(unet, None, proj, z, 300, other)
        e3 = latent_eps(unet, None, proj, z, 300, bank[perm])
    assert (e1 - e2).abs().max() > 1e-4
    torch.testing.assert_close(e1, e3, atol=1e-5, rtol=1e-4)


def test_controlnet_zero_init_then_residuals_matter():
    unet, proj = _tiny(4, 8)
    cn = build_controlnet(unet).eval()
    # f8: the conditioning embedding has 3 stride-2 convs
    strides = [m.stride[0] for m in cn.controlnet_cond_embedding.blocks]
    assert strides.count(2) == 3
    z, bank = torch.randn(2, 4, 8, 8), torch.randn(6, 16)
    img_a, img_b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        plain = latent_eps(unet, None, proj, z, 200, bank)
        zero = latent_eps(unet, cn, proj, z, 200, bank, img_a)
        torch.testing.assert_close(zero, plain, atol=1e-5, rtol=1e-4)  # from_unet: zero convs
        _randomise_zero_convs(cn)
        ea = latent_eps(unet, cn, proj, z, 200, bank, img_a)
        eb = latent_eps(unet, cn, proj, z, 200, bank, img_b)
        e0 = latent_eps(unet, cn, proj, z, 200, bank, img_a, control_scale=0.0)
    assert (ea - plain).abs().max() > 1e-4
    assert (ea - eb).abs().max() > 1e-5  # the image condition reaches the output
    torch.testing.assert_close(e0, plain, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="stride-2"):
        build_controlnet(unet, conditioning_embedding_out_channels=(8, 16, 32))


def test_fcm_shape_dependence_and_manual_attention():
    torch.manual_seed(0)
    d = 36
    fcm = FineCompressionModule(d, inner_dim=24, num_heads=1, out_dim=20).eval()
    q = torch.randn(3, 10, d)
    bank = torch.randn(7, d)
    with torch.no_grad():
        bf = fcm(q, bank)
        assert bf.shape == (3, 10, 20)  # one FFB row per batch patch (eq. 8: zeta x d)
        assert (fcm(q + torch.randn_like(q), bank) - bf).abs().max() > 1e-4
        assert (fcm(q, bank + torch.randn_like(bank)) - bf).abs().max() > 1e-4
        # manual eq. 7-8 for one head
        Q, K, V = q @ fcm.to_q.weight.T, bank @ fcm.to_k.weight.T, bank @ fcm.to_v.weight.T
        ref = torch.softmax(Q @ K.T / math.sqrt(24), dim=-1) @ V @ fcm.to_out.weight.T
        torch.testing.assert_close(bf, ref, atol=1e-5, rtol=1e-4)
        w = fcm.attention_weights(q, bank)
        assert w.shape == (3, 1, 10, 7)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 1, 10))
        # per-image bank and multi-head shape
        fcm4 = FineCompressionModule(d, inner_dim=32, num_heads=4)
        assert fcm4(q, bank.expand(3, -1, -1)).shape == (3, 10, d)
    with pytest.raises(ValueError):
        FineCompressionModule(d, inner_dim=30, num_heads=4)


def test_latent_patch_features():
    z = torch.randn(2, 4, 6, 5)
    f = latent_patch_features(z)
    assert f.shape == (2, 30, 36)
    # an interior cell's feature is its 3x3 neighbourhood, channel-major
    i, j = 2, 3
    ref = z[0, :, i - 1:i + 2, j - 1:j + 2].reshape(-1)
    torch.testing.assert_close(f[0, i * 5 + j], ref)
    assert latent_patch_features(torch.randn(1, 32, 8, 8), stride=2).shape == (1, 16, 288)
    # FCM on latent features -> BankProjector context -> UNet
    unet = build_latent_unet("tiny", 4, 8)
    fcm = FineCompressionModule(36)
    proj = BankProjector(36, unet.config.cross_attention_dim)
    zz = torch.randn(2, 4, 8, 8)
    bf = fcm(latent_patch_features(zz), torch.randn(20, 36))
    assert latent_eps(unet, None, proj, zz, 5, bf).shape == zz.shape


def test_loss_decreases_tiny():
    torch.manual_seed(0)
    sched = make_scheduler()
    unet = build_latent_unet("tiny", 4, 8)
    proj = BankProjector(16, unet.config.cross_attention_dim)
    cn = build_controlnet(unet)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    z0 = torch.stack([torch.stack([xx, yy, xx * yy, -xx]) * s for s in (1.0, -1.0, 0.5, 1.5)])
    img = torch.rand(4, 3, 64, 64, generator=g)
    bank = torch.randn(8, 16, generator=g)

    def eps_fn(z, t):
        return latent_eps(unet, cn, proj, z, t, bank, img)

    def eval_loss() -> float:
        ge = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(latent_eps_loss(eps_fn, z0, sched, ge)) for _ in range(4)) / 4

    params = list(unet.parameters()) + list(proj.parameters()) + list(cn.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    before = eval_loss()
    for _ in range(100):
        loss = latent_eps_loss(eps_fn, z0, sched, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f'loss before {before:.4f} after {after:.4f}')
    assert after < 0.7 * before, (before, after)


def test_loss_deterministic_and_oracle_zero():
    sched = make_scheduler()
    z0 = torch.randn(3, 4, 8, 8)
    unet, proj = _tiny(4, 8)
    def fn(z, t):
        return latent_eps(unet, None, proj, z, t, torch.randn(5, 16, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        a = latent_eps_loss(fn, z0, sched, torch.Generator().manual_seed(7))
        b = latent_eps_loss(fn, z0, sched, torch.Generator().manual_seed(7))
    assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-7) and a.dim() == 0
    abar = sched.alphas_cumprod

    def oracle(z, t):  # the exact eps given z0
        a_t = abar[t].view(-1, 1, 1, 1)
        return (z - a_t.sqrt() * z0) / (1 - a_t).sqrt()

    assert float(latent_eps_loss(oracle, z0, sched, torch.Generator().manual_seed(0))) < 1e-8


def test_reconstruction_oracle_small_start_and_determinism():
    sched = make_scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert latent_start_step(sched) == 999
    z0 = torch.randn(2, 4, 8, 8)
    abar = sched.alphas_cumprod

    def oracle(z, t):
        a_t = abar[t].view(-1, 1, 1, 1)
        return (z - a_t.sqrt() * z0) / (1 - a_t).sqrt()

    # oracle eps: exact recovery even from the paper's default start T-1 = 999, eta 0 and eta 1
    for eta in (0.0, 1.0):
        rec = latent_ddim_reconstruct(oracle, z0, sched, generator=torch.Generator().manual_seed(0), eta=eta)
        torch.testing.assert_close(rec, z0, atol=1e-3, rtol=1e-3)
    # zero eps with a small start step: x0_pred ~= z0
    def zero(z, t):
        return torch.zeros_like(z)
    rec = latent_ddim_reconstruct(zero, z0, sched, start_step=2, steps=1, generator=torch.Generator().manual_seed(0))
    err = float((rec - z0).pow(2).mean().sqrt())  # = sqrt((1 - abar_2) / abar_2) ~ 0.06 for SD's table
    assert err == pytest.approx(math.sqrt((1 - float(abar[2])) / float(abar[2])), rel=0.2)
    assert err < 0.1
    # determinism with the tiny network, stochastic DDIM
    unet, proj = _tiny(4, 8)
    bank = torch.randn(5, 16)
    def fn(z, t):
        return latent_eps(unet, None, proj, z, t, bank)
    r1 = latent_ddim_reconstruct(fn, z0, sched, steps=4, eta=1.0, generator=torch.Generator().manual_seed(3))
    r2 = latent_ddim_reconstruct(fn, z0, sched, steps=4, eta=1.0, generator=torch.Generator().manual_seed(3))
    r3 = latent_ddim_reconstruct(fn, z0, sched, steps=4, eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(r1, r2, atol=0, rtol=0)
    assert (r1 - r3).abs().max() > 1e-4 and r1.shape == z0.shape


def test_latent_distance_map():
    z0 = torch.zeros(2, 4, 8, 8)
    zh = z0.clone()
    zh[:, :, 2, 3] = 2.0
    m = latent_distance_map(z0, zh, 64)
    assert m.shape == (2, 1, 64, 64)
    assert m.max() > 0 and m[:, :, 60:, 60:].abs().max() == 0
    assert latent_distance_map(z0, zh, (32, 16)).shape == (2, 1, 32, 16)
    assert float(latent_distance_map(z0, z0 + 1, 16).mean()) == pytest.approx(1.0)


def test_save_load_round_trip(tmp_path):
    unet, proj = _tiny(4, 8)
    cn = build_controlnet(unet).eval()
    _randomise_zero_convs(cn)
    fcm = FineCompressionModule(16, num_heads=2).eval()
    for name, m in (("unet", unet), ("controlnet", cn), ("projector", proj), ("fcm", fcm)):
        m.save_pretrained(tmp_path / name)
    from diffusers import ControlNetModel, UNet2DConditionModel

    u2 = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet").eval()
    c2 = ControlNetModel.from_pretrained(tmp_path, subfolder="controlnet").eval()
    p2 = BankProjector.from_pretrained(tmp_path, subfolder="projector").eval()
    f2 = FineCompressionModule.from_pretrained(tmp_path, subfolder="fcm").eval()
    z, bank, img = torch.randn(1, 4, 8, 8), torch.randn(6, 16), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(latent_eps(u2, c2, p2, z, 7, bank, img), latent_eps(unet, cn, proj, z, 7, bank, img))
        torch.testing.assert_close(f2(bank[None], bank), fcm(bank[None], bank))
    assert f2.config.num_heads == 2 and p2.config.bank_dim == 16


def test_pretrained_pipeline_folder_adapts_channels(tmp_path):
    torch.manual_seed(0)
    src = build_latent_unet("tiny", 4, 8)
    src.save_pretrained(tmp_path / "pipe" / "unet")  # an SD-style pipeline folder
    u = build_latent_unet("tiny", 32, 8, pretrained=tmp_path / "pipe")
    assert u.config.in_channels == u.config.out_channels == 32
    assert u.conv_in.weight.shape[1] == 32 and u.conv_out.weight.shape[0] == 32
    torch.testing.assert_close(u.conv_out.weight[:4], src.conv_out.weight)
    torch.testing.assert_close(u.conv_in.weight[:, 4], src.conv_in.weight[:, 0] * (4 / 32))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    torch.testing.assert_close(u.state_dict()[name], src.state_dict()[name])
    eps = latent_eps(u, None, BankProjector(16, 64), torch.randn(1, 32, 8, 8), 3, torch.randn(4, 16))
    assert eps.shape == (1, 32, 8, 8)
    # same channel count loads unchanged from a plain UNet folder
    same = build_latent_unet("tiny", 4, 8, pretrained=tmp_path / "pipe" / "unet")
    torch.testing.assert_close(same.conv_in.weight, src.conv_in.weight)
    u.save_pretrained(tmp_path / "adapted")
    assert type(u).from_pretrained(tmp_path / "adapted").config.in_channels == 32
    with pytest.raises(FileNotFoundError):
        build_latent_unet("tiny", 4, 8, pretrained=tmp_path)


def test_base_preset_is_sd15_sized_on_meta_device():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # no memory: only shapes
        unet = UNet2DConditionModel(**latent_unet_kwargs("base", 4, 32))
        cn = build_controlnet(unet, load_weights_from_unet=False)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_cn = sum(p.numel() for p in cn.parameters())
    assert abs(n_unet - 859.52e6) < 0.1e6  # SD 1.5's UNet
    assert 300e6 < n_cn < 400e6
    assert tuple(cn.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
