"""Every option is checked before any work (issue 20 item 7): a NaN setting, a zero image size or
batch size is refused at once, naming the option, and nothing is written."""
from __future__ import annotations

import re

import pytest

from ccad.cli import main
from ccad.data.synthetic import write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("opts")
    root = write_dataset(base / "data", kinds=("fibrous",), n_train=4, n_test_good=1, n_test_defect=1,
                         size=32, seed=2, defects=("spot",))
    return root / "fibrous"


@pytest.mark.parametrize("option, field", [("diffusion.guidance=nan", "diffusion.guidance"),
                                           ("diffusion.eta=inf", "diffusion.eta")])
def test_a_nan_option_is_refused_before_the_bank_or_training(data, tmp_path, capsys, option, field):
    """Was refused only after the bank was built and training ran, leaving a half run behind."""
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--variant", "ccad-v", "--preset", "tiny", "--image-size",
                 "32", "--steps", "1", "--size", "4", "--option", option, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert field in err and "finite" in err
    assert not run.exists()  # no bank, no checkpoint: the next run is not blocked


def test_a_nan_set_through_the_api_is_refused_before_any_work(data, tmp_path):
    from ccad.config import ConfigError
    from ccad.methods import get_method
    from ccad.pipeline import train_detector

    cfg = get_method("ccad-v").default_config("tiny")
    cfg.diffusion.guidance = float("nan")
    with pytest.raises(ConfigError, match=r"method\.diffusion\.guidance.*finite"):
        train_detector(data, tmp_path / "run", variant="ccad-v", method=cfg, image_size=32, steps=1, bank_size=4)
    assert not any((tmp_path / "run").glob("*"))


@pytest.mark.parametrize("argv", [["bank", "DATA", "--out", "OUT", "--image-size", "0"],
                                  ["train", "DATA", "--out", "OUT", "--image-size", "0"],
                                  ["bank", "DATA", "--out", "OUT", "--batch-size", "0"],
                                  ["train", "DATA", "--out", "OUT", "--batch-size", "0"],
                                  ["predict", "MODEL", "DATA", "--out", "OUT", "--batch-size", "0"],
                                  ["evaluate", "MODEL", "DATA", "--batch-size", "-1"]])
def test_a_zero_size_is_refused_not_taken_for_the_default(data, tmp_path, capsys, argv):
    """``--image-size 0`` used to mean the variant's default, ``predict --batch-size 0`` was accepted."""
    argv = [str(data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else str(tmp_path / "m")
            if a == "MODEL" else a for a in argv]
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert ("--image-size" in err or "--batch-size" in err) and "whole number >= 1" in err
    assert not (tmp_path / "out").exists()


def test_the_api_refuses_a_zero_image_size_and_batch_size(data, tmp_path):
    from ccad.config import ConfigError
    from ccad.pipeline import fit_detector, train_detector

    with pytest.raises(ConfigError, match="image_size must be in 16..2048, got 0"):
        train_detector(data, tmp_path / "run", variant="patchcore", image_size=0)
    det = fit_detector(data, image_size=32, bank_size=4, calibration_fraction=0.25)
    with pytest.raises(ValueError, match="batch_size must be a positive number of images, got 0"):
        det.predict_many([next(data.rglob("*.png"))], batch_size=0)


@pytest.mark.parametrize("command", ["bank", "train"])
def test_an_unknown_backbone_is_one_clear_line_not_a_traceback(data, tmp_path, capsys, monkeypatch, command):
    """``ccad bank --backbone nosuchnet`` ended in a traceback (WeightsNotFound escaped main())."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [command, str(data), "--out", str(tmp_path / "out"), "--backbone", "nosuchnet", "--image-size", "32",
            "--size", "4", "--quiet"] + (["--variant", "patchcore"] if command == "train" else [])
    assert main(argv) == 2
    # the phase lines ("[0:03] building the feature bank ...") aside, one error line
    err = "\n".join(ln for ln in capsys.readouterr().err.strip().splitlines() if not re.match(r"\[\d+:\d\d\] ", ln))
    assert err.startswith("error: ") and "nosuchnet" in err and "Traceback" not in err and len(err.splitlines()) == 1
