"""feat-diff's training levers (issue 23 item 2; ccad/methods/feat_diff.py docstring item 9).

Each option does what it says, on tiny generated tensors: per-channel standardisation has one
entry per channel and is applied on every path into the feature space; the training loop draws
t only from the configured range; the prediction type is the schedulers' and the loss target's.
"""
import numpy as np
import pytest
import torch
from torch import nn

from ccad.config import ConfigError
from ccad.features import FeatureBank
from ccad.methods import Context, get_method
from ccad.methods.feat_diff import FeatDiffConfig, prediction_target
from ccad.models.latent_denoiser import BankProjector

C = 6


class _Recorder(nn.Module):
    """Returns zeros and records every timestep it is called with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z_t, t, ctx):
        self.seen.append(t.clone())
        return torch.zeros_like(z_t)


def _method(**kw):
    cfg = FeatDiffConfig(**{"preset": "tiny", "noise_level": 100, "steps": 2, "edit": 1.0, "feature_scale": 1.0,
                            "feature_shift": 0.0, **kw})
    bank = FeatureBank(torch.randn(4, C, generator=torch.Generator().manual_seed(1)))
    m = get_method("feat-diff")(cfg, Context(image_size=64, device=torch.device("cpu"), bank=bank))
    m.modules["denoiser"] = _Recorder()
    m.modules["bank_proj"] = BankProjector(C, 8)
    return m


class _Cache:
    """The two things feat-diff reads of a latent cache: ``len`` and ``latents`` (N x C x h x w)."""

    def __init__(self, latents):
        self.latents = latents

    def __len__(self):
        return len(self.latents)


def _skewed_latents(n=70):
    """Channels with very different means and spreads (channel c: mean c, std 1 + 3c)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, C, 4, 4, generator=g)
    mean = torch.arange(C, dtype=torch.float32).view(1, C, 1, 1)
    std = (1.0 + 3.0 * torch.arange(C, dtype=torch.float32)).view(1, C, 1, 1)
    return (z * std + mean).numpy().astype(np.float32)


