"""Issue 13 (engine side): no wrong "good". A NaN score, a corrupt or truncated weight file, a
missing calibration, too few training images, an out-of-domain image and a re-run into an
existing run folder each give a clear status or error, never a silent "good"."""
import json
import math
import shutil

import numpy as np
import pytest

from ccad.config import ScoringConfig
from ccad.data.synthetic import write_dataset
from ccad.methods import get_method
from ccad.pipeline import AnomalyDetector, CheckpointError, Prediction, count_statuses, fit_detector, train_detector
from ccad.training import STATE_NAME, TrainConfig

SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("trust"), kinds=("fibrous",), n_train=10, n_test_good=2,
                         n_test_defect=2, size=64, seed=5, defects=("spot",))


def tiny_ccad_v():
    cfg = get_method("ccad-v").default_config("tiny")
    cfg.diffusion.start_step, cfg.diffusion.steps = 100, 2
    return cfg


def tiny_train(steps: int = 1) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, show_progress=False, checkpoint_every=0)


@pytest.fixture(scope="module")
def fused_model(root, tmp_path_factory):
    """A saved CCAD(V) model fused with the bank map: denoiser, bank and fusion memory files."""
    run = tmp_path_factory.mktemp("run")
    sc = ScoringConfig(fusion="bank", fusion_image_size=SIZE, fusion_ratio=0.1, fusion_weight_fit="fixed")
    train_detector(root, run, variant="ccad-v", method=tiny_ccad_v(), image_size=SIZE, bank_size=8,
                   train=tiny_train(), scoring=sc, calibration_fraction=0.3, device="cpu")
    return run / "model"


@pytest.fixture(scope="module")
def patchcore(root):
    return fit_detector(root / "fibrous", image_size=SIZE, bank_size=8, calibration_fraction=0.3, device="cpu",
                        method=get_method("patchcore").Config(ratio=0.1))


def good_image(root):
    return sorted((root / "fibrous" / "test" / "good").glob("*.png"))[0]


def defect_image(root):
    return sorted((root / "fibrous" / "test" / "spot").glob("*.png"))[0]


