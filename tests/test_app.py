"""Callback tests for the Gradio app (no browser): path confinement, zips, the job manager, and the
controller's inspect / threshold / download / model-loading / bank / training / evaluation flows.

Most tests use a small fake detector (its map is the pixel deviation from mid-grey) so they run in
milliseconds; one test builds a real PatchCore detector with ``ccad.fit_detector`` on synthetic
textures to check the app against the real engine.
"""
from __future__ import annotations

import csv
import json
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.controller import AppController, Engine, UserError
from app.jobs import FAILED, FINISHED, STOPPED, JobBusy, JobManager
from app.paths import PathError, resolve_in_root, safe_extract_zip
from ccad.data.coerce import coerce_image
from ccad.data.io import ImageReadError
from ccad.pipeline import Prediction
from ccad.scoring.threshold import Calibration


# ------------------------------------------------------------------------------- fakes & helpers

class FakeBank:
    features = np.zeros((7, 4), np.float32)
    meta = {"backbone": "fake", "n_images": 3}

    def summary(self) -> dict[str, Any]:
        return {"xi": 7, "feature_dim": 4}

    def save(self, d: Any) -> None:
        Path(d, "bank.json").write_text(json.dumps(self.meta))


class FakeDetector:
    """Map = |grey - 0.5|; score = map max. Counts model runs to prove re-labelling is model-free."""

    variant = "patchcore"
    image_size = 32

    def __init__(self, threshold: float = 0.3, good: Any = (0.05, 0.1, 0.15, 0.2, 0.25, 0.28)) -> None:
        self.calibration = Calibration(good_scores=np.asarray(good, np.float32), threshold=threshold)
        self.bank = FakeBank()
        self.runs = 0

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    def predict(self, item: Any) -> Prediction:
        self.runs += 1
        img = coerce_image(item)
        amap = np.abs(img.mean(-1) - 0.5).astype(np.float32)
        return Prediction(image=img, reconstruction=None, anomaly_map=amap, score=float(amap.max()),
                          threshold=self.threshold, seconds=0.01,
                          path=str(item) if isinstance(item, (str, Path)) else None)

    def predict_many(self, items: Any, batch_size: int = 8, on_error: str = "skip", progress: Any = None):
        out, errors = [], []
        for it in items:
            try:
                out.append(self.predict(it))
            except (ImageReadError, ValueError) as exc:
                errors.append((str(it), str(exc)))
        return out, errors

    def card(self) -> dict[str, Any]:
        return {"variant": self.variant, "backbone": "fake", "layers": [2, 3], "bank_size": 7, "image_size": 32,
                "threshold": self.threshold, "n_train_images": 3, "metrics": None}

    def save_pretrained(self, d: Any) -> None:
        Path(d).mkdir(parents=True, exist_ok=True)
        Path(d, "config.json").write_text("{}")


def grey(path: Path, value: int, size: int = 24) -> Path:
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data"
    r.mkdir()
    return r


@pytest.fixture()
def ctl(root: Path, tmp_path: Path) -> AppController:
    c = AppController(data_root=root, state_dir=tmp_path / "state", engine=Engine(load=lambda *a, **k: FakeDetector()),
                      samples_dir=None, demo_dir=None)
    c.registry.add("fake", FakeDetector(), "test")
    return c


# ------------------------------------------------------------------------------- paths and zips

def test_resolve_in_root_refuses_dotdot_outside_and_symlinks(root: Path, tmp_path: Path) -> None:
    (root / "good").mkdir()
    assert resolve_in_root("good", root) == (root / "good").resolve()
    assert resolve_in_root(str(root / "good"), root) == (root / "good").resolve()
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(PathError, match=r"'\.\.'"):
        resolve_in_root("good/../../secret", root)
    with pytest.raises(PathError, match="outside the allowed data root"):
        resolve_in_root(str(outside), root)
    with pytest.raises(PathError, match="outside the allowed data root"):
        resolve_in_root("link", root)
    with pytest.raises(PathError, match="does not exist"):
        resolve_in_root("missing", root)
    with pytest.raises(PathError, match="no path given"):
        resolve_in_root("  ", root)