def test_per_channel_statistics_have_one_entry_per_channel_and_are_applied():
    m = _method(standardize="channel")
    lat = _skewed_latents()
    m._fit_channel_stats(_Cache(lat))  # chunks of 64: 70 rows cross a chunk boundary
    c = m.config
    assert len(c.feature_channel_shift) == len(c.feature_channel_scale) == C
    z = torch.from_numpy(lat)
    np.testing.assert_allclose(c.feature_channel_shift, z.double().mean((0, 2, 3)).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(1.0 / np.asarray(c.feature_channel_scale),
                               z.double().permute(1, 0, 2, 3).reshape(C, -1).std(1, unbiased=False).numpy(),
                               rtol=1e-5)
    zc = m.per_channel(z)
    torch.testing.assert_close(zc.mean((0, 2, 3)), torch.zeros(C), atol=1e-4, rtol=0)
    torch.testing.assert_close(zc.std((0, 2, 3), unbiased=False), torch.ones(C), atol=1e-4, rtol=0)
    torch.testing.assert_close(m.un_per_channel(zc), z, atol=1e-4, rtol=1e-5)
    # rows of C values (bank, memory cells) use the last dimension
    rows = z.permute(0, 2, 3, 1).reshape(-1, C)
    torch.testing.assert_close(m.per_channel(rows, dim=-1), zc.permute(0, 2, 3, 1).reshape(-1, C))
    # the denoiser's context: the raw bank standardised globally, then per channel
    torch.testing.assert_close(m._context_bank(torch.device("cpu")), m.per_channel(m.ctx.bank_tensor(), dim=-1))
    # the training loss sees per-channel features: a zero predictor's x0-loss is then mean(z_c^2) = 1
    m2 = _method(standardize="channel", prediction_type="sample", feature_channel_shift=c.feature_channel_shift,
                 feature_channel_scale=c.feature_channel_scale)
    loss = m2.training_loss(m2.modules, {"latent": z}, torch.Generator().manual_seed(0))
    assert abs(float(loss) - 1.0) < 1e-3
    raw_loss = _method(prediction_type="sample").training_loss(m2.modules, {"latent": z},
                                                               torch.Generator().manual_seed(0))
    assert float(raw_loss) > 10.0  # the same data without it: dominated by the high-variance channels


def test_global_standardisation_leaves_features_unchanged_and_needs_no_stats():
    m = _method()
    z = torch.from_numpy(_skewed_latents(3))
    assert m.per_channel(z) is z and m.un_per_channel(z) is z
    assert m.config.feature_channel_shift is None
    with pytest.raises(RuntimeError, match="per-channel statistics"):
        _method(standardize="channel").per_channel(z)


@pytest.mark.parametrize("tmax", [None, 40])
def test_training_draws_timesteps_only_from_the_configured_range(tmax):
    m = _method(train_max_timestep=tmax, noise_level=40, steps=1)
    z = torch.randn(16, C, 4, 4, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        m.training_loss(m.modules, {"latent": z}, g)
    seen = torch.cat(m.modules["denoiser"].seen)
    assert len(seen) == 640 and int(seen.min()) >= 0
    if tmax is None:
        assert int(seen.max()) > 500  # the whole table, U{0..T-1}
    else:
        assert int(seen.max()) == tmax  # inclusive upper end, reached in 640 draws of 41 values
        assert len(set(seen.tolist())) == tmax + 1


def test_the_timestep_range_must_cover_every_noise_level_used():
    with pytest.raises(ConfigError, match="train_max_timestep"):
        FeatDiffConfig(train_max_timestep=200).validate()  # the default search grid reaches 400
    FeatDiffConfig(train_max_timestep=400).validate()
    FeatDiffConfig(train_max_timestep=100, noise_level=100).validate()
    with pytest.raises(ConfigError, match="train_max_timestep"):
        FeatDiffConfig(train_max_timestep=1000).validate()
    with pytest.raises(ConfigError, match="prediction_type"):
        FeatDiffConfig(prediction_type="x0").validate()
    with pytest.raises(ConfigError, match="standardize"):
        FeatDiffConfig(standardize="pixel").validate()
    with pytest.raises(ConfigError, match="feature_channel"):
        FeatDiffConfig(feature_channel_shift=(0.0, 1.0), feature_channel_scale=(1.0,)).validate()


@pytest.mark.parametrize("ptype", ["epsilon", "sample", "v_prediction"])
def test_prediction_type_is_the_schedulers_and_the_loss_targets(ptype):
    m = _method(prediction_type=ptype)
    assert m.scheduler.config.prediction_type == ptype  # the shared sampler's DDIM reads it (next test)
    z = torch.randn(5, C, 4, 4, generator=torch.Generator().manual_seed(4))
    loss = m.training_loss(m.modules, {"latent": z}, torch.Generator().manual_seed(5))
    # the same draws by hand: a zero predictor's loss is the mean square of the target
    from ccad.diffusion.objectives import training_draws

    t, eps = training_draws(z, m.scheduler, torch.Generator().manual_seed(5))
    abar = m.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"epsilon": eps, "sample": z, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * z}[ptype]
    torch.testing.assert_close(loss, target.pow(2).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prediction_target(m.scheduler, z, eps, t, ptype), target, rtol=1e-5, atol=1e-6)


class _Perfect(nn.Module):
    """Knows the clean features and the fixed noise field: outputs exactly what ``prediction_type``
    asks for at each t, so DDIM must return the clean features."""

    def __init__(self, method, clean):
        super().__init__()
        self.method, self.clean = method, clean

    def forward(self, z_t, t, ctx):
        eps = self.method._noise_field(z_t.shape[1:], z_t.device).expand_as(z_t)
        return prediction_target(self.method.scheduler, self.clean, eps, t, self.method.config.prediction_type)


@pytest.mark.parametrize("ptype", ["sample", "v_prediction"])
@pytest.mark.parametrize("noise_level,steps", [(50, 1), (400, 4)])
def test_ddim_reads_the_prediction_type(ptype, noise_level, steps):
    m = _method(prediction_type=ptype)
    z_e = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(6))
    m.modules["denoiser"] = _Perfect(m, z_e)
    torch.testing.assert_close(m.denoise(z_e, noise_level, steps), z_e, rtol=1e-4, atol=1e-4)
    # read as epsilon, the same outputs are a wrong reconstruction
    m_eps = _method()
    m_eps.modules["denoiser"] = _Perfect(m, z_e)
    assert float((m_eps.denoise(z_e, noise_level, steps) - z_e).abs().max()) > 0.02  # well above the 1e-4 above


def test_levers_train_save_and_load(tmp_path):
    from ccad.data.detect import load_dataset
    from ccad.data.synthetic import write_dataset
    from ccad.pipeline import AnomalyDetector, train_detector
    from ccad.training import TrainConfig

    data = write_dataset(tmp_path / "data", kinds=("granular",), n_train=6, n_test_good=1, n_test_defect=1,
                         size=64, seed=3)
    cfg = FeatDiffConfig(preset="tiny", memory_size=32, standardize="channel", prediction_type="v_prediction",
                         train_max_timestep=100, search_noise=(50, 100), search_steps=(1,), search_edit=(0.5,),
                         search_images=2)
    det = train_detector(load_dataset(str(data), split="train"), tmp_path / "run", variant="feat-diff", method=cfg,
                         image_size=64, bank_size=8, calibration_fraction=0.4,
                         train=TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=1, show_progress=False))
    c = det.method.config
    n = int(c.feature_channels)
    assert len(c.feature_channel_shift) == len(c.feature_channel_scale) == n
    # the bank is stored in raw backbone units: back through both standardisations it is the memory's space
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    raw = det.method.encoder().encode_raw(x)
    z = det.method.features(x)
    glob = (raw - c.feature_shift) * c.feature_scale
    torch.testing.assert_close(z, det.method.per_channel(glob))
    det.save_pretrained(tmp_path / "saved")
    back = AnomalyDetector.from_pretrained(tmp_path / "saved")
    bc = back.method.config
    assert (bc.standardize, bc.prediction_type, bc.train_max_timestep) == ("channel", "v_prediction", 100)
    assert back.method.scheduler.config.prediction_type == "v_prediction"
    assert tuple(bc.feature_channel_scale) == tuple(c.feature_channel_scale)
    torch.testing.assert_close(back.maps_for_batch(x)[0], det.maps_for_batch(x)[0], rtol=1e-5, atol=1e-6)