def copy_model(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


# ---- item 2: corrupt weights, NaN scores -------------------------------------------------------

def test_random_bytes_over_the_denoiser_weights_never_give_good(fused_model, root, tmp_path):
    """The issue's corruption: random bytes over part of the denoiser file, same size."""
    model = copy_model(fused_model, tmp_path)
    f = model / "denoiser" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    rng = np.random.default_rng(0)
    start = header + (len(raw) - header) // 3
    n = (len(raw) - header) // 3
    raw[start:start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    f.write_bytes(bytes(raw))
    assert f.stat().st_size == len(raw)
    try:
        det = AnomalyDetector.from_pretrained(model, device="cpu")
    except CheckpointError as exc:  # the corrupt file is named
        assert "denoiser/diffusion_pytorch_model.safetensors" in str(exc)
        assert "NaN/inf" in str(exc)
        return
    for p in det.predict_many([good_image(root), defect_image(root)])[0]:  # pragma: no cover - load refused
        assert p.status == "error" and "diffusion_pytorch_model.safetensors" in p.error


def test_a_nan_score_is_an_error_naming_the_model_files_never_good(fused_model, root, tmp_path):
    model = copy_model(fused_model, tmp_path)
    det = AnomalyDetector.from_pretrained(model, device="cpu")  # finite on disk, NaN in its output
    orig = det.method.maps

    def nan_maps(x):
        out = orig(x)
        out.maps = out.maps * float("nan")
        return out

    det.method.maps = nan_maps
    p = det.predict(good_image(root))
    assert p.status == "error" and p.verdict == "error"
    assert not p.is_good and not p.is_anomalous
    assert "diffusion_pytorch_model.safetensors" in p.error and "non-finite" in p.error
    rec = p.to_record()
    assert rec["status"] == "error" and rec["error"] == p.error
    assert not p.mask.any()
    p.heatmap(), p.overlay()  # still drawable
    results, errors = det.predict_many([good_image(root), defect_image(root)])
    counts = count_statuses(results, errors)
    assert counts["error"] == 2 and counts["good"] == 0 and counts["total"] == 2


def test_a_nan_score_from_an_in_memory_model_is_an_error(patchcore, root):
    det = patchcore
    bank = det.method.scorer.memory_bank
    saved = bank.clone()
    try:
        bank[:] = float("nan")
        p = det.predict(defect_image(root))
    finally:
        bank.copy_(saved)
    assert p.status == "error" and "non-finite" in p.error and not p.is_good
    assert det.predict(good_image(root)).status in ("good", "anomalous")


@pytest.mark.parametrize("name", ["fusion/patchcore.safetensors", "bank.safetensors",
                                  "denoiser/diffusion_pytorch_model.safetensors"])
def test_a_truncated_weight_file_is_a_checkpoint_error_naming_it(fused_model, tmp_path, name):
    model = copy_model(fused_model, tmp_path)
    f = model / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        AnomalyDetector.from_pretrained(model, device="cpu")


def test_nan_weights_in_the_fusion_memory_refuse_to_load(fused_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model = copy_model(fused_model, tmp_path)
    f = model / "fusion" / "patchcore.safetensors"
    t = load_file(str(f))
    key = next(k for k, v in t.items() if v.is_floating_point() and v.numel() > 1)
    t[key][0] = float("inf")
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"fusion/patchcore\.safetensors.*NaN/inf"):
        AnomalyDetector.from_pretrained(model, device="cpu")


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), None])
def test_a_non_finite_calibration_refuses_to_load(fused_model, tmp_path, threshold):
    model = copy_model(fused_model, tmp_path)
    cal = json.loads((model / "calibration.json").read_text())
    if threshold is None:
        del cal["threshold"]
    else:
        cal["threshold"] = threshold
    (model / "calibration.json").write_text(json.dumps(cal))
    with pytest.raises(CheckpointError, match="calibration.json"):
        AnomalyDetector.from_pretrained(model, device="cpu")


def test_a_non_finite_calibration_refuses_to_be_saved(patchcore, tmp_path):
    det = patchcore
    saved = det.calibration.threshold
    try:
        det.calibration.threshold = float("nan")
        with pytest.raises(ValueError, match="threshold"):
            det.save_pretrained(tmp_path / "m")
    finally:
        det.calibration.threshold = saved
    assert not (tmp_path / "m" / "calibration.json").exists()


# ---- item 4: uncalibrated is never good --------------------------------------------------------

def test_an_uncalibrated_model_is_never_counted_good(patchcore, root, tmp_path):
    patchcore.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "calibration.json").unlink()
    det = AnomalyDetector.from_pretrained(tmp_path / "m", device="cpu")
    results, errors = det.predict_many([good_image(root), defect_image(root)])
    assert [p.status for p in results] == ["uncalibrated", "uncalibrated"]
    assert all(not p.is_good and not p.is_anomalous and p.verdict == "uncalibrated" for p in results)
    assert all(p.to_record()["status"] == "uncalibrated" for p in results)
    counts = count_statuses(results, errors)
    assert counts["uncalibrated"] == 2 and counts["good"] == 0 and counts["anomalous"] == 0


def test_status_is_the_single_verdict():
    im = np.zeros((4, 4, 3), np.float32)
    amap = np.zeros((4, 4), np.float32)

    def pred(score, thr, error=None):
        return Prediction(im, None, amap, score, thr, 0.0, error=error)

    assert pred(1.0, 2.0).status == "good" and pred(1.0, 2.0).is_good
    assert pred(2.0, 2.0).status == "good"  # at the threshold counts as good (documented)
    assert pred(3.0, 2.0).status == "anomalous" and pred(3.0, 2.0).is_anomalous
    assert pred(1.0, math.nan).status == "uncalibrated"
    assert pred(math.nan, 2.0).status == "error" and pred(math.inf, 2.0).status == "error"
    assert pred(math.nan, math.nan).status == "error"
    assert pred(1.0, 2.0, error="boom").status == "error"
    assert pred(math.nan, 2.0).with_threshold(5.0).status == "error"
    counts = count_statuses([pred(1.0, 2.0), pred(3.0, 2.0), pred(1.0, math.nan), pred(math.nan, 2.0)], [("x", "y")])
    assert counts == {"good": 1, "anomalous": 1, "uncalibrated": 1, "error": 1, "unreadable": 1,
                      "out_of_domain": 0, "total": 5}


