"""Files with unsupported extensions are reported as skipped, never silently ignored (issue 8):
the loaders list them, ``ccad bank/predict/evaluate`` print one line, info.json and scores.csv
record them. Masks, mask folders and hidden files are not inputs and are not reported."""
import csv
import json
from pathlib import Path

import pytest

from ccad.cli import main
from ccad.data.detect import load_dataset
from ccad.data.layouts import load_folder
from ccad.data.skips import collect_skipped, find_images, skipped_summary
from ccad.data.synthetic import write_dataset

LINE = "skipped 2 file(s) with unsupported extensions: a.gif, notes.txt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("data"), kinds=("fibrous",), n_train=6, n_test_good=2,
                         n_test_defect=1, size=64, seed=4, defects=("spot",))
    cat = root / "fibrous"
    good = cat / "train" / "good"
    (good / "a.gif").write_bytes(b"GIF89a")
    (good / "notes.txt").write_text("lot 7")
    (good / ".DS_Store").write_bytes(b"\0")  # hidden: not an input
    (good / "000_mask.npy").write_bytes(b"\0")  # a mask: not an input
    (cat / "test" / "good" / "notes.txt").write_text("x")
    gt = next(d for d in cat.iterdir() if d.name == "ground_truth")
    (next(gt.iterdir()) / "readme.txt").write_text("masks")  # in a mask folder: not an input
    return cat


def names(paths):
    return [Path(p).name for p in paths]


def test_loaders_list_the_files_they_skip(data):
    good = data / "train" / "good"
    s = load_folder(good)
    assert len(s) == 6 and names(s.skipped) == ["a.gif", "notes.txt"]
    assert all(Path(p).is_absolute() for p in s.skipped)
    train = load_dataset(data, split="train")
    assert names(train.skipped) == ["a.gif", "notes.txt"]
    test = load_dataset(data, split="test")
    assert [p.relative_to(data).as_posix() for p in test.skipped] == ["test/good/notes.txt"]
    every = load_dataset(data, split="all")
    assert len(every.skipped) == 3 and not any("ground_truth" in str(p) for p in every.skipped)
    with collect_skipped() as outer:  # a block collects across loaders, each file once
        load_folder(good)
        load_dataset(data, split="train")
    assert names(outer) == ["a.gif", "notes.txt"]
    assert skipped_summary(outer) == LINE and skipped_summary([]) == ""
    items, skipped = find_images([data / "train"])
    assert len(items) == 6 and names(skipped) == ["a.gif", "notes.txt"]


def test_bank_predict_evaluate_report_skipped_files(data, tmp_path, capsys):
    model = tmp_path / "model"
    good = data / "train" / "good"
    assert main(["bank", str(good), "--out", str(model), "--image-size", "64", "--size", "8", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert LINE in err.splitlines()
    info = json.loads((model / "info.json").read_text())
    by_name = {Path(s["path"]).name: s["reason"] for s in info["skipped"]}
    assert by_name == {"a.gif": "unsupported file type .gif", "notes.txt": "unsupported file type .txt"}
    assert info["n_train_images"] + 1 == 6  # one good image held out for calibration; none lost

    out = tmp_path / "pred"
    assert main(["predict", str(model), str(good), "--out", str(out), "--quiet"]) == 0
    assert LINE in capsys.readouterr().err.splitlines()
    rows = {Path(r["file"]).name: r for r in csv.DictReader(open(out / "scores.csv"))}
    assert rows["a.gif"]["verdict"] == "skipped: unsupported file type .gif"
    assert rows["notes.txt"]["verdict"] == "skipped: unsupported file type .txt"
    assert len(rows) == 8 and not any(n.startswith(".") or n.endswith(".npy") for n in rows)

    assert main(["evaluate", str(model), str(data), "--quiet"]) == 0
    assert "skipped 1 file(s) with unsupported extensions: notes.txt" in capsys.readouterr().err.splitlines()


def test_a_folder_of_only_unsupported_files_says_what_it_skipped(tmp_path, capsys):
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(Exception, match="no images found.*x.gif"):
        load_dataset(tmp_path, split="train", layout="folder")
    model = tmp_path / "m"
    assert main(["bank", str(tmp_path), "--out", str(model), "--quiet"]) == 2
    assert "x.gif" in capsys.readouterr().err


def test_calibrate_reports_what_it_left_out(data, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    good = data / "train" / "good"
    assert main(["bank", str(good), "--out", str(model), "--image-size", "64", "--size", "8", "--quiet"]) == 0
    held = tmp_path / "held_out"
    shutil.copytree(good, held)
    (held / "zz_corrupt.png").write_bytes(b"\x89PNG not really")
    capsys.readouterr()
    assert main(["calibrate", str(model), "--good", str(held)]) == 0
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert LINE in lines
    assert any(ln.startswith("skipped ") and "zz_corrupt.png" in ln for ln in lines)
    result = json.loads(cap.out.strip().splitlines()[-1])
    assert result["n_good"] == 6 and result["skipped"] == 3  # the six readable images; three left out, all said
    info = json.loads((model / "info.json").read_text())
    assert [Path(s["path"]).name for s in info["calibration_skipped"]] == ["zz_corrupt.png"]
