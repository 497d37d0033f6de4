"""Good-only fusion of a method's map with the bank's nearest-neighbour map, and the
neighbourhood feature match, on small generated data: the fused map is the weighted sum of both
maps normalised on the held-out good images only; its bank component is exactly a PatchCore
map of the same training images; the fusion memory and statistics are saved and reloaded; a
method trained at a small size is fused with a memory at a larger one; the feature-cosine map
can pair each location with a neighbourhood (GLAD eq. 11 in its local form)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ccad.config import ConfigError, ScoringConfig
from ccad.data.detect import load_dataset
from ccad.data.synthetic import write_dataset
from ccad.evaluate import evaluate, evaluate_views
from ccad.methods import get_method
from ccad.pipeline import AnomalyDetector, fit_detector, split_good, split_held_out, train_detector
from ccad.scoring.anomaly_map import feature_cosine_map, layer_distance
from ccad.scoring.fusion import ComponentStats
from ccad.training import TrainConfig

torch.set_num_threads(1)
SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("fusion"), kinds=("granular",), n_train=10, n_test_good=2,
                         n_test_defect=3, size=64, seed=4, defects=("spot", "scratch"))


def tiny_ccad_v():
    cfg = get_method("ccad-v").default_config("tiny")
    cfg.diffusion.start_step, cfg.diffusion.steps = 100, 2
    return cfg


def fused_scoring(weight: float = 0.5, size: int = SIZE) -> ScoringConfig:
    return ScoringConfig(fusion="bank", fusion_weight=weight, fusion_image_size=size, fusion_ratio=0.1,
                         fusion_weight_fit="fixed")


@pytest.fixture(scope="module")
def fused(root, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    det = train_detector(root, run, variant="ccad-v", method=tiny_ccad_v(), image_size=SIZE, bank_size=8,
                         train=TrainConfig(steps=2, batch_size=4, show_progress=False, checkpoint_every=0),
                         scoring=fused_scoring(), calibration_fraction=0.3, device="cpu")
    return det, run / "model"


def test_fused_map_is_the_weighted_sum_of_good_normalised_maps(fused):
    det, _ = fused
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    m, bank, rec = det.map_parts(x)
    assert m.shape == bank.shape == (3, 1, SIZE, SIZE) and rec.shape == (3, 3, SIZE, SIZE)
    st = det.fusion.stats
    expect = 0.5 * (m - st["method"].mean) / st["method"].std + 0.5 * (bank - st["bank"].mean) / st["bank"].std
    got, _ = det.maps_for_batch(x)
    assert torch.allclose(got, expect, atol=1e-5)
    assert torch.allclose(det.maps_for_batch(x, "method")[0], m) and torch.allclose(det.maps_for_batch(x, "bank")[0],
                                                                                    bank)
    with pytest.raises(ValueError, match="view"):
        det.maps_for_batch(x, "both")


def test_normalisation_comes_from_the_held_out_good_images_only(root, fused):
    det, _ = fused
    good = [s for s in load_dataset(root, split="train") if s.label == 0]
    train, held = split_good(good, 0.3, 0)
    sel, thr = split_held_out(held, 0.5, 0)  # the selection part fits the normalisation, the rest the threshold
    assert det.fusion.stats["method"].n_images == len(sel) and det.info["n_calibration_images"] == len(thr)
    assert [s.image_path for s in sel] == det.info["calibration_split"]["selection_images"]
    from ccad.data.dataset import iter_batches

    ms, bs = [], []
    for b in iter_batches(sel, det.input_size, 8):
        m, bank, _ = det.map_parts(b["image"])
        ms.append(m)
        bs.append(bank)
    m_all, b_all = torch.cat(ms), torch.cat(bs)
    assert det.fusion.stats["method"].mean == pytest.approx(float(m_all.double().mean()), rel=1e-5)
    assert det.fusion.stats["bank"].std == pytest.approx(float(b_all.double().std(unbiased=False)), rel=1e-5)
    # on those good images the fused map has mean 0 (both components are centred there)
    assert float(det.combine(m_all, b_all).double().mean()) == pytest.approx(0.0, abs=1e-5)
    # the bank part scores the held-out images above the memory's own training images
    tr = next(iter(iter_batches(train[:4], det.input_size, 4)))["image"]
    assert float(det.map_parts(tr)[1].mean()) < float(b_all.mean())


def test_bank_view_is_exactly_patchcore_on_the_same_training_images(root, fused):
    det, _ = fused
    pc = fit_detector(root, variant="patchcore", image_size=SIZE, method=get_method("patchcore").Config(ratio=0.1),
                      calibration_fraction=0.3, device="cpu")
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(det.maps_for_batch(x, "bank")[0], pc.maps_for_batch(x)[0], atol=1e-5)


def test_fused_detector_saves_loads_and_reports_all_views(root, fused):
    det, model = fused
    assert (model / "fusion" / "stats.json").is_file() and (model / "fusion" / "patchcore.safetensors").is_file()
    saved = json.loads((model / "config.json").read_text())["scoring"]
    assert saved["fusion"] == "bank" and saved["fusion_weight"] == 0.5
    back = AnomalyDetector.from_pretrained(model, device="cpu")
    test = load_dataset(root, split="test")
    img = test[0].image_path
    assert back.predict(img).score == pytest.approx(det.predict(img).score, rel=1e-5)
    assert back.card()["fusion"]["stats"]["bank"]["n_images"] == det.fusion.stats["bank"].n_images
    reports = evaluate_views(back, test, batch_size=4)
    assert set(reports) == {"fused", "method", "bank", "ablation"}  # every view: CCAD(V) has an ablation
    plain = evaluate(back, test, batch_size=4)
    assert plain.per_category["mean"]["image_auroc"] == pytest.approx(
        reports["fused"].per_category["mean"]["image_auroc"])
    assert [r["score"] for r in plain.records] == pytest.approx([r["score"] for r in reports["fused"].records])
    # the method view is the unfused method: its scores are the method map's own image scores
    m_scores = [r["score"] for r in reports["method"].records]
    assert not np.allclose(m_scores, [r["score"] for r in reports["fused"].records])
    # a missing fusion folder is a clear checkpoint error
    import shutil

    broken = model.parent / "broken"
    shutil.copytree(model, broken)
    shutil.rmtree(broken / "fusion")
    with pytest.raises(Exception, match="fusion"):
        AnomalyDetector.from_pretrained(broken, device="cpu")


def test_small_model_fused_with_a_larger_memory_reads_images_at_the_larger_size(root, tmp_path):
    det = train_detector(root, tmp_path / "run", variant="ccad-v", method=tiny_ccad_v(), image_size=SIZE,
                         bank_size=8, train=TrainConfig(steps=1, batch_size=4, show_progress=False,
                                                        checkpoint_every=0),
                         scoring=fused_scoring(size=48), calibration_fraction=0.3, device="cpu")
    assert det.image_size == SIZE and det.input_size == 48
    img = load_dataset(root, split="test")[0].image_path
    r = det.predict(img)
    assert r.anomaly_map.shape == (64, 64) and r.reconstruction.shape == (64, 64, 3)
    rep = evaluate(det, load_dataset(root, split="test"), batch_size=4)
    assert 0.0 <= rep.per_category["mean"]["pixel_auroc"] <= 1.0


def test_fusion_needs_held_out_good_images_and_valid_settings(root, tmp_path):
    with pytest.raises(ConfigError, match="calibration_fraction"):
        fit_detector(root, variant="patchcore", image_size=SIZE, scoring=fused_scoring(), calibration_fraction=0.0,
                     device="cpu")
    with pytest.raises(ConfigError, match="fusion_weight"):
        ScoringConfig(fusion="bank", fusion_weight=1.5).validate()
    with pytest.raises(ConfigError, match="scoring.fusion"):
        ScoringConfig(fusion="yes").validate()


def test_component_stats_standardise():
    maps = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 7
    st = ComponentStats.fit(maps)
    z = st.normalise(maps)
    assert float(z.mean()) == pytest.approx(0, abs=1e-5) and float(z.std(unbiased=False)) == pytest.approx(1, 1e-4)


# ---- feature matching over a neighbourhood (GLAD eq. 11, local form) --------------------------
def test_neighbourhood_match_forgives_a_one_pixel_shift_and_all_forgives_more():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 16, 10, 10, generator=g)
    shifted = torch.roll(a, shifts=1, dims=-1)
    same = layer_distance(a, shifted, "same")
    near = layer_distance(a, shifted, "neighbourhood", radius=1)
    anywhere = layer_distance(a, shifted, "all")
    assert float(same.mean()) > 0.5  # random features: a shifted copy looks different location-wise
    assert float(near[..., 1:-1].abs().max()) < 1e-5  # the matching feature is one column away
    assert bool((anywhere <= near + 1e-5).all()) and bool((near <= same + 1e-5).all())
    far = torch.roll(a, shifts=3, dims=-1)
    assert float(layer_distance(a, far, "neighbourhood", 1)[..., 3:-3].mean()) > 0.3
    assert float(layer_distance(a, far, "neighbourhood", 3)[..., 3:-3].abs().max()) < 1e-5
    with pytest.raises(ValueError, match="feature match"):
        layer_distance(a, a, "nearest")


def test_feature_match_is_a_scoring_option_of_the_reconstruction_methods(root, tmp_path):
    sc = ScoringConfig(feature_match="neighbourhood", match_radius=2)
    det = train_detector(root, tmp_path / "run", variant="ccad-v", method=tiny_ccad_v(), image_size=SIZE,
                         bank_size=8, scoring=sc, train=TrainConfig(steps=1, batch_size=4, show_progress=False,
                                                                    checkpoint_every=0),
                         calibration_fraction=0.3, device="cpu")
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    x_hat = det.method._reconstruct(det.method.modules["denoiser"], x)
    ext = det.method.ctx.scoring_backbone()
    near = feature_cosine_map(x, x_hat, ext, match="neighbourhood", radius=2)
    same = feature_cosine_map(x, x_hat, ext)
    assert bool((near <= same + 1e-5).all()) and not torch.allclose(near, same)
    back = AnomalyDetector.from_pretrained(tmp_path / "run" / "model", device="cpu")
    assert back.config.scoring.feature_match == "neighbourhood" and back.config.scoring.match_radius == 2
    with pytest.raises(ConfigError, match="feature_match"):
        ScoringConfig(feature_match="nearby").validate()


def test_cli_trains_a_fused_detector_and_names_a_bad_scoring_field(root, tmp_path, capsys):
    from ccad.cli import main

    args = ["train", str(root), "--variant", "ccad-v", "--preset", "tiny", "--image-size", str(SIZE), "--steps", "1",
            "--size", "8", "--out", str(tmp_path / "run"), "--quiet", "--option", "diffusion.start_step=100",
            "--option", "diffusion.steps=2", "--scoring", "fusion=bank", "--scoring", f"fusion_image_size={SIZE}"]
    assert main(args) == 0
    back = AnomalyDetector.from_pretrained(tmp_path / "run" / "model", device="cpu")
    assert back.config.scoring.fusion == "bank" and back.fusion is not None and back.fusion.fitted
    assert main(args[:-4] + ["--scoring", "fusion=maybe", "--overwrite"]) != 0
    assert "scoring.fusion" in capsys.readouterr().err
    assert AnomalyDetector.from_pretrained(tmp_path / "run" / "model", device="cpu").config.scoring.fusion == "bank"


def test_fusion_weight_can_be_fitted_on_synthetic_anomalies_of_good_images(root, tmp_path):
    sc = fused_scoring()
    sc.fusion_weight_fit = "synthetic"
    det = train_detector(root, tmp_path / "run", variant="ccad-v", method=tiny_ccad_v(), image_size=SIZE,
                         bank_size=8, train=TrainConfig(steps=1, batch_size=4, show_progress=False,
                                                        checkpoint_every=0),
                         scoring=sc, calibration_fraction=0.3, device="cpu")
    fit = det.fusion.weight_fit
    grid = fit["grid"]
    assert [g["weight"] for g in grid] == pytest.approx([i / 10 for i in range(11)] * 2)
    assert [g["norm"] for g in grid] == ["std"] * 11 + ["quantile"] * 11
    # fitted on the selection part of the held-out images; the threshold on the other part
    assert fit["n_good"] == fit["n_synthetic"] == det.info["calibration_split"]["selection"]
    assert det.info["n_calibration_images"] == det.info["calibration_split"]["threshold"]
    best = max((g["image_auroc"] + g["pixel_auroc"]) / 2 for g in grid)
    chosen = next(g for g in grid if g["weight"] == pytest.approx(det.fusion.weight) and g["norm"] == det.fusion.norm)
    assert (chosen["image_auroc"] + chosen["pixel_auroc"]) / 2 == pytest.approx(best)
    back = AnomalyDetector.from_pretrained(tmp_path / "run" / "model", device="cpu")
    assert back.fusion.weight == pytest.approx(det.fusion.weight) and back.fusion.norm == det.fusion.norm
    assert back.card()["fusion"]["weight_source"].startswith("synthetic anomalies")
    with pytest.raises(ConfigError, match="fusion_weight_fit"):
        ScoringConfig(fusion_weight_fit="test-labels").validate()


def test_quantile_normalisation_puts_the_good_tail_at_one(fused):
    det, _ = fused
    st = det.fusion.stats["bank"]
    assert st.median is not None and st.q_hi > st.median
    x = torch.full((1, 1, 4, 4), st.q_hi)
    assert torch.allclose(st.normalise(x, "quantile"), torch.ones_like(x))
    assert torch.allclose(st.normalise(torch.full_like(x, st.median), "quantile"), torch.zeros_like(x))
    with pytest.raises(ValueError, match="fusion norm"):
        st.normalise(x, "minmax")
    with pytest.raises(ConfigError, match="fusion_norm"):
        ScoringConfig(fusion_norm="minmax").validate()