# ---- item 3: too few images for a calibration slice ---------------------------------------------

def one_image_folder(root, tmp_path, n=1):
    d = tmp_path / f"good{n}"
    d.mkdir()
    for p in sorted((root / "fibrous" / "train" / "good").glob("*.png"))[:n]:
        shutil.copy(p, d / p.name)
    return d


def test_training_on_one_image_is_refused_before_anything_is_built(root, tmp_path):
    data = one_image_folder(root, tmp_path)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"1 good image: too few .* at least 2"):
        train_detector(data, run, variant="ccad-v", method=tiny_ccad_v(), image_size=SIZE, bank_size=8,
                       train=tiny_train(), device="cpu")
    assert not run.exists() or not any(run.iterdir())  # no bank, no checkpoint, no model
    with pytest.raises(ValueError, match="at least 2"):
        fit_detector(data, image_size=SIZE, bank_size=8, device="cpu")
    # two images are enough: one to train on, one to calibrate on, and the threshold is finite
    det = fit_detector(one_image_folder(root, tmp_path, 2), image_size=SIZE, bank_size=8, device="cpu",
                       method=get_method("patchcore").Config(ratio=0.5))
    assert math.isfinite(det.threshold) and det.calibration.good_scores.size == 1


def test_cli_train_on_one_image_exits_non_zero_with_one_line(root, tmp_path, capsys):
    from ccad.cli import main

    data = one_image_folder(root, tmp_path)
    code = main(["train", str(data), "--out", str(tmp_path / "run"), "--variant", "patchcore", "--image-size",
                 str(SIZE), "--size", "8", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "at least 2" in err and err.startswith("error:")
    assert not (tmp_path / "run" / "model").exists()


def test_every_category_needs_its_calibration_image(root, tmp_path):
    a = one_image_folder(root, tmp_path, 3)
    b = tmp_path / "lonely"
    b.mkdir()
    shutil.copy(sorted(a.glob("*.png"))[0], b / "x.png")
    with pytest.raises(ValueError, match=r"category 'lonely'"):
        fit_detector([a, b], image_size=SIZE, bank_size=8, device="cpu")


# ---- item 6: never delete a run without being told ---------------------------------------------

def test_rerunning_train_into_a_run_folder_is_refused_and_keeps_every_checkpoint(root, tmp_path):
    from ccad.pipeline import RunFolderExistsError
    from ccad.training import list_checkpoints

    run = tmp_path / "run"
    tc = TrainConfig(steps=2, batch_size=4, show_progress=False, checkpoint_every=1, keep_checkpoints=5)
    kw = dict(variant="ccad-v", method=tiny_ccad_v(), image_size=SIZE, bank_size=8, device="cpu")
    train_detector(root / "fibrous", run, train=tc, **kw)
    before = {c.name: (c / STATE_NAME).stat().st_mtime_ns for c in list_checkpoints(run)}
    model_before = (run / "model" / "config.json").stat().st_mtime_ns
    assert before
    with pytest.raises(RunFolderExistsError, match=r"resume=True.*overwrite=True"):
        train_detector(root / "fibrous", run, train=tc, **kw)
    after = {c.name: (c / STATE_NAME).stat().st_mtime_ns for c in list_checkpoints(run)}
    assert after == before and (run / "model" / "config.json").stat().st_mtime_ns == model_before
    with pytest.raises(ValueError, match="exclude each other"):
        train_detector(root / "fibrous", run, train=tc, resume=True, overwrite=True, **kw)
    det = train_detector(root / "fibrous", run, train=TrainConfig(steps=1, batch_size=4, show_progress=False,
                                                                  checkpoint_every=0), overwrite=True, **kw)
    assert det.info["train_steps"] == 1 and [c.name for c in list_checkpoints(run)] == ["checkpoint-1"]
    assert AnomalyDetector.from_pretrained(run / "model", device="cpu").info["train_steps"] == 1


def test_cli_train_refuses_an_existing_run_naming_resume_and_overwrite(root, tmp_path, capsys):
    from ccad.cli import main
    from ccad.training import list_checkpoints

    run = tmp_path / "run"
    args = ["train", str(root / "fibrous"), "--out", str(run), "--variant", "ccad-v", "--preset", "tiny",
            "--image-size", str(SIZE), "--size", "8", "--steps", "2", "--batch-size", "4", "--checkpoint-every",
            "1", "--option", "diffusion.steps=2", "--quiet"]
    assert main(args) == 0
    names = [c.name for c in list_checkpoints(run)]
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err
    assert [c.name for c in list_checkpoints(run)] == names
    assert main(args + ["--resume", "--overwrite"]) != 0
    assert main(args + ["--overwrite"]) == 0


def test_cli_bank_refuses_to_overwrite_a_saved_model(root, fused_model, tmp_path, capsys):
    from ccad.cli import main

    model = copy_model(fused_model, tmp_path)
    before = (model / "config.json").read_text()
    args = ["bank", str(root / "fibrous"), "--out", str(model), "--image-size", str(SIZE), "--size", "8",
            "--quiet"]
    capsys.readouterr()
    assert main(args) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert (model / "config.json").read_text() == before  # the CCAD(V) model is intact
    AnomalyDetector.from_pretrained(model, device="cpu")
    assert main(args + ["--overwrite"]) == 0
    assert AnomalyDetector.from_pretrained(model, device="cpu").variant == "patchcore"


# ---- item 5: out of domain ---------------------------------------------------------------------

def foreign_images():
    from ccad.data.synthetic import make_sample

    rng = np.random.default_rng(0)
    return {"granular texture": make_sample("granular", 64, seed=1).image,
            "woven texture": make_sample("woven", 64, seed=1).image,
            "noise": rng.random((64, 64, 3)).astype(np.float32),
            # a huge noise frame: the antialiased resize averages it to a faint grey mottle (on MTD it sat
            # at 1.51x the good maximum, through a 1.5x limit by a hair; issue 21 item 2)
            "noise 1500x2000": rng.random((1500, 2000, 3)).astype(np.float32),
            "constant grey": np.full((64, 64, 3), 0.5, np.float32),
            "constant black": np.zeros((64, 64, 3), np.float32),
            "constant red": np.dstack([np.ones((64, 64)), np.zeros((64, 64)), np.zeros((64, 64))]).astype(np.float32)}


def assert_domain_flags(det, root):
    d = det.calibration.domain
    assert d is not None and math.isfinite(d.limit) and d.good.size == det.calibration.good_scores.size
    goods = sorted((root / "fibrous" / "test" / "good").glob("*.png"))
    for p in goods:  # held-out good images, never in the memory: in the domain
        r = det.predict(p)
        assert r.out_of_domain is False, (p, r.domain_distance, r.domain_limit)
    r = det.predict(defect_image(root))  # a defect on the right texture is a defect, not a foreign image
    assert r.out_of_domain is False
    for name, im in foreign_images().items():
        r = det.predict(im)
        assert r.out_of_domain is True, (name, r.domain_distance, r.domain_limit)
        rec = r.to_record()
        assert rec["out_of_domain"] is True and rec["domain_distance"] == pytest.approx(r.domain_distance)
        assert rec["domain_limit"] == pytest.approx(d.limit)


def test_patchcore_flags_foreign_images_out_of_domain(patchcore, root):
    assert_domain_flags(patchcore, root)
    results, errors = patchcore.predict_many(list(foreign_images().values()) + [good_image(root)])
    assert count_statuses(results, errors)["out_of_domain"] == len(foreign_images())


def test_predict_writes_out_of_domain_columns_and_counts_them(patchcore, root, tmp_path, capsys):
    import csv

    import cv2

    from ccad.cli import main

    patchcore.save_pretrained(tmp_path / "m")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name, im in foreign_images().items():
        cv2.imwrite(str(imgs / f"{name.replace(' ', '_')}.png"), (im[..., ::-1] * 255).round().astype(np.uint8))
    shutil.copy(good_image(root), imgs / "good.png")
    assert main(["predict", str(tmp_path / "m"), str(imgs), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    assert rows["good.png"]["out_of_domain"] == "no" and rows["noise.png"]["out_of_domain"] == "yes"
    assert sum(r["out_of_domain"] == "yes" for r in rows.values()) == len(foreign_images())
    assert float(rows["noise.png"]["domain_distance"]) > float(rows["noise.png"]["domain_limit"]) > 0
    assert all(r["error"] == "" for r in rows.values())
    assert f"{len(foreign_images())} out of the model's training domain" in capsys.readouterr().out


def test_fused_model_flags_foreign_images_and_keeps_the_statistic_on_disk(fused_model, root):
    det = AnomalyDetector.from_pretrained(fused_model, device="cpu")
    assert "fusion memory" in det.calibration.domain.source
    assert_domain_flags(det, root)
    saved = json.loads((fused_model / "calibration.json").read_text())["domain"]
    assert saved["limit"] == pytest.approx(1.5 * max(saved["good"]), rel=1e-6)


def test_ccad_v_without_fusion_flags_foreign_images_from_its_feature_bank(root, tmp_path):
    det = train_detector(root / "fibrous", tmp_path / "run", variant="ccad-v", method=tiny_ccad_v(),
                         image_size=SIZE, bank_size=8, train=tiny_train(), calibration_fraction=0.3, device="cpu")
    assert det.fusion is None and "Feature Bank" in det.calibration.domain.source
    assert_domain_flags(det, root)


def test_a_model_without_the_statistic_still_predicts_and_can_gain_it(patchcore, root, tmp_path):
    patchcore.save_pretrained(tmp_path / "m")
    cal = json.loads((tmp_path / "m" / "calibration.json").read_text())
    del cal["domain"]  # a model calibrated by an older ccad
    (tmp_path / "m" / "calibration.json").write_text(json.dumps(cal))
    old = AnomalyDetector.from_pretrained(tmp_path / "m", device="cpu")
    r = old.predict(foreign_images()["noise"])
    assert r.out_of_domain is None and r.domain_limit is None and r.status in ("good", "anomalous")
    assert r.to_record()["out_of_domain"] is None
    thr = old.threshold
    old.calibrate_domain(sorted((root / "fibrous" / "test" / "good").glob("*.png")))
    assert old.threshold == thr and old.predict(foreign_images()["noise"]).out_of_domain is True


def test_evaluation_records_carry_the_same_status(patchcore, root):
    from ccad.data.detect import load_dataset
    from ccad.evaluate import evaluate

    rep = evaluate(patchcore, load_dataset(root / "fibrous", split="test"))
    assert {r["status"] for r in rep.records} <= {"good", "anomalous"}
    assert all(r["is_anomalous"] == (r["status"] == "anomalous") for r in rep.records)


def test_cli_predict_summary_never_counts_uncalibrated_as_good(patchcore, root, tmp_path, capsys):
    from ccad.cli import main

    patchcore.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "calibration.json").unlink()
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m"), str(good_image(root)), str(defect_image(root)), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 images: 0 anomalous, 0 good, 2 uncalibrated" in line


def test_a_calibration_giving_nan_scores_is_refused_and_keeps_the_old_threshold(patchcore, root):
    det = patchcore
    bank = det.method.scorer.memory_bank
    saved, thr = bank.clone(), det.threshold
    goods = sorted((root / "fibrous" / "test" / "good").glob("*.png"))
    try:
        bank[:] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            det.calibrate(goods)
    finally:
        bank.copy_(saved)
    assert det.threshold == thr
