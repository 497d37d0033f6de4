"""The object users call: build, predict, save/load, threshold, bad input, CCAD(V) end to end."""
import json
import shutil

import numpy as np
import torch
import pytest

from ccad.data.synthetic import write_dataset
from ccad.config import DiffusionConfig
from ccad.methods import get_method
from ccad.pipeline import AnomalyDetector, CheckpointError, fit_detector, train_detector
from ccad.training import TrainConfig

SIZE = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("synthetic"), kinds=("fibrous",), n_train=14, n_test_good=4,
                         n_test_defect=2, size=SIZE, seed=3, defects=("spot", "scratch"))
    return root / "fibrous"


@pytest.fixture(scope="module")
def patchcore(dataset):
    return fit_detector(dataset, image_size=96, bank_size=32, calibration_fraction=0.25, device="cpu")


def test_patchcore_detector_separates_defects_from_good(patchcore, dataset):
    det = patchcore
    assert det.variant == "patchcore" and np.isfinite(det.threshold)
    assert det.calibration.good_scores.size == 4  # a quarter of the 14 good images held out
    assert det.bank.features.shape[0] == 32  # the requested xi, even from few images
    good = sorted((dataset / "test" / "good").glob("*.png"))
    bad = sorted((dataset / "test" / "spot").glob("*.png")) + sorted((dataset / "test" / "scratch").glob("*.png"))
    g = [det.predict(p).score for p in good]
    b = [det.predict(p).score for p in bad]
    assert min(b) > np.median(g)
    assert np.mean(b) > np.mean(g)


def test_prediction_is_at_the_original_size_with_mask_verdict_and_timing(patchcore, dataset):
    path = sorted((dataset / "test" / "spot").glob("*.png"))[0]
    r = patchcore.predict(path)
    assert r.image.shape == (SIZE, SIZE, 3) and r.anomaly_map.shape == (SIZE, SIZE)
    assert r.reconstruction is None  # PatchCore reconstructs nothing
    assert r.path == str(path) and r.seconds > 0
    assert r.heatmap().shape == (SIZE, SIZE, 3) and r.heatmap().dtype == np.uint8
    assert r.overlay().shape == (SIZE, SIZE, 3)
    low, high = r.with_threshold(r.score - 1e-3), r.with_threshold(r.score + 1e-3)
    assert low.verdict == "anomalous" and high.verdict == "good"
    assert low.mask.any() and not high.mask.any()
    assert low.score == high.score == r.score  # re-labelled, not re-run


def test_predict_accepts_any_array_format(patchcore):
    rng = np.random.default_rng(0)
    grey16 = (rng.random((70, 50)) * 65535).astype(np.uint16)
    rgba = (rng.random((40, 90, 4)) * 255).astype(np.uint8)
    for arr in (grey16, rgba):
        r = patchcore.predict(arr)
        assert r.anomaly_map.shape == arr.shape[:2]
        assert np.isfinite(r.score)


def test_save_load_round_trip_and_threshold_change_after_save(patchcore, dataset, tmp_path):
    patchcore.save_pretrained(tmp_path / "m")
    assert {"config.json", "bank.safetensors", "patchcore.safetensors", "calibration.json", "README.md"} <= {
        p.name for p in (tmp_path / "m").iterdir()}
    back = AnomalyDetector.from_pretrained(tmp_path / "m")
    img = sorted((dataset / "test" / "scratch").glob("*.png"))[0]
    assert back.predict(img).score == pytest.approx(patchcore.predict(img).score, rel=1e-5)
    assert back.threshold == pytest.approx(patchcore.threshold)
    # The user changes the threshold of the saved model; a fresh load sees it.
    back.set_threshold_and_save(tmp_path / "m", 123.5)
    again = AnomalyDetector.from_pretrained(tmp_path / "m")
    assert again.threshold == 123.5 and again.predict(img).verdict == "good"
    assert again.calibration.false_alarms() == 0


