"""D3AD (papers/d3ad.md sec. 4, App. A) and the shared domain adaptation hook, on small generated data:
the equal-width bins and start steps (Algorithm 2), grouping a batch by start step and the
noiseless start (Algorithm 1), the lambda-weighted map (eq. 9), a tiny train / save / load /
predict with a random-init TAEF2 autoencoder, and domain adaptation (eq. 10) on a tiny CCAD(V)."""
from __future__ import annotations

import json
import math
import shutil
from unittest import mock

import pytest
import torch

from ccad.data.detect import load_dataset
from ccad.data.synthetic import write_dataset
from ccad.diffusion import make_scheduler
from ccad.diffusion.d3ad import (
    assign_bins,
    d3ad_anomaly_map,
    d3ad_reconstruct,
    fit_bins,
    knn_mean_distance,
    start_steps,
)
from ccad.methods import get_method
from ccad.methods.adaptation import ADAPTED_FILE
from ccad.methods.d3ad import CONDITIONING_FILE, NORM_FILE
from ccad.models.deco_net import build_deco_unet
from ccad.pipeline import AnomalyDetector, train_detector
from ccad.training import TrainConfig

torch.set_num_threads(1)
SIZE = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("d3ad"), kinds=("fibrous", "granular"), n_train=5, n_test_good=1,
                         n_test_defect=1, size=SIZE, seed=3, defects=("spot",))


def quick_train(steps: int = 2) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=1e-3, show_progress=False, checkpoint_every=0)


# ---- Algorithm 2: KNN distances, bins, start steps ------------------------------------------
def test_knn_mean_distance_is_l1_and_leave_one_out():
    mem = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    # L1 distances: 0-1: 1, 0-2: 3, 1-2: 2
    assert torch.allclose(knn_mean_distance(mem, mem, k=1, leave_one_out=True), torch.tensor([1.0, 1.0, 2.0]))
    assert torch.allclose(knn_mean_distance(mem, mem, k=2, leave_one_out=True), torch.tensor([2.0, 1.5, 2.5]))
    assert torch.allclose(knn_mean_distance(mem, mem, k=1), torch.zeros(3))  # itself is its nearest
    q = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(knn_mean_distance(q, mem, k=20), torch.tensor([(1 + 2 + 2) / 3]))  # K capped at N


def test_bins_are_equal_width_over_the_training_distances():
    d = torch.rand(50, generator=torch.Generator().manual_seed(0)) * 7 + 3
    edges = fit_bins(d, 10)
    assert edges.numel() == 11 and edges[0] == d.min().double() and edges[-1] == d.max().double()
    widths = edges.diff()
    assert torch.allclose(widths, widths[0].expand_as(widths))  # equidistant, not equal-count
    bins = assign_bins(torch.tensor([-1.0, float(d.min()), float(edges[1]), float(d.max()), 99.0]), edges)
    assert bins.tolist() == [1, 1, 2, 10, 10]  # outside the training range: the outer bins


def test_start_steps_respect_the_minimum_bin_and_grow_with_the_distance():
    edges = fit_bins(torch.tensor([0.0, 10.0]), 10)
    d = torch.linspace(-5, 15, 81)
    t = start_steps(d, edges, T_max=80, min_bin=2, round_to=1)
    assert (t.diff() >= 0).all() and t.min() == 16 and t.max() == 80  # floor(2/10 * 80), floor(10/10 * 80)
    assert start_steps(torch.tensor([3.5]), edges, 80, 2, round_to=1).item() == 32  # bin 4
    rounded = start_steps(d, edges, T_max=80, min_bin=2, round_to=10)
    assert (rounded.diff() >= 0).all() and set(rounded.tolist()) <= {20, 30, 40, 50, 60, 70, 80}
    assert start_steps(d, edges, T_max=80, min_bin=5, round_to=1).min() == 40


# ---- Algorithm 1: grouping by start step, noiseless start --------------------------------------
@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_deco_unet("tiny", 4, 8).eval()


