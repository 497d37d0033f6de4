"""BankConditionedUNet (CCAD(V) GCB denoiser): shapes, bank conditioning, config and weight I/O."""
from __future__ import annotations

import json

import pytest
import torch

from ccad.models import BankConditionedUNet, DenoiserConfig, images_to_model, model_to_images

S, D, XI = 32, 16, 24


@pytest.fixture(scope="module")
def model() -> BankConditionedUNet:
    torch.manual_seed(0)
    return BankConditionedUNet.from_spec(DenoiserConfig.preset("tiny", sample_size=S, bank_dim=D)).eval()


def test_forward_shapes_with_shared_and_per_sample_bank(model):
    x = torch.randn(2, 3, S, S)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        shared = model(x, t, torch.randn(XI, D))
        per_sample = model(x, t, torch.randn(2, XI, D))
        scalar_t = model(x, 5, torch.randn(XI, D))
    assert shared.shape == per_sample.shape == scalar_t.shape == (2, 3, S, S)
    assert torch.isfinite(shared).all()


def test_shared_bank_equals_the_same_bank_per_sample(model):
    x, t, bank = torch.randn(2, 3, S, S), torch.tensor([10, 10]), torch.randn(XI, D)
    with torch.no_grad():
        a = model(x, t, bank)
        b = model(x, t, bank.unsqueeze(0).expand(2, -1, -1))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_the_bank_changes_the_predicted_noise(model):
    x, t = torch.randn(1, 3, S, S), torch.tensor([100])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        e1 = model(x, t, torch.randn(XI, D, generator=g))
        e2 = model(x, t, torch.randn(XI, D, generator=g))
    assert (e1 - e2).abs().mean() > 1e-4


def test_gcb_only_at_low_resolutions():
    cfg = DenoiserConfig.preset("small", sample_size=128, bank_dim=D)
    assert cfg.down_block_types() == ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert cfg.up_block_types() == tuple(
        "CrossAttnUpBlock2D" if "CrossAttn" in d else "UpBlock2D" for d in reversed(cfg.down_block_types()))
    assert cfg.mid_block_type() == "UNetMidBlock2DCrossAttn"
    m = BankConditionedUNet.from_spec(DenoiserConfig.preset("tiny", sample_size=64, bank_dim=D))
    # every attention layer of the UNet sits on a grid of at most 32 x 32 tokens
    for name, blk in list(m.unet.down_blocks.named_children()):
        res = 64 // 2 ** int(name)
        assert (hasattr(blk, "attentions") and res <= 32) or not hasattr(blk, "attentions")
    assert cfg.heads_per_level() == tuple(c // cfg.attention_head_dim for c in cfg.block_out_channels)


@pytest.mark.parametrize("preset,size", [("tiny", 32), ("tiny", 64), ("tiny", 128), ("tiny", 256),
                                         ("small", 64), ("small", 128), ("small", 256)])
def test_every_preset_reads_the_bank_at_every_size(preset, size):
    """CCAD(V)'s denoiser must cross-attend to the bank at any input size a user can choose. The
    tiny preset's grids (16, 8) are sized for 64 px; at 128 px (the app's CPU default) its levels
    run at 128 / 64 / 32, so before this check no block attended and the bank was never read
    (an MTD quick run scored identically with and without the bank). There the deepest level and
    the middle block attend instead (a grid above 32 x 32 tokens only when no level is smaller)."""
    cfg = DenoiserConfig.preset(preset, sample_size=size, bank_dim=D)
    assert cfg.reads_bank()
    grids = [r for r, t in zip(cfg.level_resolutions(), cfg.down_block_types()) if t == "CrossAttnDownBlock2D"]
    assert grids and max(grids) <= max(32, cfg.level_resolutions()[-1])  # deepest level if none is <= 32
    if preset == "tiny" and size == 128:
        assert cfg.attention_resolutions == (32,) and cfg.mid_block_type() == "UNetMidBlock2DCrossAttn"
        torch.manual_seed(0)
        m = BankConditionedUNet.from_spec(cfg).eval()
        x, t = torch.randn(1, 3, size, size), torch.tensor([100])
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            e1 = m(x, t, torch.randn(XI, D, generator=g))
            e2 = m(x, t, torch.randn(XI, D, generator=g))
        assert (e1 - e2).abs().mean() > 1e-4  # the bank changes the output
    # an explicit choice is kept as given
    assert DenoiserConfig.preset(preset, sample_size=size, bank_dim=D,
                                 attention_resolutions=(8,)).attention_resolutions == (8,)


def test_a_saved_ccad_v_model_that_never_reads_its_bank_says_so(tmp_path):
    """Models saved before the fix above (e.g. tiny at 128 px) load as they are, with a warning
    naming the folder, and their card records that the bank condition is not read."""
    from ccad.methods.ccad_v import CCADV

    cfg = DenoiserConfig.preset("tiny", sample_size=128, bank_dim=D, attention_resolutions=(16, 8))
    assert not cfg.reads_bank()
    method = CCADV.__new__(CCADV)
    method.modules = torch.nn.ModuleDict({"denoiser": BankConditionedUNet.from_spec(cfg)})
    assert not method.bank_is_read()
    with pytest.warns(UserWarning, match="never reads the bank"):
        method._warn_if_bank_unread(tmp_path)
    fixed = CCADV.__new__(CCADV)
    fixed.modules = torch.nn.ModuleDict({"denoiser": BankConditionedUNet.from_spec(
        DenoiserConfig.preset("tiny", sample_size=128, bank_dim=D))})
    assert fixed.bank_is_read()


def test_config_json_round_trip_and_errors():
    cfg = DenoiserConfig.preset("base", sample_size=256, bank_dim=272)
    again = DenoiserConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.level_resolutions()[-1] == 8
    with pytest.raises(ValueError, match="sample_size"):
        DenoiserConfig(sample_size=30, block_out_channels=(32, 64, 64))
    with pytest.raises(ValueError, match="unknown field"):
        DenoiserConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="preset"):
        DenoiserConfig.preset("huge")


