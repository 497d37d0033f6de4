"""Schedules, the eq. 15 objective and DDAD-conditioned reconstruction (eq. 12-14 with eq. 18)."""
from __future__ import annotations

import math

import pytest
import torch

from ccad.diffusion import (
    ddad_reconstruct,
    ddim_from,
    ddim_step,
    epsilon_loss,
    make_scheduler,
    reconstruction_timesteps,
)
from ccad.config import ConfigError, DiffusionConfig
from ccad.models import BankConditionedUNet, DenoiserConfig

S, D, XI = 32, 8, 16


def textures(n: int, size: int = S, seed: int = 0) -> torch.Tensor:
    """Striped / checkered textures in [-1, 1] (the model range), N x 3 x S x S."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = []
    for i in range(n):
        f = 2 * math.pi * (2 + (i % 3)) / size
        phase = float(torch.rand(1, generator=g)) * 6.28
        base = torch.sin(f * xx + phase) if i % 2 else torch.sin(f * xx) * torch.sin(f * yy + phase)
        img = torch.stack([base, 0.8 * base, 0.6 * base]) + 0.05 * torch.randn(3, size, size, generator=g)
        out.append(img.clamp(-1, 1))
    return torch.stack(out)


class ConstantEps(torch.nn.Module):
    """A stand-in denoiser whose prediction is a fixed tensor (makes the sampler hand-checkable)."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps
        self.calls: list[int] = []

    def forward(self, x_t, t, bank):
        self.calls.append(int(t[0]))
        return self.eps.expand_as(x_t)


def test_schedulers_share_diffusers_tables():
    ddpm = make_scheduler()
    ddim = ddim_from(ddpm)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(ddpm.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-5)
    assert torch.equal(ddim.alphas_cumprod, ddpm.alphas_cumprod)
    assert ddpm.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="beta_schedule"):
        make_scheduler(beta_schedule="cubic")


def test_timesteps_and_validation():
    assert reconstruction_timesteps(250, 10, 1000) == list(range(250, 0, -25))
    assert reconstruction_timesteps(5, 5, 1000) == [5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="start_step"):
        reconstruction_timesteps(1000, 10, 1000)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        reconstruction_timesteps(250, 0, 1000)
    with pytest.raises(ValueError, match=r"steps \(300\) must be <= start_step"):
        reconstruction_timesteps(250, 300, 1000)


def test_ddim_step_matches_hand_computation():
    at, ap, eta = 0.6, 0.8, 0.7
    x, e, z = torch.tensor([0.3]), torch.tensor([-1.2]), torch.tensor([0.5])
    sigma2 = eta ** 2 * (1 - ap) / (1 - at) * (1 - at / ap)
    x0 = (0.3 - math.sqrt(0.4) * -1.2) / math.sqrt(0.6)
    expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma2) * -1.2 + math.sqrt(sigma2) * 0.5
    assert ddim_step(x, e, at, ap, eta, z).item() == pytest.approx(expected, rel=1e-6)
    # the misprinted eq. 12/19 direction term sqrt(1 - abar_prev) * sigma^2 would give something else
    wrong = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * sigma2 * -1.2 + math.sqrt(sigma2) * 0.5
    assert abs(expected - wrong) > 1e-3
    # deterministic DDIM (eta = 0) needs no noise; the last step to abar = 1 returns x0_pred
    assert ddim_step(x, e, at, 1.0, 1.0, None).item() == pytest.approx(x0, rel=1e-6)


