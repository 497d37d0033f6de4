"""Nothing lost (issue 20 item 7): every write of a model folder is checked first, written into a
temporary sibling and swapped in whole, so a refused, failed or killed save leaves the old folder
byte for byte (and loadable)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ccad.cli import main
from ccad.data.synthetic import write_dataset


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): the byte-for-byte picture of a model."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny PatchCore model saved by ``ccad bank`` and the category folder it was built from."""
    base = tmp_path_factory.mktemp("save")
    root = write_dataset(base / "data", kinds=("fibrous",), n_train=8, n_test_good=2, n_test_defect=1,
                         size=64, seed=3, defects=("spot",))
    cat = root / "fibrous"
    model = base / "model"
    assert main(["bank", str(cat), "--out", str(model), "--image-size", "64", "--size", "16", "--quiet"]) == 0
    return cat, model


@pytest.fixture
def model(built, tmp_path):
    cat, pristine = built
    m = tmp_path / "model"
    shutil.copytree(pristine, m)
    (m / "notes.txt").write_text("the user's own file")  # not part of the model: must survive every save
    return cat, m


def _assert_untouched(m: Path, before: dict[str, bytes]) -> None:
    from ccad.pipeline import AnomalyDetector

    assert _snapshot(m) == before
    assert AnomalyDetector.from_pretrained(m).threshold > 0  # still loads
    assert not [p.name for p in m.parent.iterdir() if p.name.startswith(f".{m.name}.")]  # no temporary left


def test_calibrate_refused_keeps_the_model(model, capsys):
    cat, m = model
    before = _snapshot(m)
    assert main(["calibrate", str(m), "--sigma", "nan", "--good", str(cat / "train" / "good")]) == 2
    assert "not saved" in capsys.readouterr().err
    _assert_untouched(m, before)
    assert main(["calibrate", str(m), "--threshold", "nan"]) == 2
    _assert_untouched(m, before)


class _Boom(RuntimeError):
    pass


COMMANDS = ["calibrate", "calibrate --threshold", "bank", "evaluate --record", "train", "pull"]