def test_bad_bank_names_the_problem(model):
    x = torch.randn(1, 3, S, S)
    with pytest.raises(ValueError, match="bank_dim"):
        model(x, 1, torch.randn(XI, D + 1))
    with pytest.raises(ValueError, match="bank batch"):
        model(x, 1, torch.randn(3, XI, D))


def test_save_load_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path)  # diffusers layout: config.json + safetensors, loadable alone
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = BankConditionedUNet.from_pretrained(tmp_path).eval()
    assert loaded.spec == model.spec
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x, bank = torch.randn(1, 3, S, S), torch.randn(XI, D)
    with torch.no_grad():
        # the weights are bit for bit; two forward passes only agree to float32 rounding (kernels
        # may pick other code paths for differently aligned tensors, threads, CPUs)
        torch.testing.assert_close(loaded(x, 7, bank), model(x, 7, bank), rtol=1e-4, atol=1e-5)
    with pytest.raises(OSError, match="missing"):
        BankConditionedUNet.from_pretrained(tmp_path / "missing")


def test_channels_last_gives_the_same_output(model):
    x, bank = torch.randn(1, 3, S, S), torch.randn(XI, D)
    cl = BankConditionedUNet.from_spec(model.spec)
    cl.load_state_dict(model.state_dict())
    cl = cl.to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        a = model(x, 50, bank)
        b = cl(x.contiguous(memory_format=torch.channels_last), 50, bank)
    assert torch.allclose(a, b, atol=1e-4)


def test_image_range_helpers():
    img = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(images_to_model(img), torch.tensor([-1.0, -0.5, 1.0]))
    assert torch.allclose(model_to_images(images_to_model(img)), img)
    assert model_to_images(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


def test_one_record_of_the_architecture_and_one_preset_table():
    """DenoiserConfig's fields are the model's register_to_config arguments; every UNet family
    offers the presets a method's ``preset`` accepts."""
    import dataclasses

    from ccad.methods.base import check_preset
    from ccad.models.presets import PRESET_NAMES, UNET_PRESETS

    model = BankConditionedUNet.from_spec(DenoiserConfig.preset("tiny", sample_size=32, bank_dim=8))
    names = [f.name for f in dataclasses.fields(DenoiserConfig)]
    assert set(names) == {k for k in model.config if not k.startswith("_")}
    assert model.spec == DenoiserConfig.from_config(model.config) == DenoiserConfig.preset("tiny", 32, 8)
    for family, table in UNET_PRESETS.items():
        assert tuple(table) == PRESET_NAMES, family
    for name in PRESET_NAMES:
        check_preset(name)