def test_ddad_reconstruct_matches_eq_12_to_14_by_hand():
    ddpm = make_scheduler()
    x0 = textures(1, 8)
    eps = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model = ConstantEps(eps)
    w, eta = 2.0, 1.0
    out = ddad_reconstruct(model, x0, torch.zeros(4, D), ddpm, start_step=20, steps=2, guidance=w, eta=eta,
                           generator=torch.Generator().manual_seed(9))
    assert model.calls == [20, 10]
    g = torch.Generator().manual_seed(9)
    a = ddpm.alphas_cumprod.double()
    a20, a10 = float(a[20]), float(a[10])
    x = math.sqrt(a20) * x0 + math.sqrt(1 - a20) * torch.randn(x0.shape, generator=g)
    # step t=20 -> 10
    xbar = math.sqrt(a20) * x0 + math.sqrt(1 - a20) * eps
    e_hat = eps - w * math.sqrt(1 - a20) * (xbar - x)
    sigma = eta * math.sqrt((1 - a10) / (1 - a20) * (1 - a20 / a10))
    x = (math.sqrt(a10) * (x - math.sqrt(1 - a20) * e_hat) / math.sqrt(a20)
         + math.sqrt(1 - a10 - sigma ** 2) * e_hat + sigma * torch.randn(x0.shape, generator=g))
    # step t=10 -> clean (abar = 1): x0_hat
    xbar = math.sqrt(a10) * x0 + math.sqrt(1 - a10) * eps
    e_hat = eps - w * math.sqrt(1 - a10) * (xbar - x)
    expected = (x - math.sqrt(1 - a10) * e_hat) / math.sqrt(a10)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.fixture(scope="module")
def tiny() -> BankConditionedUNet:
    torch.manual_seed(0)
    return BankConditionedUNet.from_spec(DenoiserConfig.preset("tiny", sample_size=S, bank_dim=D)).eval()


def test_ddad_reconstruct_is_seeded_and_keeps_shape(tiny):
    ddpm, x0, bank = make_scheduler(), textures(2), torch.randn(XI, D)
    kw = dict(start_step=100, steps=3)
    a = ddad_reconstruct(tiny, x0, bank, ddpm, generator=torch.Generator().manual_seed(5), **kw)
    b = ddad_reconstruct(tiny, x0, bank, ddpm, generator=torch.Generator().manual_seed(5), **kw)
    c = ddad_reconstruct(tiny, x0, bank, ddpm, generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == x0.shape
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # the same seed: the same result to float32 rounding
    assert (a - c).abs().max() > 1e-3  # another seed: another result
    with pytest.raises(ConfigError, match="diffusion.strategy"):  # the one reconstruction of CCAD(V)
        DiffusionConfig(strategy="nope").validate()
    with pytest.raises(ValueError, match="start_step"):
        ddad_reconstruct(tiny, x0, bank, ddpm, start_step=1000)


def test_guidance_pulls_the_reconstruction_towards_the_target(tiny):
    ddpm, x0, bank = make_scheduler(), textures(2, seed=1), torch.randn(XI, D)

    def dist(w: float) -> float:
        r = ddad_reconstruct(tiny, x0, bank, ddpm, start_step=250, steps=5, guidance=w,
                             generator=torch.Generator().manual_seed(0))
        return float((r - x0).pow(2).mean())

    assert dist(2.0) < 0.5 * dist(0.0)


def test_epsilon_loss_is_seeded_and_decreases_with_training():
    torch.manual_seed(0)
    model = BankConditionedUNet.from_spec(DenoiserConfig.preset("tiny", sample_size=S, bank_dim=D))
    ddpm, data, bank = make_scheduler(), textures(4), torch.randn(XI, D)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(epsilon_loss(model, data, bank, ddpm, generator=torch.Generator().manual_seed(123)))

    assert eval_loss() == eval_loss()
    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = epsilon_loss(model, data, bank, ddpm, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("spacing,offset,eta", [("leading", 0, 0.0), ("leading", 1, 0.0), ("trailing", 0, 0.0),
                                                ("leading", 0, 1.0)])
def test_the_one_sampler_without_correction_is_a_plain_diffusers_ddim_loop(spacing, offset, eta):
    """``ddim_sample`` over a DDIMScheduler's own ``timesteps`` is the loop users write by hand."""
    from diffusers import DDIMScheduler

    from ccad.diffusion import ddim_sample

    ddim = DDIMScheduler.from_config(make_scheduler().config, clip_sample=False, set_alpha_to_one=True,
                                     timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(10)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))

    def eps_fn(x, t):  # a non-linear, t-dependent stand-in network
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    for t in ddim.timesteps:
        x = ddim.step(eps_fn(x, t.repeat(2)), t, x, eta=eta, generator=g).prev_sample
    ours = ddim_sample(eps_fn, x_T, make_scheduler(), ddim.timesteps.tolist(), eta=eta,
                       generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    assert (ours - x_T).abs().max() > 1e-2  # it did move