def test_safe_extract_zip_extracts_and_refuses_traversal(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("good/a.png", b"x")
        zf.writestr("good/b.png", b"y")
    out = safe_extract_zip(good, tmp_path / "x")
    assert out.name == "good" and sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", b"x")
    with pytest.raises(PathError, match="unsafe path"):
        safe_extract_zip(bad, tmp_path / "y")
    assert not (tmp_path / "evil.txt").exists()
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("l")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(PathError, match="symbolic link"):
        safe_extract_zip(link, tmp_path / "z")
    notzip = tmp_path / "n.zip"
    notzip.write_bytes(b"PK? not a zip")
    with pytest.raises(PathError, match="not a zip"):
        safe_extract_zip(notzip)


# ------------------------------------------------------------------------------- jobs

def test_job_manager_one_job_at_a_time_stop_and_failure() -> None:
    jm = JobManager()
    go = threading.Event()

    def target(h: Any) -> str:
        for step in range(1, 10_000):
            h.update(step=step, total_steps=10_000, loss=1.0 / step)
            if h.should_stop():
                return "partial"
            go.wait(0.001)
        return "done"

    jm.start("train", target)
    with pytest.raises(JobBusy, match="already running"):
        jm.start("train", target)
    deadline = time.monotonic() + 60  # poll (never sleep-then-assert): the job has recorded a loss
    while not (jm.snapshot() or {}).get("losses"):
        assert time.monotonic() < deadline, "the job recorded no loss"
        go.wait(0.005)
    assert jm.stop() is True
    jm.join(5)
    snap = jm.snapshot()
    assert snap["state"] == STOPPED and snap["has_result"] and snap["losses"]
    assert jm.stop() is False  # nothing running now

    def boom(h: Any) -> None:
        raise RuntimeError("disk full")

    jm.start("train", boom)
    jm.join(5)
    snap = jm.snapshot()
    assert snap["state"] == FAILED and "disk full" in snap["error"]
    jm.start("train", lambda h: 42)  # the manager survives a failed job
    jm.join(5)
    assert jm.snapshot()["state"] == FINISHED and jm.current().result == 42


# ------------------------------------------------------------------------------- inspect

def test_inspect_batch_table_panels_and_bad_file(ctl: AppController, tmp_path: Path) -> None:
    files = [grey(tmp_path / "mid.png", 128), grey(tmp_path / "dark.png", 10), grey(tmp_path / "light.png", 200)]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    batch = ctl.inspect("fake", [*map(str, files), str(corrupt)])
    assert len(batch.predictions) == 3
    assert len(batch.errors) == 1 and batch.errors[0][0] == "corrupt.png"
    rows = ctl.table_rows(batch, 0.3)
    assert [r[1] for r in rows] == ["dark.png", "light.png", "mid.png"]  # worst first
    assert [r[3] for r in rows] == ["anomalous", "good", "good"]
    v = ctl.panels(batch)
    assert v["name"] == "dark.png" and v["verdict"] == "ANOMALOUS"
    shapes = {v[k].shape for k in ("original", "reconstruction", "heatmap", "overlay")}
    (shape,) = shapes  # same size: aligned side by side, small images enlarged for a legible scale
    assert shape[1:] == (320, 3) and shape[0] > 320  # with the colour scale under the maps
    assert "n/a" in v["recon_label"]
    assert float(v["score"]) == pytest.approx(abs(10 / 255 - 0.5), abs=1e-3)
    with pytest.raises(UserError, match="no image given"):
        ctl.inspect("fake", [])
    with pytest.raises(UserError, match="no readable image"):
        ctl.inspect("fake", [str(corrupt)])
    with pytest.raises(UserError, match="no model is loaded"):
        ctl.inspect(None, [str(files[0])])


def test_threshold_relabels_without_running_the_model(ctl: AppController, tmp_path: Path) -> None:
    det = ctl.registry.detector("fake")
    batch = ctl.inspect("fake", [str(grey(tmp_path / "a.png", 60))])  # score ~0.265
    runs = det.runs
    assert ctl.panels(batch, threshold=0.3)["verdict"] == "GOOD"
    assert ctl.panels(batch, threshold=0.2)["verdict"] == "ANOMALOUS"
    assert ctl.table_rows(batch, 0.2)[0][3] == "anomalous"
    assert det.runs == runs  # no model call
    assert "2 of 6 calibration good images" in ctl.false_alarm_text("fake", 0.2)
    assert "0 of 6" in ctl.false_alarm_text("fake", 0.3)
    rng = ctl.threshold_range("fake", batch)
    assert rng["value"] == pytest.approx(0.3) and rng["minimum"] <= 0.05 and rng["maximum"] > 0.3
    fig = ctl.histogram("fake", batch, 0.2)
    assert len(fig.data) == 2  # good scores + batch scores
    assert any(s["x0"] == pytest.approx(0.2) for s in fig.layout.shapes)


def test_row_selection_and_downloads(ctl: AppController, tmp_path: Path) -> None:
    batch = ctl.inspect("fake", [str(grey(tmp_path / "a.png", 20)), str(grey(tmp_path / "b.png", 120))])
    row = next(r for r in ctl.table_rows(batch, 0.3) if r[1] == "b.png")
    ctl.select_row(batch, row)
    assert ctl.panels(batch)["name"] == "b.png"
    with pytest.raises(UserError):
        ctl.select_row(batch, [99, "x", 0, "good"])
    files = ctl.downloads(batch, 0.3)
    names = sorted(Path(f).name for f in files)
    assert names == ["b_heatmap.png", "b_mask.png", "b_overlay.png", "batch_scores.csv"]
    mask = np.asarray(Image.open(next(f for f in files if f.endswith("_mask.png"))))
    assert set(np.unique(mask)) <= {0, 255}
    with open(next(f for f in files if f.endswith(".csv"))) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == ["a.png", "b.png"] and rows[0]["verdict"] == "anomalous"


# ------------------------------------------------------------------------------- models

def test_model_loading_errors_are_messages(ctl: AppController, root: Path, tmp_path: Path) -> None:
    (root / "m").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        ctl.load_from_folder("m")
    with pytest.raises(UserError, match="outside the allowed data root"):
        ctl.load_from_folder(str(tmp_path))
    (root / "m" / "config.json").write_text("{}")
    name, msg = ctl.load_from_folder("m")
    assert name in ctl.registry.names() and "Loaded" in msg
    with pytest.raises(UserError, match="not a zip"):
        ctl.load_from_zip(str(grey(tmp_path / "x.png", 1)))
    ctl.hub_probe = lambda: False  # offline
    ctl.engine.load = lambda *a, **k: (_ for _ in ()).throw(OSError("cannot find the requested files in cache"))
    with pytest.raises(UserError, match="Hub is unreachable"):
        ctl.load_from_hub("someone/model", "main")
    with pytest.raises(UserError, match="not a valid Hub repo id"):
        ctl.load_from_hub("not a/valid/id", None)
    assert "fake" in ctl.model_card("fake") and "bank size" in ctl.model_card("fake")


def test_hub_offline_with_the_real_loader(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    c = AppController(data_root=root, state_dir=tmp_path / "s", samples_dir=None, demo_dir=None)
    with pytest.raises(UserError, match="Hub is unreachable"):
        c.load_from_hub("someone/ccad-model", None)


def test_startup_without_or_with_broken_demo(root: Path, tmp_path: Path) -> None:
    c = AppController(data_root=root, state_dir=tmp_path / "s", samples_dir=None, demo_dir=tmp_path / "nodemo")
    assert "Feature bank" in c.load_startup() and c.registry.names() == []
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    c = AppController(data_root=root, state_dir=tmp_path / "s", samples_dir=None, demo_dir=broken)
    assert "could not be loaded" in c.load_startup() and c.registry.names() == []


# ------------------------------------------------------------------------------- bank, train, evaluate

def test_build_bank_validates_folder_and_registers_detector(ctl: AppController, root: Path) -> None:
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        ctl.build_bank("empty", None, "tf_efficientnet_lite0", [2, 3], 50, 64)
    with pytest.raises(UserError, match=r"'\.\.'"):
        ctl.build_bank("../x", None, "tf_efficientnet_lite0", [2, 3], 50, 64)
    (root / "good").mkdir()
    grey(root / "good" / "a.png", 100)
    seen = {}

    def fit(path: str, **kw: Any) -> FakeDetector:
        seen.update(kw, path=path)
        return FakeDetector()

    ctl.engine.fit = fit
    name, summary, fig, msg = ctl.build_bank("good", None, "tf_efficientnet_lite0", [2, 3], 50, 64)
    assert seen["bank_size"] == 50 and seen["layers"] == (2, 3) and seen["path"].endswith("good")
    assert ctl.registry.active == name and summary == {"xi": 7, "feature_dim": 4} and "PatchCore" in msg
    assert "outside" in pytest.raises(UserError, ctl.save_model, name, "/elsewhere", "bank").value.args[0]
    assert "Saved" in ctl.save_model(name, "saved/bank", "bank") and (root / "saved/bank/bank.json").is_file()


def test_training_job_runs_in_background_one_at_a_time(ctl: AppController, root: Path) -> None:
    (root / "good").mkdir()
    grey(root / "good" / "a.png", 100)
    release = threading.Event()

    class State:
        def __init__(self, step: int) -> None:
            self.step, self.total_steps, self.epoch, self.loss, self.lr = step, 5, 0, 1.0 / step, 1e-3
            self.eta_seconds, self.preview = 1.0, np.zeros((8, 8, 3), np.float32)

    calls: list[dict[str, Any]] = []

    def train(data: str, out_dir: str, **kw: Any) -> FakeDetector:
        calls.append(dict(kw, out_dir=out_dir))
        for step in range(1, 6):
            if any(cb(State(step)) for cb in kw["callbacks"]):
                break
            release.wait(5)
        det = FakeDetector()
        det.info = {"skipped": [{"path": "/data/good/notes.txt", "reason": "unsupported file type .txt"}]}
        return det

    ctl.engine.train = train
    msg = ctl.start_training("good", None, None, "tiny", 64, 5, 2, options="diffusion.start_step=123")
    assert "Started" in msg and "CCAD(V)" in msg  # the method's title, from the registry
    with pytest.raises(UserError, match="already running"):
        ctl.start_training("good", None, None, "tiny", 64, 5, 2)
    deadline = time.time() + 60  # the first call imports ccad.training (accelerate)
    while ctl.training_status()["progress"].startswith("step 0") and time.time() < deadline:
        time.sleep(0.01)
    st = ctl.training_status()
    assert st["state"] == "running" and st["progress"].startswith("step 1/5") and st["preview"] is not None
    assert "Stop requested" in ctl.stop_training()
    release.set()
    ctl.jobs.join(5)
    st = ctl.training_status()
    assert st["state"] == "stopped" and st["can_resume"] and st["model_name"] in ctl.registry.names()
    assert st["model_name"].startswith("ccad-v train-")  # method + run folder, one name per run
    assert "Left out 1 file(s) of the data: notes.txt (unsupported file type .txt)." in st["status"]
    assert "resumed" in ctl.start_training(None, None, None, "", 0, 0, 0, resume=True)
    ctl.jobs.join(5)
    assert ctl.training_status()["state"] == "finished"
    # the typed config reaches train_detector; resume keeps the variant, the options and the run folder
    from ccad.methods import get_method

    first, again = calls
    for kw in calls:
        assert kw["variant"] == "ccad-v" and isinstance(kw["method"], get_method("ccad-v").Config)
        assert kw["method"].preset == "tiny" and kw["method"].diffusion.start_step == 123
        assert kw["image_size"] == 64 and kw["train"].steps == 5
    assert first["resume"] is False and again["resume"] is True and again["out_dir"] == first["out_dir"]
    assert again["method"] is not first["method"]  # a fresh copy: the first job's build does not leak in


def test_train_tab_lists_the_registry_and_reads_each_method(ctl: AppController) -> None:
    from app.forms import default_variant, method_choices, method_info, trainable_variants
    from ccad.methods import get_method, method_names

    expected = [n for n in method_names() if get_method(n).trainable]
    assert [n for n, _ in trainable_variants()] == expected and "patchcore" not in expected
    assert [v for _, v in method_choices()] == expected
    assert [t for t, _ in method_choices()] == [get_method(n).title for n in expected]
    assert default_variant() == "ccad-v"
    for name in expected:
        mcls = get_method(name)
        info = method_info(name)
        cfg = mcls.default_config()
        assert info["title"] == mcls.title and info["description"] == mcls.description
        assert info["image_size"] == mcls.default_image_size
        assert info["preset"] == getattr(cfg, "preset", None)
        assert info["has_autoencoder"] == hasattr(cfg, "autoencoder")
        if info["has_autoencoder"]:
            assert info["autoencoder"] == cfg.autoencoder
        settings = ctl.default_train_settings(name)
        assert settings["variant"] == name and settings["image_size"] <= mcls.default_image_size
    with pytest.raises(UserError, match="unknown variant"):
        method_info("no-such-method")


def test_bad_training_option_is_refused_naming_the_field(ctl: AppController, root: Path) -> None:
    (root / "good").mkdir()
    grey(root / "good" / "a.png", 100)
    started = []
    ctl.engine.train = lambda *a, **k: started.append(k)
    with pytest.raises(UserError, match=r"option 'bogus': unknown field 'bogus'.*known: preset"):
        ctl.start_training("good", None, None, "tiny", 64, 5, 2, variant="ccad-v", options="bogus=1")
    with pytest.raises(UserError, match=r"diffusion.start_step.*'abc'"):
        ctl.start_training("good", None, None, "tiny", 64, 5, 2, options="diffusion.start_step=abc")
    with pytest.raises(UserError, match="line 2.*KEY=VALUE"):
        ctl.start_training("good", None, None, "tiny", 64, 5, 2, options="# a comment\nno equals sign")
    with pytest.raises(UserError, match="preset"):
        ctl.start_training("good", None, None, "huge", 64, 5, 2)
    with pytest.raises(UserError, match="unknown variant 'nope'"):
        ctl.start_training("good", None, None, "tiny", 64, 5, 2, variant="nope")
    with pytest.raises(UserError, match="not trained"):
        ctl.start_training("good", None, None, "", 64, 5, 2, variant="patchcore")
    assert ctl.jobs.snapshot() is None and not started  # nothing started


def test_model_card_and_bank_sources_for_a_detector_without_bank(ctl: AppController, tmp_path: Path) -> None:
    """A DeCo-Diff-like detector (no bank, extra card keys) renders, inspects, is no bank source."""

    class NoBank(FakeDetector):
        variant = "deco-diff"

        def __init__(self) -> None:
            super().__init__()
            self.bank = None

        def card(self) -> dict[str, Any]:
            return {**super().card(), "bank_size": None, "feature_dim": None, "title": "DeCo-Diff: x",
                    "autoencoder": "taef2:random", "reconstruction": {"steps": 1, "mode": "correction"}}

    name = ctl.registry.add("nobank", NoBank(), "test")
    card = ctl.model_card(name)
    assert "taef2:random" in card and "correction" in card and "no feature bank" in card
    batch = ctl.inspect(name, [str(grey(tmp_path / "a.png", 30))])
    assert ctl.panels(batch)["verdict"].split(" (")[0] in ("GOOD", "ANOMALOUS", "OUT OF DOMAIN")
    assert ctl.registry.with_bank() == ["fake"]  # bank sources: models that hold a bank, by name of none
    with pytest.raises(UserError, match="no feature bank"):
        ctl.save_model(name, "x", "bank")


def test_evaluation_reports_metrics_and_worst_cases(ctl: AppController, root: Path) -> None:
    from ccad.evaluate import evaluate
    from ccad.data.sample import Sample

    (root / "ds").mkdir()
    samples = [Sample(str(grey(root / "ds" / f"g{i}.png", 120 + i)), None, 0, "tex") for i in range(3)]
    samples += [Sample(str(grey(root / "ds" / f"b{i}.png", 10 + 100 * i)), None, 1, "tex", "spot") for i in range(2)]

    ctl.engine.load_dataset = lambda path, split, layout: samples

    class Scored(FakeDetector):  # evaluate() needs score_batches
        def score_batches(self, batches: Any, progress: Any = None, total: Any = None):
            s, m = [], []
            for b in batches:
                amap = (b["image"].mean(1) - 0.5).abs()
                s.append(amap.flatten(1).max(1).values.numpy())
                m.append(amap.numpy())
            return np.concatenate(s), np.concatenate(m)

    ctl.registry.add("scored", Scored(), "test")
    ctl.engine.evaluate = lambda det, smp, progress=None: evaluate(det, smp)
    r = ctl.run_evaluation("scored", "ds")
    assert r["headers"][0] == "category" and r["rows"][0][0] == "tex"
    assert r["rows"][0][1] == pytest.approx(1.0)  # image AUROC: the dark defect and the mid one are separable
    assert len(r["fn"]) == 1  # b1 (value 110) is missed at threshold 0.3
    assert [t.name for t in r["roc"].data] == ["ROC", "chance", "threshold 0.3: recall 0.50, false alarms 0.00"]
    assert r["point"]["recall"] == 0.5 and "recall: " in str([t.name for t in r["sweep"].data])
    with pytest.raises(UserError, match="outside"):
        ctl.run_evaluation("scored", "/etc")


def test_real_engine_bank_build_inspect_and_evaluate(root: Path, tmp_path: Path) -> None:
    """The controller against the real engine: fit_detector -> inspect -> evaluate (synthetic, 64 px)."""
    from ccad.data.synthetic import write_dataset

    write_dataset(root / "synth", kinds=("fibrous",), n_train=6, n_test_good=2, n_test_defect=1, size=64, seed=1,
                  defects=("spot",))
    c = AppController(data_root=root, state_dir=tmp_path / "s", samples_dir=None, demo_dir=None)
    name, summary, fig, msg = c.build_bank("synth/fibrous", None, "tf_efficientnet_lite0", [2, 3], 30, 64)
    det = c.registry.detector(name)
    # the summary shown is the engine's own (xi = rows of the bank actually built, <= the requested 30)
    assert summary["xi"] == det.bank.features.shape[0] <= 30 and summary["backbone"] == "tf_efficientnet_lite0"
    assert {t.name for t in fig.data} == {"patch features (sample)", "bank (coreset)"}
    defect = next((root / "synth/fibrous/test/spot").glob("*.png"))
    batch = c.inspect(name, [str(defect)])
    v = c.panels(batch)
    assert v["original"].shape == v["heatmap"].shape == v["overlay"].shape  # aligned panels
    assert v["heatmap"].shape[1] == 320 and v["heatmap"].shape[0] > 320  # enlarged, the colour scale under it
    r = c.run_evaluation(name, "synth/fibrous")
    assert r["rows"] and 0.0 <= r["rows"][-1][1] <= 1.0
    assert "Saved" in c.save_model(name, "models/m", "detector")
    name2, _ = c.load_from_folder("models/m")
    assert c.registry.detector(name2).card()["bank_size"] == det.bank.features.shape[0]


# ------------------------------------------------------------------------------- real training per variant

def _train_inspect_real(root: Path, tmp_path: Path, variant: str, **kw: Any) -> tuple[AppController, str]:
    """Train ``variant`` for 2 steps at 32 px through the controller (the real engine), then inspect."""
    import torch

    from ccad.data.synthetic import write_dataset

    torch.set_num_threads(1)
    write_dataset(root / "synth", kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1, size=32, seed=2,
                  defects=("spot",))
    c = AppController(data_root=root, state_dir=tmp_path / "s", samples_dir=None, demo_dir=None)
    msg = c.start_training("synth/fibrous", None, None, "tiny", 32, 2, 2, preview_every=1, variant=variant, **kw)
    assert "Started" in msg
    c.jobs.join(900)
    st = c.training_status()
    assert st["state"] == "finished", (st["status"], c.jobs.snapshot().get("error"))
    name = st["model_name"]
    assert name.startswith(f"{variant} train-") and name in c.registry.names()
    det = c.registry.detector(name)
    assert det.variant == variant and det.info["train_steps"] == 2
    card = c.model_card(name)
    from ccad.methods import get_method

    assert variant in card and get_method(variant).title.split(":")[0] in card
    defect = next((root / "synth/fibrous/test/spot").glob("*.png"))
    batch = c.inspect(name, [str(defect)])
    v = c.panels(batch)
    assert v["original"].shape == v["heatmap"].shape == v["overlay"].shape == v["reconstruction"].shape
    assert v["verdict"] in ("GOOD", "ANOMALOUS") and np.isfinite(float(v["score"]))
    return c, name


def test_real_training_job_ccad_v_tiny(root: Path, tmp_path: Path) -> None:
    c, name = _train_inspect_real(root, tmp_path, "ccad-v", options="diffusion.steps=2\ndiffusion.start_step=20")
    det = c.registry.detector(name)
    assert det.method.config.diffusion.steps == 2 and det.method.config.preset == "tiny"
    assert c.panels(c.inspect(name, [str(next((root / "synth/fibrous/test/good").glob("*.png")))]))[
        "recon_label"] == "Reconstruction"  # a diffusion model reconstructs
    assert name in c.registry.with_bank()


def test_real_training_job_fused_with_the_bank(root: Path, tmp_path: Path) -> None:
    """The Train tab's "fuse with the bank" box: the trained detector fuses its map with a
    nearest-neighbour map normalised on held-out good images, and says so in its card."""
    c, name = _train_inspect_real(root, tmp_path, "ccad-v", options="diffusion.steps=2\ndiffusion.start_step=20",
                                  fuse_bank=True)
    det = c.registry.detector(name)
    assert det.config.scoring.fusion == "bank" and det.fusion is not None and det.fusion.fitted
    assert "fusion" in c.model_card(name)


@pytest.mark.parametrize("variant", ["ccad-c", "ccad-f", "deco-diff"])
def test_real_training_job_latent_method_random_autoencoder(root: Path, tmp_path: Path, variant: str) -> None:
    """Each latent method the registry has (skipped while it is not registered yet), preset tiny,
    a random-init TAEF2 autoencoder, 2 steps at 32 px: trains, registers, inspects; the card shows it."""
    from ccad.methods import get_method

    try:
        mcls = get_method(variant)
    except KeyError:
        pytest.skip(f"{variant} is not registered in ccad.methods yet")
    assert mcls.trainable and hasattr(mcls.default_config(), "autoencoder"), f"{variant} is not a latent method"
    c, name = _train_inspect_real(root, tmp_path, variant, autoencoder="taef2:random")
    det = c.registry.detector(name)
    assert det.method.config.autoencoder == "taef2:random" and det.method.config.preset == "tiny"
    card = c.model_card(name)
    assert "| autoencoder |" in card and "taef2:random" in card
    assert (name in c.registry.with_bank()) == (det.bank is not None)


# ------------------------------------------------------------------------------- the issue "every detector in the app"

def test_model_card_collapses_to_one_line(ctl: AppController) -> None:
    line = ctl.model_card_line("fake")
    assert "\n" not in line and line.startswith("**fake**")
    assert "patchcore" in line and "32 px" in line and "threshold 0.3" in line
    assert "| field | value |" in ctl.model_card("fake")  # the full table is still there (collapsed in the UI)
    assert "No model loaded" in ctl.model_card_line(None)


def test_batch_names_are_relative_to_what_was_chosen_or_uploaded(ctl: AppController, root: Path,
                                                                  tmp_path: Path) -> None:
    for sub in ("bottle/test/broken_large", "bottle/test/good", "cable/test/good"):
        (root / "mv" / sub).mkdir(parents=True)
        grey(root / "mv" / sub / "000.png", 40)
    batch = ctl.inspect_folder("fake", "mv")
    assert sorted(batch.names) == ["bottle/test/broken_large/000.png", "bottle/test/good/000.png",
                                   "cable/test/good/000.png"]
    assert sorted(r[1] for r in ctl.table_rows(batch, 0.3)) == sorted(batch.names)
    with open(next(f for f in ctl.downloads(batch, 0.3) if f.endswith(".csv"))) as fh:
        assert sorted(r["file"] for r in csv.DictReader(fh)) == sorted(batch.names)
    # a zip upload: paths inside the zip
    z = tmp_path / "upload.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for sub in ("a/good", "b/good"):
            zf.write(root / "mv/bottle/test/good/000.png", f"set/{sub}/000.png")
    assert sorted(ctl.inspect("fake", [str(z)]).names) == ["a/good/000.png", "b/good/000.png"]
    # plain uploads keep their file name; two with one name stay distinct rows
    (tmp_path / "u1").mkdir()
    (tmp_path / "u2").mkdir()
    files = [str(grey(tmp_path / "u1" / "000.png", 10)), str(grey(tmp_path / "u2" / "000.png", 200))]
    assert ctl.inspect("fake", files).names == ["000.png", "000.png (2)"]
    with pytest.raises(UserError, match="outside"):
        ctl.inspect_folder("fake", "/etc")
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        ctl.inspect_folder("fake", "empty")


def test_comparison_runs_the_second_model_on_the_whole_batch(ctl: AppController, tmp_path: Path) -> None:
    strict = FakeDetector(threshold=0.1)
    ctl.registry.add("strict", strict, "test", activate=False)
    files = [str(grey(tmp_path / f"{v}.png", v)) for v in (128, 60, 10)]  # scores ~0, ~0.26, ~0.46
    batch = ctl.inspect("fake", files)
    cmp = ctl.compare_batch("strict", batch)
    assert cmp is not None and len(cmp.predictions) == 3 and cmp.names == batch.names
    runs = strict.runs
    assert [r[1] for r in ctl.table_rows(cmp, None)] == ["10.png", "60.png", "128.png"]
    a = ctl.agreement("strict", batch, 0.3)
    assert (a["agree"], a["disagree"], a["both_anomalous"], a["both_good"]) == (2, 1, 1, 1)
    assert a["only_second"] == ["60.png"] and a["only_first"] == []
    assert "2 agree" in a["text"] and "1 disagree" in a["text"] and "`60.png`" in a["text"]
    assert ctl.agreement("strict", batch, 0.05)["disagree"] == 0  # the model in use re-labelled, no re-run
    batch.selected = 1
    v = ctl.compare("strict", batch)
    assert v["name"] == "60.png" and v["verdict"] == "ANOMALOUS"
    (shape,) = {v[k].shape for k in ("original", "reconstruction", "heatmap", "overlay")}  # aligned
    assert shape[1:] == (320, 3) and shape[0] > 320  # enlarged, with the colour scale under the maps
    assert strict.runs == runs  # row clicks and threshold moves reuse the comparison batch
    assert ctl.compare_batch("", batch) is None and ctl.agreement(None, batch)["text"] == ""


def test_app_has_the_original_reconstruction_slider_and_collapsed_card(ctl: AppController) -> None:
    from app.main import build_app

    cfg = build_app(ctl, load_default=False).get_config_file()
    by_id = {c["props"].get("elem_id"): c for c in cfg["components"]}
    assert by_id["panel-slider"]["type"] == "imageslider" and by_id["compare-slider"]["type"] == "imageslider"
    assert by_id["model-card-details"]["props"]["open"] is False
    assert "compare-table" not in by_id and "compare-agreement" in by_id and "inspect-folder" in by_id
    assert by_id["train-form"]["type"] == "dataframe" and "eval-curves" in by_id


def test_evaluation_of_a_multi_class_model_rows_per_category_and_curves(ctl: AppController, root: Path) -> None:
    from ccad.data.sample import Sample
    from ccad.evaluate import evaluate

    from app.control.evaluation import ALL_IMAGES, EVERY_CATEGORY

    (root / "ds").mkdir()
    samples = []
    for cat, base in (("carpet", 120), ("grid", 130)):
        samples += [Sample(str(grey(root / "ds" / f"{cat}g{i}.png", base + i)), None, 0, cat) for i in range(3)]
        samples += [Sample(str(grey(root / "ds" / f"{cat}b{i}.png", 10 + 60 * i)), None, 1, cat, "spot")
                    for i in range(2)]
    ctl.engine.load_dataset = lambda path, split, layout: samples

    class Scored(FakeDetector):
        def score_batches(self, batches: Any, progress: Any = None, total: Any = None):
            s, m = [], []
            for b in batches:
                amap = (b["image"].mean(1) - 0.5).abs()
                s.append(amap.flatten(1).max(1).values.numpy())
                m.append(amap.numpy())
            return np.concatenate(s), np.concatenate(m)

    ctl.registry.add("multi", Scored(), "test")
    ctl.engine.evaluate = lambda det, smp, progress=None: evaluate(det, smp)
    r = ctl.run_evaluation("multi", "ds")
    assert [row[0] for row in r["rows"]] == ["carpet", "grid", "mean"]
    assert r["rows"][2][1] == pytest.approx((r["rows"][0][1] + r["rows"][1][1]) / 2)
    assert r["curve_choices"] == [ALL_IMAGES, "carpet", "grid", EVERY_CATEGORY] and "2 categories" in r["message"]
    roc, pr, note = ctl.category_curves(r["report"], "grid")
    assert [t.name for t in roc.data] == ["grid", "chance"] and [t.name for t in pr.data] == ["grid"]
    roc, pr, note = ctl.category_curves(r["report"], EVERY_CATEGORY)
    assert [t.name for t in roc.data] == ["carpet", "grid", "chance"] and note == ""
    roc, _, _ = ctl.category_curves(r["report"], ALL_IMAGES)
    assert [t.name for t in roc.data][:2] == ["ROC", "chance"] and roc.data[2].name.startswith("the threshold")
    with pytest.raises(UserError, match="no category"):
        ctl.category_curves(r["report"], "wood")
    with pytest.raises(UserError, match="evaluation first"):
        ctl.category_curves(None, "grid")


def test_settings_form_is_generated_from_each_methods_config(ctl: AppController,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from app import forms
    from app.control import training
    from app.forms import FORM_SKIP, form_options, method_config, settings_form, trainable_variants
    from ccad.config import option_help
    from ccad.methods import get_method

    for name, _ in trainable_variants():
        mcls = get_method(name)
        rows = settings_form(name)
        assert rows and all(len(r) == 4 and r[2] == r[3] for r in rows)
        helped = {o.split("=", 1)[0] for o in option_help(mcls.Config)}
        assert {r[0] for r in rows} <= helped and not {r[0] for r in rows} & set(FORM_SKIP)
        top = {f.name for f in dataclasses.fields(mcls.Config)} - set(FORM_SKIP)
        assert {r[0].split(".")[0] for r in rows} <= top
        assert form_options(rows) == ""  # nothing changed: nothing passed on
        # edit an int row: it becomes a KEY=VALUE option the method's config accepts (the first row
        # whose value + 1 is valid: feat-diff's schedule ints are tied, T must be divisible by the stride)
        accepted = 0
        for row in (r for r in rows if r[1] == "int"):
            row[3] = str(int(row[2]) + 1)
            opts = form_options(rows)
            assert opts == f"{row[0]}={int(row[2]) + 1}"
            try:
                cfg = method_config(name, None, opts)
            except UserError as exc:
                assert "method." in str(exc)  # refused naming a field, never a traceback
                row[3] = row[2]
                continue
            obj = cfg
            for part in row[0].split("."):
                obj = getattr(obj, part)
            assert obj == int(row[2]) + 1
            accepted += 1
            break
        assert accepted or not any(r[1] == "int" for r in rows), name
    import pandas as pd

    rows = settings_form("ccad-v")
    rows[0][3] = "bogus"
    assert form_options(pd.DataFrame(rows, columns=forms.FORM_HEADERS)).startswith(f"{rows[0][0]}=bogus")
    # CPU defaults: the smallest preset and a small image; GPU: the method's own defaults
    monkeypatch.setattr(training, "cuda_available", lambda: False)
    for name, _ in trainable_variants():
        mcls, d = get_method(name), ctl.default_train_settings(name)
        assert d["device"] == "cpu" and d["image_size"] == min(mcls.default_image_size, training.CPU_MAX_IMAGE_SIZE)
        if getattr(mcls.default_config(), "preset", None) is not None:
            assert d["preset"] == "tiny"
        assert d["steps"] <= 500
    monkeypatch.setattr(training, "cuda_available", lambda: True)
    for name, _ in trainable_variants():
        mcls, d = get_method(name), ctl.default_train_settings(name)
        assert d["device"] == "cuda" and d["image_size"] == mcls.default_image_size
        assert d["preset"] == getattr(mcls.default_config(), "preset", None) and d["steps"] >= 1000


def test_files_that_are_not_images_are_said_to_be_left_out(ctl: AppController, root: Path, tmp_path: Path) -> None:
    """Inspecting a folder or a zip, building a bank and evaluating list the files they left out
    (unsupported extensions), never drop them silently; hidden files are not inputs."""
    from ccad.data.synthetic import write_dataset

    lot = root / "lot"
    (lot / "sub").mkdir(parents=True)
    grey(lot / "a.png", 40)
    grey(lot / "sub" / "b.png", 90)
    (lot / "sub" / "c.gif").write_bytes(b"GIF89a")
    (lot / "notes.txt").write_text("lot 7")
    (lot / ".DS_Store").write_bytes(b"\0")
    batch = ctl.inspect_folder("fake", "lot")
    assert sorted(batch.names) == ["a.png", "sub/b.png"]
    assert sorted(batch.errors) == [("notes.txt", "unsupported file type .txt"),
                                    ("sub/c.gif", "unsupported file type .gif")]
    z = tmp_path / "upload.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(lot / "a.png", "set/a.png")
        zf.writestr("set/readme.md", "x")
    batch = ctl.inspect("fake", [str(z)])
    # (the zip's one root folder is dropped from the names)
    assert batch.names == ["a.png"] and batch.errors == [("readme.md", "unsupported file type .md")]
    (root / "only").mkdir()
    (root / "only" / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(UserError, match=r"no images.*x\.gif \(unsupported file type \.gif\)"):
        ctl.inspect_folder("fake", "only")

    # the real engine: a bank from a folder with a stray file, then an evaluation
    write_dataset(root / "synth", kinds=("fibrous",), n_train=6, n_test_good=2, n_test_defect=1, size=64, seed=1,
                  defects=("spot",))
    (root / "synth/fibrous/train/good/notes.txt").write_text("lot 7")
    (root / "synth/fibrous/test/good/scan.gif").write_bytes(b"GIF89a")
    c = AppController(data_root=root, state_dir=tmp_path / "s", samples_dir=None, demo_dir=None)
    name, _, _, msg = c.build_bank("synth/fibrous/train/good", None, "tf_efficientnet_lite0", [2, 3], 30, 64)
    assert "Left out 1 file(s): notes.txt (unsupported file type .txt)." in msg
    r = c.run_evaluation(name, "synth/fibrous")
    assert "left out 1 file(s) with unsupported extensions: scan.gif" in r["message"]


def test_comparison_with_an_uncalibrated_model_never_counts_both_good(ctl: AppController, tmp_path: Path) -> None:
    # an uncalibrated model's verdict is neither good nor anomalous: before, its "not anomalous" was
    # counted as agreeing with the good images of the model in use ("3 agree, 2 both good")
    ctl.registry.add("raw", FakeDetector(threshold=float("nan")), "test", activate=False)
    files = [str(grey(tmp_path / f"{v}.png", v)) for v in (128, 60, 10)]
    batch = ctl.inspect("fake", files)
    a = ctl.agreement("raw", batch, 0.3)
    assert (a["agree"], a["both_good"], a["disagree"]) == (0, 0, 0)
    assert sorted(a["no_verdict"]) == ["10.png", "128.png", "60.png"]
    assert "3 without a verdict" in a["text"]
    _, rows = ctl.compare_table("raw", batch, 0.3)
    assert [r[6] for r in rows] == ["? no verdict"] * 3