def test_incompatible_or_corrupt_checkpoints_give_clear_errors(patchcore, tmp_path):
    with pytest.raises(CheckpointError, match="not a ccad model folder"):
        AnomalyDetector.from_pretrained(tmp_path)
    patchcore.save_pretrained(tmp_path / "m")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "m", bad)
    (bad / "patchcore.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="weights"):
        AnomalyDetector.from_pretrained(bad)
    (bad / "patchcore.safetensors").unlink()  # a part of the folder lost in a copy: named, with what it holds
    with pytest.raises((CheckpointError, FileNotFoundError), match=r"patchcore\.safetensors.*memory bank"):
        AnomalyDetector.from_pretrained(bad)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["variant"] = "no-such-method"  # e.g. a plug-in that is not installed here
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no-such-method.*available: patchcore"):
        AnomalyDetector.from_pretrained(bad)


def test_predict_many_skips_and_reports_a_corrupt_file(patchcore, dataset, tmp_path):
    good = sorted((dataset / "test" / "good").glob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    items = [good[0], broken, good[1], tmp_path / "missing.png", good[2]]
    results, errors = patchcore.predict_many(items, batch_size=2)
    assert [r.path for r in results] == [str(good[0]), str(good[1]), str(good[2])]
    assert [e[0] for e in errors] == [str(broken), str(tmp_path / "missing.png")]
    assert "broken.png" in errors[0][1]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        fit_detector(tmp_path / "empty", image_size=64)


def test_ccad_v_trains_reconstructs_and_reloads(dataset, tmp_path):
    seen = []
    method = get_method("ccad-v").default_config("tiny")
    method.diffusion = DiffusionConfig(start_step=100, steps=2)
    train = TrainConfig(steps=3, batch_size=4, checkpoint_every=2, warmup_steps=1, show_progress=False)
    det = train_detector(dataset, tmp_path / "run", method=method, train=train, image_size=32,
                         bank_size=16, calibration_fraction=0.25, callbacks=[lambda s: seen.append(s.step)],
                         device="cpu")
    assert seen == [1, 2, 3]
    assert det.variant == "ccad-v" and np.isfinite(det.threshold)
    img = sorted((dataset / "test" / "spot").glob("*.png"))[0]
    r = det.predict(img)
    assert r.reconstruction.shape == (SIZE, SIZE, 3)
    assert 0.0 <= r.reconstruction.min() and r.reconstruction.max() <= 1.0
    again = det.predict(img)
    assert again.score == pytest.approx(r.score, rel=1e-5)  # seeded reconstruction: deterministic
    back = AnomalyDetector.from_pretrained(tmp_path / "run" / "model")
    assert back.predict(img).score == pytest.approx(r.score, rel=1e-4)
    card = back.card()
    assert card["variant"] == "ccad-v" and card["bank_size"] == 16 and card["denoiser_parameters"] > 0
    assert card["n_train_images"] == 10


def test_bank_is_drawn_from_the_patchcore_memory_in_one_pass(dataset):
    det = fit_detector(dataset, image_size=64, bank_size=8, method=get_method("patchcore").Config(ratio=0.5),
                       calibration_fraction=0.0, device="cpu")
    memory = det.method.scorer.memory_bank.cpu()
    assert memory.shape[0] >= 32
    assert det.bank.features.shape == (8, memory.shape[1])
    assert "PatchCore memory" in det.bank.meta["coreset"]["method"]
    d = torch.cdist(det.bank.features.double(), memory.double(),
                    compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert float(d.max()) < 1e-3  # every bank row is a memory row
    assert det.bank.meta["n_images"] == 14 and det.bank.meta["source_hash"]


def test_push_to_hub_uploads_a_loadable_folder(patchcore, monkeypatch, tmp_path):
    """push_to_hub goes through huggingface_hub's HfApi; the uploaded folder loads back."""
    import huggingface_hub.hub_mixin as hub_mixin

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = (repo_id, private)
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    url = patchcore.push_to_hub("me/tiles", private=True, token="t0k")
    assert url.endswith("/commit/1") and uploaded["repo"] == ("me/tiles", True) and uploaded["token"] == "t0k"
    back = AnomalyDetector.from_pretrained(tmp_path / "uploaded")
    assert back.threshold == pytest.approx(patchcore.threshold)


def test_hub_repo_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match="(?i)offline|cache|connection|not found|cannot find"):
        AnomalyDetector.from_pretrained("someone/not-cached-model")


def test_a_version_1_ccad_v_folder_still_loads(dataset, tmp_path):
    """Folders saved before the method seam (config v1, denoiser.safetensors at the top) load as before."""
    method = get_method("ccad-v").default_config("tiny")
    method.diffusion = DiffusionConfig(start_step=100, steps=2)
    det = train_detector(dataset, tmp_path / "run", method=method, train=TrainConfig(steps=1, show_progress=False),
                         image_size=32, bank_size=8, calibration_fraction=0.25, device="cpu")
    new = tmp_path / "run" / "model"
    old = tmp_path / "v1"
    shutil.copytree(new, old)
    shutil.move(str(old / "denoiser" / "diffusion_pytorch_model.safetensors"), str(old / "denoiser.safetensors"))
    shutil.rmtree(old / "denoiser")
    cfg = json.loads((old / "config.json").read_text())
    m = cfg.pop("method")
    cfg.update(version=1, patchcore=None, denoiser=m["denoiser"], diffusion=m["diffusion"])
    (old / "config.json").write_text(json.dumps(cfg))
    img = sorted((dataset / "test" / "spot").glob("*.png"))[0]
    back = AnomalyDetector.from_pretrained(old, device="cpu")
    assert back.config.version == 2 and back.predict(img).score == pytest.approx(det.predict(img).score, rel=1e-5)
