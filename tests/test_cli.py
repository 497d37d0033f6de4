"""The command line: every subcommand's help, and bank -> predict -> calibrate -> evaluate."""
import csv
import json

import pytest

from ccad.cli import build_parser, main
from ccad.data.synthetic import write_dataset


@pytest.mark.parametrize("cmd", ["bank", "train", "evaluate", "predict", "calibrate", "push", "pull", "app", "serve"])
def test_every_command_explains_its_options(cmd, capsys):
    with pytest.raises(SystemExit) as ex:
        build_parser().parse_args([cmd, "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ccad " + cmd in out
    for action in build_parser()._subparsers._group_actions[0].choices[cmd]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{cmd} {action.option_strings} has no help text"


def test_bank_predict_calibrate_evaluate(tmp_path, capsys):
    root = write_dataset(tmp_path / "data", kinds=("fibrous",), n_train=10, n_test_good=3, n_test_defect=2,
                         size=80, seed=5, defects=("spot",))
    cat = root / "fibrous"
    model = tmp_path / "model"
    assert main(["bank", str(cat), "--out", str(model), "--image-size", "64", "--size", "20", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["model"] == str(model) and info["threshold"] > 0

    out = tmp_path / "pred"
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert main(["predict", str(model), str(cat / "test"), str(tmp_path / "junk.png"), "--out", str(out),
                 "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 6 and sum(r["verdict"].startswith("error") for r in rows) == 1
    for r in rows:  # each scored row names its own output files (issue 13 item 8)
        if not r["verdict"].startswith("error"):
            assert (out / r["heatmap"]).is_file() and (out / r["mask"]).is_file() and (out / r["overlay"]).is_file()

    assert main(["calibrate", str(model), "--threshold", "1e9"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["threshold"] == 1e9

    report = tmp_path / "report.json"
    assert main(["evaluate", str(model), str(cat), "--json", str(report), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "image_auroc" in text and "pixel_aupro" in text
    data = json.loads(report.read_text())
    assert 0.0 <= data["per_category"]["mean"]["image_auroc"] <= 1.0
    assert len(data["records"]) == 5


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "x.png", "--out", str(tmp_path / "o")]) == 2
    assert "not a ccad model folder" in capsys.readouterr().err


def test_bank_reports_unreadable_images_and_still_builds(tmp_path, capsys):
    root = write_dataset(tmp_path / "data", kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1,
                         size=64, seed=1, defects=("spot",))
    good = root / "fibrous" / "train" / "good"
    (good / "zz_corrupt.png").write_bytes(b"\x89PNG broken")
    assert main(["bank", str(good), "--out", str(tmp_path / "m"), "--image-size", "64", "--size", "8",
                 "--calibration-fraction", "0", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "zz_corrupt.png" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["n_images"] == 6