@pytest.mark.parametrize("where", ["mid-write", "before-swap"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_save_failing_midway_keeps_the_model(model, monkeypatch, command, where):
    """Each saving command fails part way: ``mid-write`` after the config, bank and weights were
    written (the model card, written last, fails; ``calibrate --threshold``: calibration.json is cut
    off half written), ``before-swap`` once every file is written (the flush to disk fails, as a kill
    there would stop it); ``pull``: the download breaks off. The folder the command was saving over
    is as it was, byte for byte, and loads."""
    import io
    import os

    import ccad.detector_folder

    cat, m = model

    def boom(*a, **k):
        raise _Boom("disk full")

    if where == "mid-write":
        monkeypatch.setattr(ccad.detector_folder, "model_card_text", boom)
        real_open, real_write_text = io.open, Path.write_text

        def half_open(path, mode="r", *a, **k):  # a calibration.json write stops after 8 bytes
            f = real_open(path, mode, *a, **k)
            if "w" in mode and "calibration" in Path(path).name:
                f.write(b'{"thresh' if "b" in mode else '{"thresh')
                f.close()
                raise _Boom("killed while writing")
            return f

        def half_write_text(self, text, *a, **k):
            if "calibration" in self.name:
                return half_open(self, "w")
            return real_write_text(self, text, *a, **k)

        monkeypatch.setattr("builtins.open", half_open)
        monkeypatch.setattr(Path, "write_text", half_write_text)
    else:
        monkeypatch.setattr(os, "fsync", boom)
    target = m
    if command == "calibrate":
        argv = ["calibrate", str(m), "--good", str(cat / "train" / "good")]
    elif command == "calibrate --threshold":
        argv = ["calibrate", str(m), "--threshold", "0.5"]
    elif command == "bank":
        argv = ["bank", str(cat), "--out", str(m), "--overwrite", "--image-size", "64", "--size", "8", "--quiet"]
    elif command == "evaluate --record":
        argv = ["evaluate", str(m), str(cat), "--record", "--quiet"]
    elif command == "train":  # the end of a run: RUN/model of an earlier run is replaced only whole
        run = m.parent / "run"
        run.mkdir()
        m.rename(run / "model")
        target = run / "model"
        argv = ["train", str(cat), "--out", str(run), "--variant", "patchcore", "--image-size", "64", "--size", "8",
                "--overwrite", "--quiet"]
    else:  # pull: the download breaks off after writing a file into the destination
        import huggingface_hub

        def half_download(*a, local_dir=None, **k):
            Path(local_dir, "config.json").write_text("{}")
            raise _Boom("connection reset")

        monkeypatch.setattr(huggingface_hub, "snapshot_download", half_download)
        argv = ["pull", "someone/model", "--out", str(m)]
    before = _snapshot(target)
    with pytest.raises(_Boom):
        main(argv)
    monkeypatch.undo()
    _assert_untouched(target, before)


def test_save_replaces_the_whole_model_and_keeps_other_files(model):
    """A successful save over a model: the new files only (no stale weight of the old model), the
    user's own files kept."""
    from ccad.pipeline import AnomalyDetector

    _, m = model
    shutil.copy(m / "bank.safetensors", m / "stale.safetensors")  # a weight file the new model does not write
    det = AnomalyDetector.from_pretrained(m)
    det.threshold = 123.0
    det.save_pretrained(m)
    assert not (m / "stale.safetensors").exists() and (m / "notes.txt").read_text() == "the user's own file"
    assert AnomalyDetector.from_pretrained(m).threshold == 123.0
    assert json.loads((m / "calibration.json").read_text())["threshold"] == 123.0
    assert not [p.name for p in m.parent.iterdir() if p.name.startswith(".model.")]


def test_the_apps_save_failing_midway_keeps_the_model(model, tmp_path, monkeypatch):
    """The app's "save detector" over an existing model folder in the data root goes through the same
    writer: a save that fails part way is a message, and the folder is as it was."""
    import ccad.detector_folder
    from app.controller import AppController, UserError
    from ccad.pipeline import AnomalyDetector

    _, m = model
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    dest = root / "models" / "m"
    shutil.copytree(m, dest)
    c = AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    c.registry.add("mine", AnomalyDetector.from_pretrained(m), "test")
    before = _snapshot(dest)

    def boom(*a, **k):
        raise _Boom("disk full")

    monkeypatch.setattr(ccad.detector_folder, "model_card_text", boom)
    with pytest.raises(UserError, match="disk full"):
        c.save_model("mine", "models/m", "detector")
    monkeypatch.undo()
    _assert_untouched(dest, before)


def test_replace_folder_cases(tmp_path, monkeypatch):
    """The writer alone: a new folder; a model folder swapped whole (stale weights gone, the user's
    files kept); a model folder that is the working directory (updated in place, the shell's folder
    survives); a folder that is no model (its files kept); a failure (nothing changed)."""
    from ccad.atomic import replace_folder

    def write(d: Path, **files: str) -> None:
        for name, text in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)

    new = tmp_path / "new"
    with replace_folder(new) as tmp:
        write(tmp, **{"config.json": "1", "unet/w.safetensors": "a"})
    assert _snapshot(new) == {"config.json": b"1", "unet/w.safetensors": b"a"}

    for cwd_inside in (False, True):
        m = tmp_path / f"model{int(cwd_inside)}"
        m.mkdir()
        write(m, **{"config.json": "old", "vae/w.safetensors": "old", "notes.txt": "mine",
                    "checkpoint-5/model.safetensors": "ck"})
        if cwd_inside:
            monkeypatch.chdir(m)
        with replace_folder(m) as tmp:
            write(tmp, **{"config.json": "new", "unet/w.safetensors": "new"})
        assert _snapshot(m) == {"config.json": b"new", "unet/w.safetensors": b"new", "notes.txt": b"mine",
                                "checkpoint-5/model.safetensors": b"ck"}
        assert Path.cwd().exists()
        monkeypatch.chdir(tmp_path)

    other = tmp_path / "other"
    other.mkdir()
    write(other, **{"data.png": "x"})
    with replace_folder(other) as tmp:
        write(tmp, **{"config.json": "1"})
    assert _snapshot(other) == {"config.json": b"1", "data.png": b"x"}

    before = _snapshot(new)
    with pytest.raises(_Boom):
        with replace_folder(new) as tmp:
            write(tmp, **{"config.json": "2"})
            raise _Boom("refused")
    assert _snapshot(new) == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
