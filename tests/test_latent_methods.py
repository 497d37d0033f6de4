"""The latent methods end to end (CCAD(C), CCAD(F), DeCo-Diff) on small generated data:
multi-class training, save / load, per-category metrics, a resumed run, the latent cache,
a missing autoencoder, and the CLI. Random-init TAEF2 autoencoders (no network, no ../shared)."""
from __future__ import annotations

import re

import json

import numpy as np
import pytest
import torch

from ccad.cli import main
from ccad.data.detect import load_dataset
from ccad.data.synthetic import write_dataset
from ccad.evaluate import evaluate
from ccad.methods import get_method
from ccad.models.autoencoder import AutoencoderNotFound
from ccad.pipeline import AnomalyDetector, train_detector
from ccad.training import TrainConfig, load_checkpoint_weights

SIZE = 64
LATENT = ("ccad-c", "ccad-f", "deco-diff")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two texture categories in one MVTec-style root: a multi-class training set."""
    return write_dataset(tmp_path_factory.mktemp("mc"), kinds=("fibrous", "granular"), n_train=6, n_test_good=2,
                         n_test_defect=2, size=SIZE, seed=4, defects=("spot",))


def tiny(variant: str, **fields):
    cfg = get_method(variant).default_config("tiny")
    cfg.autoencoder = "taef2:random"
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


def quick_train(steps: int = 3, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=1e-3, show_progress=False, checkpoint_every=0, **kw)


@pytest.mark.parametrize("variant", LATENT)
def test_latent_method_trains_one_model_for_all_categories_saves_and_reloads(variant, root, tmp_path):
    seen = []
    det = train_detector(root, tmp_path / "run", variant=variant, method=tiny(variant), train=quick_train(),
                         image_size=SIZE, bank_size=16, calibration_fraction=0.25, device="cpu",
                         callbacks=[lambda s: seen.append(s.loss)])
    assert len(seen) == 3 and all(np.isfinite(seen))
    assert det.info["categories"] == ["fibrous", "granular"] and np.isfinite(det.threshold)
    # the latents were encoded once into the run folder (memory-mapped), with the fitted scaling
    meta = json.loads((tmp_path / "run" / "latents" / "latents.json").read_text())
    assert meta["shape"][0] == det.info["n_train_images"] and det.config.method.latent_scale is not None
    model = tmp_path / "run" / "model"
    assert (model / "vae" / "autoencoder.json").is_file()
    for name in get_method(variant).components or ("unet", "bank_proj", "controlnet"):
        assert (model / name / "config.json").is_file(), name
    test = load_dataset(root, split="test")
    img = next(s.image_path for s in test if s.label == 1)
    r = det.predict(img)
    assert r.anomaly_map.shape == (SIZE, SIZE) and r.reconstruction.shape == (SIZE, SIZE, 3)
    back = AnomalyDetector.from_pretrained(model, device="cpu")
    assert back.predict(img).score == pytest.approx(r.score, rel=1e-4)  # deterministic, same weights
    report = evaluate(back, test)
    assert {"fibrous", "granular", "mean"} <= set(report.per_category)  # per-category, no category needed
    card = back.card()
    assert card["variant"] == variant and card["autoencoder"]["kind"] == "taef2" and card["denoiser_parameters"] > 0


def test_ccad_f_bank_comes_from_the_latent_encoder(root, tmp_path):
    det = train_detector(root, tmp_path / "run", variant="ccad-f", method=tiny("ccad-f"), train=quick_train(2),
                         image_size=SIZE, bank_size=12, calibration_fraction=0.0, device="cpu")
    c = det.config.method
    assert det.bank.features.shape == (12, 9 * c.latent_channels)  # 3x3 latent neighbourhoods, d = 9 C
    assert det.bank.meta["backbone"].startswith("latent:")
    x = torch.rand(2, 3, SIZE, SIZE)
    z0 = det.method.encode(x)
    fine = det.method._bank(det.method.modules, z0)
    assert fine.shape[0] == 2 and fine.shape[-1] == 9 * c.latent_channels  # one fine bank per image (eq. 8)


def test_resumed_latent_run_equals_an_uninterrupted_one(root, tmp_path):
    full = train_detector(root, tmp_path / "full", variant="deco-diff", method=tiny("deco-diff"),
                          train=quick_train(4), image_size=SIZE, calibration_fraction=0.0, device="cpu")
    part = train_detector(root, tmp_path / "part", variant="deco-diff", method=tiny("deco-diff"),
                          train=quick_train(4), image_size=SIZE, calibration_fraction=0.0, device="cpu",
                          callbacks=[lambda s: s.step == 2])
    assert part.info["stopped_early"] and part.info["train_steps"] == 2
    import ccad.data.latent_cache as lc

    calls, encodes = [], []
    real = lc.LatentCache.__init__
    orig_encode = type(part.method.autoencoder).encode_raw

    def counting_encode(self, images):
        encodes.append(len(images))
        return orig_encode(self, images)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(part.method.autoencoder), "encode_raw", counting_encode)
        mp.setattr(lc.LatentCache, "__init__", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
        resumed = train_detector(root, tmp_path / "part", variant="deco-diff", method=tiny("deco-diff"),
                                 train=quick_train(4), image_size=SIZE, calibration_fraction=0.0, device="cpu",
                                 resume=True)
    assert calls and not encodes  # the resumed run reads the cached latents, it does not re-encode
    assert resumed.info["train_steps"] == 4
    a = load_checkpoint_weights(tmp_path / "full" / "checkpoint-4", "model")
    b = load_checkpoint_weights(tmp_path / "part" / "checkpoint-4", "model")
    assert a.keys() == b.keys()
    for k in a:  # the same training, to float32 rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    s_full = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())["losses"]
    s_part = json.loads((tmp_path / "part" / "checkpoint-4" / "trainer_state.json").read_text())["losses"]
    assert s_part == pytest.approx(s_full, rel=1e-5, abs=1e-6)
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resumed.maps_for_batch(x)[0], full.maps_for_batch(x)[0], rtol=1e-4, atol=1e-5)


def test_a_missing_autoencoder_says_how_to_provide_one(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny("deco-diff", autoencoder=f"kl:{tmp_path / 'no-such-vae'}")
    with pytest.raises(AutoencoderNotFound, match="taef2:"):
        train_detector(root, tmp_path / "run", variant="deco-diff", method=cfg, train=quick_train(1),
                       image_size=SIZE, device="cpu")
    cfg = tiny("ccad-c", autoencoder="kl:nobody/not-a-cached-vae")
    with pytest.raises(AutoencoderNotFound, match="kl:"):
        train_detector(root, tmp_path / "run2", variant="ccad-c", method=cfg, train=quick_train(1),
                       image_size=SIZE, bank_size=8, device="cpu")
    code = main(["train", str(root), "--variant", "deco-diff", "--out", str(tmp_path / "cli"), "--steps", "1",
                 "--preset", "tiny", "--image-size", str(SIZE), "--option", "autoencoder=kl:nobody/nothing"])
    # after the phase lines ("[0:00] loading the autoencoder ..."), the error
    err = "\n".join(ln for ln in capsys.readouterr().err.splitlines() if not re.match(r"\[\d+:\d\d\] ", ln))
    assert code == 2 and err.startswith("error:") and "--option autoencoder=" in err and "taef2:" in err


def test_cli_trains_a_latent_variant_and_predicts_with_it(root, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", str(root / "fibrous"), str(root / "granular"), "--variant", "deco-diff", "--out",
                 str(run), "--preset", "tiny", "--image-size", str(SIZE), "--steps", "2", "--batch-size", "4",
                 "--option", "autoencoder=taef2:random", "--option", "steps=3", "--quiet"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["variant"] == "deco-diff" and out["categories"] == ["fibrous", "granular"]
    det = AnomalyDetector.from_pretrained(run / "model", device="cpu")
    assert det.config.method.steps == 3  # the --option reached the typed config
    imgs = root / "granular" / "test" / "spot"
    assert main(["predict", str(run / "model"), str(imgs), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    assert (tmp_path / "pred" / "scores.csv").is_file()
    assert list((tmp_path / "pred").glob("*_reconstruction.png"))


def test_the_configured_noise_schedule_is_the_one_trained_with(root, tmp_path, monkeypatch):
    """train_detector used to build the Trainer with the default T=1000 schedule whatever the
    config said; the method now owns its schedule for training and sampling alike."""
    import ccad.diffusion.objectives as obj

    seen_T = []
    real = obj.sample_timesteps

    def spy(batch, scheduler, generator=None, device=None):
        seen_T.append(int(scheduler.config.num_train_timesteps))
        return real(batch, scheduler, generator, device)

    monkeypatch.setattr(obj, "sample_timesteps", spy)
    cfg = get_method("ccad-v").default_config("tiny")
    cfg.diffusion.num_train_timesteps, cfg.diffusion.start_step, cfg.diffusion.steps = 100, 20, 2
    det = train_detector(root / "fibrous", tmp_path / "run", variant="ccad-v", method=cfg, train=quick_train(2),
                         image_size=32, bank_size=8, calibration_fraction=0.0, device="cpu")
    assert seen_T == [100, 100]
    assert det.method.scheduler.config.num_train_timesteps == 100