def test_a_batch_is_grouped_by_start_step_and_matches_each_image_alone(net):
    sched = make_scheduler(1000, "scaled_linear", 0.0015, 0.0195)
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []

    def eps_fn(z, t):
        calls.append((z.shape[0], int(t[0])))
        return net(z, t).sample

    starts = torch.tensor([20, 50, 20])
    out = d3ad_reconstruct(eps_fn, z0, sched, starts, skip=10)
    # one DDIM run per distinct start: T_hat // skip evaluations on the group's images only
    assert sorted(calls) == sorted([(2, 20), (2, 10), (1, 50), (1, 40), (1, 30), (1, 20), (1, 10)])
    for i in range(3):
        alone = d3ad_reconstruct(eps_fn, z0[i:i + 1], sched, starts[i:i + 1], skip=10)
        assert torch.allclose(out[i:i + 1], alone, atol=1e-5)
    assert not torch.allclose(out[0], d3ad_reconstruct(eps_fn, z0[:1], sched, torch.tensor([50]))[0], atol=1e-4)


def test_the_start_is_noiseless_scaling_and_draws_no_noise(net):
    sched = make_scheduler(1000, "scaled_linear", 0.0015, 0.0195)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    first = []

    def eps_fn(z, t):
        if not first:
            first.append(z.clone())
        return net(z, t).sample

    with mock.patch("torch.randn", side_effect=AssertionError("noise drawn")), \
            mock.patch("torch.randn_like", side_effect=AssertionError("noise drawn")):
        a = d3ad_reconstruct(eps_fn, z0, sched, torch.tensor([40, 40]), guidance=7.0)
    assert torch.allclose(first[0], math.sqrt(float(sched.alphas_cumprod[40])) * z0)  # z_T = sqrt(abar) z0
    torch.manual_seed(123)
    b = d3ad_reconstruct(eps_fn, z0, sched, torch.tensor([40, 40]), guidance=7.0)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # noiseless: the global seed changes nothing


def test_the_map_is_lambda_weighted():
    g = torch.Generator().manual_seed(0)
    l_map, f_map = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    assert torch.allclose(d3ad_anomaly_map(l_map, f_map, 0.85), 0.85 * l_map + 0.15 * f_map)
    assert torch.allclose(d3ad_anomaly_map(l_map, f_map, 1.0), l_map)
    assert torch.allclose(d3ad_anomaly_map(l_map, f_map, 0.85, l_norm=2.0, f_norm=4.0),
                          0.85 * l_map / 2.0 + 0.15 * f_map / 4.0)


# ---- end to end -----------------------------------------------------------------------------
def test_d3ad_trains_saves_loads_and_predicts(root, tmp_path):
    cfg = get_method("d3ad").default_config("tiny")
    cfg.autoencoder = "taef2:random"
    cfg.K, cfg.norm_images = 3, 4
    det = train_detector(root, tmp_path / "run", variant="d3ad", method=cfg, train=quick_train(),
                         image_size=SIZE, calibration_fraction=0.2, device="cpu")
    m = det.method
    assert m.knn_features.shape[0] == det.info["n_train_images"] == m.train_distances.shape[0]
    l_norm, f_norm = m.normalisers()
    assert m.bin_edges.numel() == 11 and l_norm > 0 and f_norm > 0
    model = tmp_path / "run" / "model"
    # fitted state, not the user's config: config.json holds no fitted normaliser
    saved = json.loads((model / "config.json").read_text())["method"]
    assert (saved["l_norm"], saved["f_norm"]) == (None, None) and (m.config.l_norm, m.config.f_norm) == (None, None)
    fitted = json.loads((model / NORM_FILE).read_text())
    assert (fitted["l_norm"], fitted["f_norm"]) == (l_norm, f_norm)
    assert (model / CONDITIONING_FILE).is_file() and (model / "unet" / "config.json").is_file()
    assert (model / ADAPTED_FILE).is_file()  # D3AD adapts its extractor by default (1 epoch, eq. 10)
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    out = m.maps(x)
    l_map, f_map, _, starts = m._parts_of_map(x)
    assert torch.allclose(out.maps, 0.85 * l_map / l_norm + 0.15 * f_map / f_norm, atol=1e-5)
    assert all(int(s) in {20, 30, 40, 50, 60, 70, 80} for s in starts)
    test = load_dataset(root, split="test")
    img = next(s.image_path for s in test if s.label == 1)
    r = det.predict(img)
    back = AnomalyDetector.from_pretrained(model, device="cpu")
    assert torch.equal(back.method.bin_edges, m.bin_edges) and torch.equal(back.method.knn_features, m.knn_features)
    assert back.predict(img).score == pytest.approx(r.score, rel=1e-4)
    card = back.card()
    rec = card["reconstruction"]
    assert card["variant"] == "d3ad" and len(rec["bin_edges"]) == 11 and rec["start_step_per_bin"][1] == 20
    assert card["domain_adaptation"]["epochs"] == 1
    # the start steps are the call's own output (MethodOutput.start_steps), not method state
    assert "last_start_steps" not in rec and torch.equal(out.start_steps, starts)
    assert back.method.normalisers() == (l_norm, f_norm)

    # a model saved by an older ccad: the normalisers written into config.json, no fitted-state file
    old = tmp_path / "old"
    shutil.copytree(model, old)
    cfg_old = json.loads((old / "config.json").read_text())
    cfg_old["method"].update(l_norm=l_norm, f_norm=f_norm)
    (old / "config.json").write_text(json.dumps(cfg_old))
    (old / NORM_FILE).unlink()
    legacy = AnomalyDetector.from_pretrained(old, device="cpu")
    assert legacy.method.normalisers() == (l_norm, f_norm)
    torch.testing.assert_close(legacy.method.maps(x).maps, back.method.maps(x).maps, rtol=1e-5, atol=1e-6)
    assert legacy.card()["reconstruction"]["map_normalisation"]["source"].endswith("by an older ccad")
    # ... and re-saving it keeps its values (in config.json, as loaded: nothing is refitted)
    legacy.save_pretrained(tmp_path / "resaved")
    again = AnomalyDetector.from_pretrained(tmp_path / "resaved", device="cpu")
    assert again.method.normalisers() == (l_norm, f_norm)


