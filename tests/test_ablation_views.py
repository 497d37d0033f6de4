"""Ablation views (DESIGN.md "Every claim carries its ablation", issue 23): every trained method
declares the trivial replacement of its learned part, and the ablation view computes the map from
the same saved model without that part. Tiny generated data, tiny networks, random-init TAEF2
autoencoders (no network, no ../shared)."""
from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch

from ccad.cli import main
from ccad.data.detect import load_dataset
from ccad.data.synthetic import write_dataset
from ccad.evaluate import evaluate_views
from ccad.methods import get_method, method_names
from ccad.pipeline import AnomalyDetector, fit_detector, train_detector
from ccad.training import TrainConfig

SIZE = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("abl"), kinds=("granular",), n_train=5, n_test_good=1,
                         n_test_defect=2, size=SIZE, seed=5, defects=("spot",))


def _train(variant: str, root, run, size: int = SIZE, **fields):
    cfg = get_method(variant).default_config("tiny")
    for k, v in fields.items():
        setattr(cfg, k, v)
    return train_detector(root, run, variant=variant, method=cfg, image_size=size, bank_size=16,
                          train=TrainConfig(steps=1, batch_size=4, lr=1e-3, show_progress=False, checkpoint_every=0),
                          calibration_fraction=0.25, device="cpu")


def _batch(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(11))


def _raise(*_a, **_k):
    raise AssertionError("the learned part was called in the ablation view")


def test_every_trained_builtin_method_declares_an_ablation_and_patchcore_none():
    for name in method_names():
        m = get_method(name)
        assert (m.ablation is not None) == m.trainable, name
    pc = get_method("patchcore")
    assert pc.ablation is None


# ---- the learned part is bypassed: patched to raise, or its inputs randomised -------------------
def test_feat_diff_identity_view_never_calls_the_denoiser_and_is_the_edit_memory_distance(root, tmp_path):
    from ccad.methods.feat_diff import distance_map, edit_features
    from ccad.models.feat_denoiser import FeatDenoiser

    det = _train("feat-diff", root, tmp_path / "run", memory_size=32, search=False, edit=0.5, noise_level=50,
                 steps=1)
    m, x = det.method, _batch()
    with mock.patch.object(FeatDenoiser, "forward", _raise):
        with pytest.raises(AssertionError, match="learned part"):
            m.maps(x)  # the model's own view does call it (so the patch can catch a leak)
        assert not m.ablate  # restored after an error
        out = m.ablation_maps(x).maps
        assert not m.ablate
    z = m.features(x)
    z_e, _ = edit_features(z, m.memory, 0.5)
    want = m._smooth(distance_map(z, z_e, "l2"), x.shape[-2:])
    torch.testing.assert_close(out, want)
    assert "ablation" in det.views and det.card()["ablation"].startswith("identity denoiser")


def test_ccad_v_ablation_ignores_the_bank(root, tmp_path):
    cfg = {"diffusion": get_method("ccad-v").default_config("tiny").diffusion}
    cfg["diffusion"].start_step, cfg["diffusion"].steps = 100, 2
    det = _train("ccad-v", root, tmp_path / "run", size=32, **cfg)
    _check_bank_is_unused(det, _batch(2, 32))


@pytest.mark.parametrize("variant", ["ccad-c", "ccad-f"])
def test_ccad_latent_ablation_ignores_the_bank_and_skips_the_fcm(variant, root, tmp_path):
    from ccad.models.fcm import FineCompressionModule

    det = _train(variant, root, tmp_path / "run", autoencoder="taef2:random")
    with mock.patch.object(FineCompressionModule, "forward", _raise):
        _check_bank_is_unused(det, _batch())


def _check_bank_is_unused(det, x):
    m = det.method
    before_abl, before_own = m.ablation_maps(x).maps, m.maps(x).maps if m.name != "ccad-f" else None
    m.ctx.bank.features = torch.randn_like(m.ctx.bank.features) * 10  # another bank entirely
    torch.testing.assert_close(m.ablation_maps(x).maps, before_abl)  # the condition is provably unused
    if before_own is not None:  # ... while the model's own map does read it
        assert not torch.allclose(m.maps(x).maps, before_own)
    assert "bank condition" in det.card()["ablation"]


