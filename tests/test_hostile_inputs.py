"""Nothing lost, nothing reached (issue 20 item 7): ``ccad predict`` and the app's folder reading
against inputs a hostile or careless user hands over: file names that are not UTF-8, two runs into
one output folder, links that lead nowhere or to devices, FIFOs, and unreadable files."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ccad.cli import main
from ccad.data.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny PatchCore model (``ccad bank``) and a few good test images."""
    base = tmp_path_factory.mktemp("hostile")
    root = write_dataset(base / "data", kinds=("fibrous",), n_train=6, n_test_good=3, n_test_defect=1,
                         size=64, seed=4, defects=("spot",))
    model = base / "model"
    assert main(["bank", str(root / "fibrous"), "--out", str(model), "--image-size", "64", "--size", "8",
                 "--quiet"]) == 0
    return model, sorted((root / "fibrous" / "test" / "good").glob("*.png"))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ccad.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _rows(out: Path) -> list[dict]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_scores_a_file_whose_name_is_not_utf8(built, tmp_path):
    """Was a segfault (exit 139, cv2.imwrite of a surrogate-escaped name) and no scores.csv."""
    model, goods = built
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(goods[0], os.fsencode(inp) + b"/bad\xffname.png")
    shutil.copy(goods[1], inp / "ok.png")
    out = tmp_path / "out"
    r = _cli("predict", str(model), str(inp), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    rows = {row["file"]: row for row in _rows(out)}
    assert set(rows) == {f"{inp}/bad\\xffname.png", f"{inp}/ok.png"}
    bad = rows[f"{inp}/bad\\xffname.png"]
    assert bad["verdict"] in ("good", "anomalous") and not bad["error"]
    for kind in ("heatmap", "overlay", "mask"):
        assert (out / bad[kind]).is_file() and bad[kind].startswith("bad%FFname_")


def test_the_app_names_a_file_whose_name_is_not_utf8(built, tmp_path):
    """The app's folder reading: the batch's names and errors are UTF-8 text (was a UnicodeEncodeError
    naming no file when the page was sent)."""
    import json

    from app.controller import AppController
    from ccad.pipeline import AnomalyDetector

    model, goods = built
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    shutil.copy(goods[0], os.fsencode(root) + b"/in/bad\xffname.png")
    (Path(os.fsdecode(os.fsencode(root) + b"/in/broken\xfe.png"))).write_bytes(b"not a png")
    shutil.copy(goods[1], root / "in" / "ok.png")
    c = AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    c.registry.add("m", AnomalyDetector.from_pretrained(model), "test")
    batch = c.inspect_folder("m", "in")
    assert sorted(batch.names) == ["bad\\xffname.png", "ok.png"]
    assert [name for name, _ in batch.errors] == ["broken\\xfe.png"]
    json.dumps([batch.names, batch.errors, c.table_rows(batch, None)], ensure_ascii=False).encode("utf-8")


def test_a_second_predict_into_the_same_out_is_refused_naming_the_first(built, tmp_path, capsys):
    """Two runs into one ``--out`` (both used to say "wrote scores.csv"; one run's rows were lost):
    the second is refused while the first holds the folder, naming it; nothing of the first is touched."""
    from ccad.atomic import folder_lock

    model, goods = built
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("the first run's rows\n")
    with folder_lock(out, "ccad predict", name=".ccad-predict.lock"):  # the first run, still writing
        assert main(["predict", str(model), str(goods[0]), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "ccad predict" in err and "another run" in err
        assert (out / "scores.csv").read_text() == "the first run's rows\n"
        assert sorted(p.name for p in out.iterdir()) == [".ccad-predict.lock", "scores.csv"]
    assert main(["predict", str(model), str(goods[0]), "--out", str(out), "--quiet"]) == 0  # the first is done
    assert len(_rows(out)) == 1 and not (out / ".ccad-predict.lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(built, tmp_path):
    model, goods = built
    out = tmp_path / "out"
    out.mkdir()
    code = ("import os, sys; from ccad.atomic import folder_lock; "
            "held = folder_lock(sys.argv[1], 'ccad predict', name='.ccad-predict.lock'); held.__enter__(); os._exit(9)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", code, str(out)], env=env).returncode == 9  # died holding it
    assert (out / ".ccad-predict.lock").is_file()
    assert main(["predict", str(model), str(goods[0]), "--out", str(out), "--quiet"]) == 0
    assert len(_rows(out)) == 1 and not (out / ".ccad-predict.lock").exists()


def test_every_entry_the_walk_sees_gets_a_row_and_nothing_blocks(built, tmp_path, capsys):
    """A dangling symlink, a FIFO named ``.png``, a link to /dev/zero, a FIFO without an extension
    (these had no row and no message): each gets a row saying why, none is opened (a FIFO would
    block the read, /dev/zero never end it); a FIFO given by name is refused the same way."""
    model, goods = built
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(goods[0], inp / "ok.png")
    (inp / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(inp / "fifo.png")
    (inp / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(inp / "pipe")
    out = tmp_path / "out"
    assert main(["predict", str(model), str(inp), str(inp / "fifo.png"), "--out", str(out), "--quiet"]) == 0
    rows = _rows(out)
    by_name = {}
    for row in rows:
        by_name.setdefault(Path(row["file"]).name, []).append(row)
    assert sorted(by_name) == ["dangling.png", "fifo.png", "ok.png", "pipe", "zero.png"]
    assert len(by_name["fifo.png"]) == 2 and len(rows) == 6
    assert by_name["ok.png"][0]["verdict"] in ("good", "anomalous")
    why = {"dangling.png": "broken symbolic link", "fifo.png": "FIFO", "zero.png": "character device"}
    err = capsys.readouterr().err
    for name, reason in why.items():
        for row in by_name[name]:  # no verdict; the reason in the error column (was "error: ..." as the verdict)
            assert row["verdict"] == "error" and reason in row["error"] and name in row["error"]
            assert row["score"] == "" and not row["heatmap"]
        assert f"skipped {inp / name}" in err
    assert by_name["pipe"][0]["verdict"].startswith("skipped") and "pipe" in err


def test_an_unreadable_files_row_has_its_reason_in_the_error_column(built, tmp_path):
    model, goods = built
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(goods[0], inp / "ok.png")
    (inp / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    assert main(["predict", str(model), str(inp), "--out", str(out), "--quiet"]) == 0
    row = next(r for r in _rows(out) if r["file"].endswith("broken.png"))
    assert row["verdict"] == "error" and "broken.png" in row["error"] and row["score"] == ""