def test_domain_adaptation_of_ccad_v_is_saved_reloaded_and_changes_the_maps(root, tmp_path):
    cfg = get_method("ccad-v").default_config("tiny")
    cfg.diffusion.start_step, cfg.diffusion.steps = 100, 2
    cfg.domain_adapt_epochs = 1
    det = train_detector(root / "fibrous", tmp_path / "run", variant="ccad-v", method=cfg, train=quick_train(),
                         image_size=32, bank_size=8, calibration_fraction=0.0, device="cpu")
    model = tmp_path / "run" / "model"
    assert (model / ADAPTED_FILE).is_file() and det.method.adapted["epochs"] == 1
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapted = det.method.maps(x).maps
    back = AnomalyDetector.from_pretrained(model, device="cpu")
    assert back.config.method.domain_adapt_epochs == 1 and back.card()["domain_adaptation"]["epochs"] == 1
    assert torch.allclose(back.method.maps(x).maps, adapted, atol=1e-5)
    back.method.ctx._score_backbone = None  # back to the shared, unadapted ImageNet extractor
    assert not torch.allclose(back.method.maps(x).maps, adapted, atol=1e-4)
    # an old CCAD(V) config without the field loads with adaptation off
    old = get_method("ccad-v").config_from_dict({"preset": "tiny"})
    assert old.domain_adapt_epochs == 0


def test_ccad_c_with_dynamic_start_steps_groups_by_start_and_saves_its_bins(root, tmp_path):
    cfg = get_method("ccad-c").default_config("tiny")
    cfg.autoencoder = "taef2:random"
    cfg.diffusion.start_step, cfg.diffusion.steps, cfg.diffusion.start_policy = 100, 2, "dynamic"
    det = train_detector(root, tmp_path / "run", variant="ccad-c", method=cfg, train=quick_train(),
                         image_size=SIZE, bank_size=8, calibration_fraction=0.0, device="cpu")
    m = det.method
    assert m.bin_edges.numel() == 11 and m.dic_params()["T_max"] == 100
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    out = m.maps(x)
    maps = out.maps
    assert {int(s) for s in out.start_steps} <= {20, 30, 40, 50, 60, 70, 80, 90, 100}
    model = tmp_path / "run" / "model"
    assert (model / CONDITIONING_FILE).is_file()
    back = AnomalyDetector.from_pretrained(model, device="cpu")
    assert back.config.method.diffusion.start_policy == "dynamic"
    assert torch.allclose(back.method.maps(x).maps, maps, atol=1e-5)
    assert back.card()["reconstruction"]["dynamic_start"]["start_step_per_bin"][10] == 100
    # fixed (the default) keeps old configs loading: no field -> "fixed", no conditioning file needed
    assert get_method("ccad-c").config_from_dict({"preset": "tiny"}).diffusion.start_policy == "fixed"
