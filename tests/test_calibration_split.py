"""Calibration honesty (issue 20.3, 21.1) on small generated data: the held-out good images are
split into a selection part (settings are chosen there) and a threshold part (the threshold is set
there), disjoint; too few held-out images are refused, naming the number; every calibration
reports the estimated miss rate on synthetic anomalies beside its false-alarm rate; a
``target_miss`` policy; an operating point from labelled images (Python and ``ccad calibrate``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ccad.config import ConfigError, ScoringConfig
from ccad.data.dataset import iter_batches
from ccad.data.detect import load_dataset
from ccad.data.synthetic import write_dataset
from ccad.pipeline import AnomalyDetector, fit_detector, split_good, split_held_out
from ccad.scoring.threshold import Calibration

torch.set_num_threads(1)
SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("calsplit"), kinds=("granular",), n_train=12, n_test_good=3,
                         n_test_defect=3, size=64, seed=5, defects=("spot", "scratch"))


def fused_scoring(**kw) -> ScoringConfig:
    return ScoringConfig(fusion="bank", fusion_image_size=SIZE, fusion_ratio=0.1, **kw)


@pytest.fixture(scope="module")
def fused(root):
    return fit_detector(root, variant="patchcore", image_size=SIZE, scoring=fused_scoring(),
                        calibration_fraction=0.5, device="cpu")


def test_threshold_is_set_on_images_disjoint_from_those_the_fusion_was_fitted_on(root, fused):
    det = fused
    good = [s for s in load_dataset(root, split="train") if s.label == 0]
    _, held = split_good(good, 0.5, 0)
    split = det.info["calibration_split"]
    sel, thr = set(split["selection_images"]), set(split["threshold_images"])
    assert sel and thr and not sel & thr
    assert sel | thr == {s.image_path for s in held}  # every held-out image does exactly one job
    assert split["selection"] == len(sel) == 3 and split["threshold"] == len(thr) == 3
    # the fusion's normalisation rests on the selection part only ...
    assert det.fusion.stats["method"].n_images == len(sel) == det.fusion.weight_fit["n_good"]
    # ... and the threshold's good scores are exactly the threshold part's scores
    thr_samples = [s for s in held if s.image_path in thr]
    scores, _ = det.score_batches(iter_batches(thr_samples, det.input_size, 8))
    np.testing.assert_allclose(np.sort(det.calibration.good_scores), np.sort(scores), rtol=1e-5)
    assert det.threshold == pytest.approx(float(np.max(scores)), rel=1e-6)  # 1 % of 3 images: the maximum
    card = det.card()
    assert card["held_out_split"]["selection"] == 3 and card["held_out_split"]["threshold"] == 3
    assert "the fusion's weight and normalisation" in card["held_out_split"]["chosen_on_selection"]


def test_nothing_chosen_means_every_held_out_image_sets_the_threshold(root):
    det = fit_detector(root, variant="patchcore", image_size=SIZE, calibration_fraction=0.5, device="cpu")
    split = det.info["calibration_split"]
    assert split["selection"] == 0 and split["threshold"] == 6 == det.calibration.good_scores.size


def test_too_few_held_out_images_are_refused_naming_the_number(root, tmp_path):
    from unittest import mock

    from ccad.methods.patchcore import PatchCore

    two = [s for s in load_dataset(root, split="train") if s.label == 0][:2]  # 1 to train on, 1 held out
    with mock.patch.object(PatchCore, "build_bank", side_effect=AssertionError("built before the check")):
        with pytest.raises(ValueError, match=r"1 held-out good image: too few to split.*1 \+ 1.*gave 0 \+ 1"):
            fit_detector(two, variant="patchcore", image_size=SIZE, scoring=fused_scoring(),
                         calibration_fraction=0.5, device="cpu")
    # a small fraction of enough images: the held-out slice grows to give each part its minimum
    det = fit_detector(root, variant="patchcore", image_size=SIZE, scoring=fused_scoring(),
                       calibration_fraction=0.05, device="cpu")
    assert (det.info["calibration_split"]["selection"], det.info["calibration_split"]["threshold"]) == (1, 1)
    assert det.info["n_train_images"] == 10
    # a user who wants more images in each part says so in the config, and is refused with the numbers
    with pytest.raises(ValueError, match=r"6 held-out good images.*at least 4 \+ 1.*gave 3 \+ 3"):
        fit_detector(root, variant="patchcore", image_size=SIZE, scoring=fused_scoring(min_selection_images=4),
                     calibration_fraction=0.5, device="cpu")
    with pytest.raises(ConfigError, match="selection_fraction"):
        ScoringConfig(selection_fraction=1.0).validate()


def test_split_is_stratified_deterministic_and_keeps_single_images_for_the_threshold():
    from ccad.data.sample import Sample

    items = [Sample(f"a{i}.png", None, 0, category="a") for i in range(4)] + [Sample("b0.png", None, 0, category="b")]
    sel, thr = split_held_out(items, 0.5, 0)
    assert split_held_out(items, 0.5, 0) == (sel, thr)
    assert len([s for s in sel if s.category == "a"]) == 2 and "b0.png" in [s.image_path for s in thr]
    # categories with one held-out image each are pooled: a multi-class model still gets both parts
    singles = [Sample(f"{c}.png", None, 0, category=c) for c in "xyz"]
    sel, thr = split_held_out(singles, 0.5, 0)
    assert len(sel) == 2 and len(thr) == 1


def test_calibration_reports_the_estimated_miss_rate_and_how_many_images_it_rests_on(fused, tmp_path):
    cal = fused.calibration
    rep = cal.report()
    assert rep["policy"] == "fpr" and rep["n_good"] == 3 and rep["n_synthetic"] == 3
    assert rep["estimated_miss_rate"] == pytest.approx(float(np.mean(cal.synthetic_scores <= cal.threshold)))
    assert "proxy" in rep["miss_rate_note"]
    assert "1/3" in rep["resolution_note"] and "largest held-out good score" in rep["resolution_note"]
    fused.save_pretrained(tmp_path / "m")
    back = AnomalyDetector.from_pretrained(tmp_path / "m", device="cpu")
    assert back.card()["operating_point"] == fused.card()["operating_point"]
    assert "estimated_miss_rate" in (tmp_path / "m" / "README.md").read_text()


def test_target_miss_policy_takes_the_highest_threshold_meeting_the_estimate():
    good = np.array([0.1, 0.2, 0.3, 0.4])
    syn = np.array([0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    cal = Calibration.fit(good, "miss", synthetic=syn, miss=0.2)  # 2 of 10 may be missed
    assert cal.estimated_miss_rate() == pytest.approx(0.2)
    # the highest threshold that still catches 0.6
    assert cal.threshold == np.nextafter(np.float32(0.6), np.float32(-np.inf))
    assert cal.false_alarm_rate() == 0.0 and cal.report()["target_miss"] == 0.2
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))).report() == cal.report()
    with pytest.raises(ValueError, match="synthetic"):
        Calibration.fit(good, "miss", miss=0.1)


def test_target_miss_policy_from_the_config(root):
    det = fit_detector(root, variant="patchcore", image_size=SIZE, calibration_fraction=0.5, device="cpu",
                       scoring=ScoringConfig(calibration="miss", target_miss=0.0))
    cal = det.calibration
    assert cal.method == "miss" and cal.estimated_miss_rate() == 0.0
    assert cal.threshold < float(cal.synthetic_scores.min())


def test_operating_point_from_labelled_images_in_python_and_the_cli(root, tmp_path, capsys):
    from ccad import calibrate_labelled
    from ccad.cli import main

    det = fit_detector(root, variant="patchcore", image_size=SIZE, calibration_fraction=0.5, device="cpu")
    test = load_dataset(root, split="test")
    point = calibrate_labelled(det, test, "recall=1.0")
    scores = {r.image_path: det.predict(r.image_path).score for r in test}
    bad = [scores[s.image_path] for s in test if s.label == 1]
    good = [scores[s.image_path] for s in test if s.label == 0]
    assert point["recall"] == 1.0 and all(s > det.threshold for s in bad)
    # the highest such threshold: no labelled score lies between it and the weakest defect
    assert not any(det.threshold < s < min(bad) for s in good)
    assert det.calibration.method == "labelled" and det.card()["operating_point"]["source"]["policy"] == "recall=1.0"
    model = tmp_path / "model"
    det.save_pretrained(model)
    assert main(["calibrate", str(model), "--labelled", str(root), "--policy", "fpr=0.0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    back = AnomalyDetector.from_pretrained(model, device="cpu")
    assert out["false_alarm_rate"] == 0.0 and back.threshold == pytest.approx(out["threshold"])
    assert all(s <= back.threshold for s in good)
    src = back.card()["operating_point"]["source"]
    assert src["policy"] == "fpr=0.0" and src["data"] == str(root) and back.calibration.method == "labelled"
    assert main(["calibrate", str(model), "--labelled", str(root), "--policy", "recall=2"]) == 2
    assert "recall must be a number in (0, 1]" in capsys.readouterr().err
    assert main(["calibrate", str(model), "--good", str(root), "--labelled", str(root)]) == 2


def test_recalibrating_a_fused_model_splits_the_good_images_it_is_given(fused, root, tmp_path, capsys):
    from ccad.cli import main

    good = [s for s in load_dataset(root, split="train") if s.label == 0][:8]
    fused.calibrate(good)
    split = fused.info["calibration_split"]
    assert split["selection"] == 4 and split["threshold"] == 4 == fused.calibration.good_scores.size
    assert not set(split["selection_images"]) & set(split["threshold_images"])
    assert fused.fusion.stats["bank"].n_images == 4
    with pytest.raises(ValueError, match="1 held-out good image: too few to split"):
        fused.calibrate(good[:1])
    # the CLI: policy 'miss' from held-out good images, its estimate printed beside the false alarms
    model = tmp_path / "m"
    fused.save_pretrained(model)
    folder = tmp_path / "good"
    folder.mkdir()
    for s in good:
        (folder / Path(s.image_path).name).write_bytes(Path(s.image_path).read_bytes())
    assert main(["calibrate", str(model), "--good", str(folder), "--miss", "0.0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "miss" and out["estimated_miss_rate"] == 0.0 and out["n_synthetic"] == 4
    assert main(["calibrate", str(model), "--good", str(folder), "--miss", "0.1", "--sigma", "3"]) == 2


def test_app_evaluate_uses_the_chosen_operating_point(tmp_path):
    from app.controller import AppController
    from app.errors import UserError

    root = tmp_path / "data"
    write_dataset(root / "synth", kinds=("fibrous",), n_train=6, n_test_good=3, n_test_defect=2, size=64, seed=1,
                  defects=("spot",))
    c = AppController(data_root=root, state_dir=tmp_path / "s", samples_dir=None, demo_dir=None)
    with pytest.raises(UserError, match="run an evaluation first"):
        c.use_operating_point(None, None, "f1")
    name = c.build_bank("synth/fibrous", None, "tf_efficientnet_lite0", [2, 3], 30, 64)[0]
    report = c.run_evaluation(name, "synth/fibrous")["report"]
    msg = c.use_operating_point(name, report, "recall=1.0")
    det = c.registry.detector(name)
    bad = [r["score"] for r in report.records if r["label"] == 1]
    assert all(s > det.threshold for s in bad) and "catches 2 of 2 defects" in msg
    src = det.card()["operating_point"]["source"]
    assert det.calibration.method == "labelled" and src["policy"] == "recall=1.0"
    with pytest.raises(UserError, match="expected one of f1"):
        c.use_operating_point(name, report, "best")