def test_deco_diff_ablation_never_calls_the_network_and_is_the_round_trip_pixel_term(root, tmp_path):
    from diffusers import UNet2DModel

    from ccad.diffusion.deco import deco_pixel_term

    det = _train("deco-diff", root, tmp_path / "run", autoencoder="taef2:random")
    m, x = det.method, _batch()
    with mock.patch.object(UNet2DModel, "forward", _raise):
        with pytest.raises(AssertionError, match="learned part"):
            m.maps(x)
        out = m.ablation_maps(x)
    rt = m.decode(m.encode(x))
    torch.testing.assert_close(out.maps, deco_pixel_term(x, rt, float(m.config.gamma_p)))
    assert float(out.maps.max()) > 0  # not a flat map (eq. 15's product would be 0 everywhere)


def test_d3ad_ablation_uses_one_fixed_start_without_the_knn_conditioning(root, tmp_path):
    import ccad.diffusion.d3ad as d3

    det = _train("d3ad", root, tmp_path / "run", autoencoder="taef2:random", domain_adapt_epochs=0, K=2,
                 norm_images=2)
    m, x = det.method, _batch(3)
    fixed = m.fixed_start()
    p = m.dic_params()
    assert fixed in set(d3.start_steps(m.train_distances, m.bin_edges, p["T_max"], p["min_bin"],
                                       p["round_to"]).tolist())
    seen = []
    real = d3.d3ad_reconstruct

    def spy(eps_fn, z0, scheduler, starts, **kw):
        seen.append([int(s) for s in starts])
        return real(eps_fn, z0, scheduler, starts, **kw)

    with mock.patch.object(type(m), "start_steps", _raise), mock.patch.object(d3, "d3ad_reconstruct", spy):
        with pytest.raises(AssertionError, match="learned part"):
            m.maps(x)
        m.ablation_maps(x)
    assert seen == [[fixed] * 3]


def test_glad_ablation_runs_no_adaptive_search(root, tmp_path):
    import ccad.diffusion.glad as gd

    det = _train("glad", root, tmp_path / "run", size=32, T=400, steps=4, t_min=100, delta=0.05,
                 feature_layers=(1, 2), delta_quantile=None)
    m, x = det.method, _batch(2, 32)
    assert m.fixed_start() == 100
    with mock.patch.object(type(m), "_step_score", _raise), mock.patch.object(gd, "glad_reconstruct", _raise):
        with pytest.raises(AssertionError, match="learned part"):
            m.maps(x)
        out = m.ablation_maps(x)
    assert out.maps.shape == (2, 1, 32, 32) and torch.isfinite(out.maps).all()


def test_a_method_without_an_ablation_has_no_view(root):
    det = fit_detector(load_dataset(root, split="train"), variant="patchcore", image_size=SIZE,
                       calibration_fraction=0.25, device="cpu")
    assert det.views == ("method",)
    with pytest.raises(ValueError, match="no ablation"):
        det.ablation_maps(_batch())
    with pytest.raises(ValueError, match="no ablation"):
        with det.method.ablated():
            pass


# ---- evaluate --views, evaluate_views, the card ---------------------------------------------
@pytest.fixture(scope="module")
def feat_model(root, tmp_path_factory):
    run = tmp_path_factory.mktemp("fd") / "run"
    _train("feat-diff", root, run, memory_size=32, search=False, edit=1.0, noise_level=50, steps=1)
    return run / "model"


def test_evaluate_views_returns_the_ablation_row_from_the_same_model(root, feat_model):
    det = AnomalyDetector.from_pretrained(feat_model, device="cpu")
    test = load_dataset(root, split="test")
    views = evaluate_views(det, test, batch_size=2)
    assert list(views) == ["method", "ablation"]  # every view the detector has, by default
    assert views["ablation"].per_category["mean"]["image_auroc"] == pytest.approx(
        float(views["ablation"].per_category["granular"]["image_auroc"]))
    det.method.config.identity = True  # a model whose own map is the identity: both rows agree
    again = evaluate_views(det, test, batch_size=2)
    np.testing.assert_allclose([r["score"] for r in again["method"].records],
                               [r["score"] for r in again["ablation"].records], rtol=1e-5)


def test_one_pass_gives_the_same_rows_as_separate_passes_and_feat_diff_extracts_features_once(root, feat_model):
    det = AnomalyDetector.from_pretrained(feat_model, device="cpu")
    test = load_dataset(root, split="test")
    alone = {v: evaluate_views(det, test, batch_size=2, views=(v,))[v] for v in ("method", "ablation")}
    calls = []
    real = type(det.method).features

    def counting(self, x):
        calls.append(len(x))
        return real(self, x)

    with mock.patch.object(type(det.method), "features", counting):
        both = evaluate_views(det, test, batch_size=2)
    assert sum(calls) == len(test)  # each image's backbone features once for both views
    for v in ("method", "ablation"):
        np.testing.assert_allclose([r["score"] for r in both[v].records], [r["score"] for r in alone[v].records],
                                   rtol=1e-5)


def test_cli_evaluate_views_prints_and_records_the_ablation_row(root, feat_model, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["evaluate", str(feat_model), str(root), "--views", "--quiet", "--json", str(out), "--record"]) == 0
    text = capsys.readouterr().out
    rows = [ln.split()[0] for ln in text.split("views (mean over categories")[1].splitlines()[2:4]]
    assert rows == ["method", "ablation"] and "the ablation row: feat-diff with identity denoiser" in text
    assert set(json.loads(out.read_text())["views"]) == {"method", "ablation"}
    card = AnomalyDetector.from_pretrained(feat_model, device="cpu").card()
    assert set(card["view_metrics"]) == {"method", "ablation"}
    assert "view_metrics" in (feat_model / "README.md").read_text()


def test_cli_evaluate_views_refuses_a_detector_with_one_view(root, tmp_path, capsys):
    det = fit_detector(load_dataset(root, split="train"), variant="patchcore", image_size=SIZE,
                       calibration_fraction=0.25, device="cpu")
    det.save_pretrained(tmp_path / "pc")
    assert main(["evaluate", str(tmp_path / "pc"), str(root), "--views", "--quiet"]) == 2
    assert "one view only" in capsys.readouterr().err


# ---- feat-diff's search: the identity arm ----------------------------------------------------
class _Garbage(torch.nn.Module):
    """A denoiser that predicts loud fixed noise: its reconstructions are worse than the identity."""

    def forward(self, z_t, t, ctx):
        return 50.0 * torch.randn(z_t.shape, generator=torch.Generator().manual_seed(3)).to(z_t)


def test_when_the_identity_wins_the_search_the_model_skips_the_denoiser_and_its_card_says_so(root, tmp_path):
    from ccad.methods.feat_diff import IDENTITY_NOTE
    from ccad.models.feat_denoiser import FeatDenoiser

    det = _train("feat-diff", root, tmp_path / "run", memory_size=32, search=False, noise_level=50, steps=1,
                 search_noise=(50, 100), search_steps=(1,), search_edit=(0.0, 1.0), search_images=4)
    m = det.method
    assert not m.config.identity and "note" not in m.card()
    real = m.modules["denoiser"]
    m.modules["denoiser"] = _Garbage()
    good = [s for s in load_dataset(root, split="train")][:4]  # stand-ins for the held-out selection images
    m.config.search, m.config.noise_level, m.config.steps = True, None, None  # now the search chooses them
    table = m.search_hyperparameters(good)
    ident = [r for r in table["grid"] if r["denoiser"] == "identity"]
    assert [r["edit"] for r in ident] == [1.0] and len(table["grid"]) == 5  # 2 noises x 2 edits + identity
    assert table["chosen"]["denoiser"] == "identity" and m.uses_identity() and m.setting("edit") == 1.0
    assert not m.config.identity  # the search's choice is fitted state, not the user's config
    m.modules["denoiser"] = real
    x = _batch()
    with mock.patch.object(FeatDenoiser, "forward", _raise):  # inference skips the denoiser (cost)
        own = m.maps(x).maps
    torch.testing.assert_close(own, m.ablation_maps(x).maps)
    card = det.card()
    assert card["note"] == IDENTITY_NOTE and card["reconstruction"]["steps"] == 0
    from app.views import card_markdown, card_summary  # the app's one-line card and its table say so too

    assert IDENTITY_NOTE in card_summary(card) and IDENTITY_NOTE in card_markdown(card)
    det.save_pretrained(tmp_path / "saved")
    assert IDENTITY_NOTE in (tmp_path / "saved" / "README.md").read_text()
    back = AnomalyDetector.from_pretrained(tmp_path / "saved", device="cpu")
    assert back.method.uses_identity()
    with mock.patch.object(FeatDenoiser, "forward", _raise):
        torch.testing.assert_close(back.method.maps(x).maps, own)


def test_the_ablation_flag_is_per_thread_and_restored():
    import threading

    from ccad.features import FeatureBank
    from ccad.methods import Context
    from ccad.methods.feat_diff import FeatDiffConfig

    m = get_method("feat-diff")(FeatDiffConfig(preset="tiny"), Context(image_size=SIZE, device=torch.device("cpu"),
                                                                       bank=FeatureBank(torch.zeros(2, 4))))
    seen = []
    with m.ablated():
        t = threading.Thread(target=lambda: seen.append(m.ablate))  # e.g. a prediction served meanwhile
        t.start()
        t.join()
        with m.ablated():
            assert m.ablate
        assert m.ablate  # nested: still inside the outer one
    assert seen == [False] and not m.ablate
