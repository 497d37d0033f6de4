"""App callbacks for issue 13 ("Trust"): stale verdicts after a model switch, zip uploads cleaned
up within a disk budget, the state folder outside the checkout, out-of-domain notes, and the
Compare / Evaluate views. No browser (see tests/test_browser_trust.py for the Chromium side)."""
from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from PIL import Image

from app.controller import AppController, Engine, UserError
from ccad.pipeline import Prediction
from test_app import FakeDetector, grey


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


def _png_bytes(value: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------- item 7: zips

def test_inspecting_a_zip_leaves_no_extracted_files(ctl: AppController, tmp_path: Path) -> None:
    zp = tmp_path / "batch.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        zf.writestr("imgs/a.png", _png_bytes(250))
        zf.writestr("imgs/sub/b.png", _png_bytes(128))
        zf.writestr("imgs/notes.txt", b"not an image")
    batch = ctl.inspect("fake", [str(zp)])
    assert sorted(batch.names) == ["a.png", "sub/b.png"]
    assert _files_under(ctl.state_dir) == []  # nothing extracted is left on the server's disk
    # the batch still works without the files: a second model and the panels use the decoded pixels
    ctl.registry.add("other", FakeDetector(threshold=0.1), "test")
    cmp = ctl.compare_batch("other", batch)
    assert cmp is not None and len(cmp.predictions) == 2
    assert ctl.panels(batch)["original"] is not None


def test_a_zip_over_the_disk_budget_is_refused_before_extracting(ctl: AppController, tmp_path: Path) -> None:
    zp = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", _png_bytes(200))
        zf.writestr("zeros.bin", b"\0" * (3 * 1024**2))  # compresses to a few KB
    assert zp.stat().st_size < 100_000
    ctl.zip_budget = 2 * 1024**2
    with pytest.raises(UserError, match=r"bomb\.zip: 3\.0 MB uncompressed, more than the upload budget of 2\.0 MB"):
        ctl.inspect("fake", [str(zp)])
    assert _files_under(ctl.state_dir) == []
    with pytest.raises(UserError, match="upload budget"):
        ctl.build_bank(None, str(zp), "tf_efficientnet_lite0", [2, 3], 10, 64)
    with pytest.raises(UserError, match="upload budget"):
        ctl.load_from_zip(str(zp))
    assert _files_under(ctl.state_dir) == []


def test_a_member_larger_than_its_header_stops_extraction(tmp_path: Path) -> None:
    from app.paths import PathError, safe_extract_zip

    zp = tmp_path / "liar.zip"
    with zipfile.ZipFile(zp, "w") as zf:  # stored: the header's file_size can be patched in place
        zf.writestr("x.bin", b"a" * 4000)
    raw = bytearray(zp.read_bytes())
    # patch both the local header and the central directory's uncompressed size to 10 bytes
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = raw.index(sig)
        raw[i + off:i + off + 4] = (10).to_bytes(4, "little")
    zp.write_bytes(bytes(raw))
    with pytest.raises((PathError, zipfile.BadZipFile)):
        safe_extract_zip(zp, tmp_path / "out")
    out = _files_under(tmp_path / "out")
    assert sum(p.stat().st_size for p in out) <= 10


def test_bank_and_model_zips_are_removed_after_use(root: Path, tmp_path: Path) -> None:
    """A bank built from a zip and a model loaded from a zip leave no extracted files behind."""
    from ccad.data.synthetic import write_dataset

    ds = write_dataset(tmp_path / "synth", kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1, size=32,
                       seed=0, defects=("spot",))
    zp = tmp_path / "good.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for p in sorted((ds / "fibrous" / "train" / "good").glob("*.png")):
            zf.write(p, f"good/{p.name}")
    c = AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    name, _, _, msg = c.build_bank(None, str(zp), "tf_efficientnet_lite0", [2, 3], 10, 32)
    assert "Built" in msg
    assert _files_under(c.uploads_dir) == []
    saved = root / "saved"
    c.save_model(name, "saved", "detector")
    mz = tmp_path / "model.zip"
    with zipfile.ZipFile(mz, "w") as zf:
        for p in saved.rglob("*"):
            if p.is_file():
                zf.write(p, f"model/{p.relative_to(saved).as_posix()}")
    loaded, _ = c.load_from_zip(str(mz))
    assert _files_under(c.uploads_dir) == []
    img = sorted((ds / "fibrous" / "test").rglob("*.png"))[0]
    a = c.registry.detector(name).predict(str(img))
    b = c.registry.detector(loaded).predict(str(img))
    assert np.isclose(a.score, b.score, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- item 10: state dir

@pytest.fixture()
def captured_launch(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``ccad app`` runs up to ``demo.launch`` (not served); no model is loaded (fast)."""
    import gradio as gr

    built: list[Any] = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: built.append(self))
    monkeypatch.setattr(AppController, "load_startup", lambda self, model=None: "")
    return built


def _checkout_runs_app() -> list[Path]:
    from app.state import REPO_ROOT

    return _files_under(REPO_ROOT / "runs" / "app")


def test_ccad_app_state_dir_option_env_and_user_default(captured_launch: list[Any], root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from ccad.cli import main

    before = _checkout_runs_app()
    monkeypatch.delenv("CCAD_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["app", "--data-root", str(root), "--state-dir", str(tmp_path / "mine")]) == 0
    assert captured_launch[-1].ccad_controller.state_dir == tmp_path / "mine"
    monkeypatch.setenv("CCAD_STATE_DIR", str(tmp_path / "from-env"))
    assert main(["app", "--data-root", str(root)]) == 0
    assert captured_launch[-1].ccad_controller.state_dir == tmp_path / "from-env"
    monkeypatch.delenv("CCAD_STATE_DIR")
    assert main(["app", "--data-root", str(root)]) == 0
    state = captured_launch[-1].ccad_controller.state_dir
    assert state.is_dir() and ((tmp_path / "xdg") in state.parents or (tmp_path / "home") in state.parents)
    assert _checkout_runs_app() == before  # nothing written into the checkout



# ------------------------------------------------------------------------------- item 1: model switch

class ScaledDetector(FakeDetector):
    """Another model: scores ten times the fake's, threshold 2.0 (so its threshold applied to the
    fake's scores calls every defect good)."""

    def __init__(self) -> None:
        super().__init__(threshold=2.0, good=(0.5, 1.0, 1.5, 1.8))

    def predict(self, item: Any) -> Any:
        p = super().predict(item)
        return type(p)(image=p.image, reconstruction=None, anomaly_map=p.anomaly_map * 10, score=p.score * 10,
                       threshold=self.threshold, seconds=p.seconds, path=p.path)


def test_switching_model_rescores_the_batch_never_relabels_old_scores(ctl: AppController, tmp_path: Path) -> None:
    other = ScaledDetector()
    ctl.registry.add("scaled", other, "test", activate=False)
    files = [str(grey(tmp_path / "defect.png", 10)), str(grey(tmp_path / "ok.png", 128))]
    batch = ctl.inspect("fake", files)
    assert [p.verdict for p in batch.predictions] == ["anomalous", "good"]
    # the old scores at the new model's threshold would call the defect good (the bug)
    assert batch.at(other.threshold)[0].verdict == "good"
    assert ctl.batch_for("scaled", batch) is None  # so the app never does that
    new, msg = ctl.switch_model("scaled", batch)
    assert new is not None and new.model == "scaled" and other.runs == 2
    assert [p.verdict for p in new.at(other.threshold)] == ["anomalous", "good"]
    assert new.names == batch.names
    assert "Re-scored the 2 image(s)" in msg and "scaled" in msg and "fake" in msg
    assert ctl.panels(new)["model"] == "scaled" and ctl.panels(batch)["model"] == "fake"
    assert ctl.batch_label(new).startswith("Batch scored by scaled")
    # the histogram of a model never shows another model's scores, and names its model
    fig = ctl.histogram("scaled", batch, other.threshold)
    assert [t.name for t in fig.data] == ["calibration good images of scaled (4)"]
    fig = ctl.histogram("scaled", new, other.threshold)
    assert [t.name for t in fig.data] == ["calibration good images of scaled (4)", "this batch, scored by scaled (2)"]
    assert "scaled" in fig.layout.title.text
    # same model: kept as is, no re-run; a failing model clears the batch with a message
    assert ctl.switch_model("scaled", new) == (new, "")
    assert other.runs == 2

    class Broken(FakeDetector):
        def predict(self, item: Any) -> Any:
            raise RuntimeError("boom")

    ctl.registry.add("broken", Broken(), "test", activate=False)
    cleared, msg = ctl.switch_model("broken", new)
    assert cleared is None and "cleared" in msg and "boom" in msg


def test_a_zip_batch_is_rescored_from_its_pixels(ctl: AppController, tmp_path: Path) -> None:
    zp = tmp_path / "b.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        zf.writestr("d.png", _png_bytes(10))
    batch = ctl.inspect("fake", [str(zp)])
    ctl.registry.add("scaled", ScaledDetector(), "test", activate=False)
    new, _ = ctl.switch_model("scaled", batch)
    assert new is not None and new.names == ["d.png"]
    assert np.isclose(new.predictions[0].score, 10 * batch.predictions[0].score, rtol=1e-5)


# ------------------------------------------------------------------------------- item 5: out of domain

@dataclasses.dataclass
class DomainPrediction(Prediction):
    """A prediction with the engine's domain fields (``ccad.pipeline.Prediction`` has them once the
    engine's out-of-domain change is in; declared here so this test runs before and after)."""

    domain_distance: Optional[float] = None
    domain_limit: Optional[float] = None

    @property
    def out_of_domain(self) -> Optional[bool]:  # type: ignore[override]
        if self.domain_distance is None or self.domain_limit is None:
            return None
        return bool(self.domain_distance > self.domain_limit)


class DomainDetector(FakeDetector):
    """The fake, plus a domain distance: images darker than 40/255 are 'unlike the training set'."""

    def predict(self, item: Any) -> Any:
        p = super().predict(item)
        dist = 5.0 if float(p.image.mean()) < 40 / 255 else 0.5
        fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(Prediction)}
        fields.update(domain_distance=dist, domain_limit=1.0)
        return DomainPrediction(**fields)


def test_out_of_domain_images_are_flagged_per_image(ctl: AppController, tmp_path: Path) -> None:
    ctl.registry.add("domain", DomainDetector(), "test")
    batch = ctl.inspect("domain", [str(grey(tmp_path / "far.png", 10)), str(grey(tmp_path / "near.png", 128))])
    assert ctl.out_of_domain_names(batch) == ["far.png"]
    rows = {r[1]: r for r in ctl.table_rows(batch, 0.3)}
    assert rows["far.png"][5].startswith("OUT OF DOMAIN") and "5" in rows["far.png"][5]
    assert rows["near.png"][5].startswith("in domain")
    far = batch.names.index("far.png")
    v = ctl.panels(batch, far)
    assert "unlike the model's training images" in v["domain"] and "good images up to 1" in v["domain"]
    assert ctl.table_rows(batch, 0.01)[0][5].startswith("OUT OF DOMAIN")  # kept when re-labelled
    # a model that does not report it says so, and nothing is flagged
    plain = ctl.inspect("fake", [str(tmp_path / "far.png")])
    assert ctl.out_of_domain_names(plain) == [] and ctl.table_rows(plain, 0.3)[0][5] == ""
    assert ctl.panels(plain)["domain"] == "not reported by this model"


def test_the_page_says_what_the_bundled_demo_was_trained_on(root: Path, tmp_path: Path) -> None:
    from app.state import DEMO_MODEL_DIR

    info = json.loads((DEMO_MODEL_DIR / "info.json").read_text())
    c = AppController(data_root=root, state_dir=tmp_path / "s", samples_dir=None)
    c.load_startup()
    text = c.training_data_text(c.registry.active)
    assert f"trained on {info['n_train_images']} synthetic '{info['demo']['kind']}' texture images only" in text
    assert f"{info['demo']['size']} px" in text and "out of its domain" in text
    c.registry.add("fake", FakeDetector(), "bank built from /x/good")
    assert "trained on 3 good image(s)" in c.training_data_text("fake")


# ------------------------------------------------------------------------------- item 13: compare, evaluate

def test_comparison_is_one_table_with_both_scores_verdicts_and_agreement(ctl: AppController, tmp_path: Path) -> None:
    ctl.registry.add("scaled", ScaledDetector(), "test", activate=False)
    files = [str(grey(tmp_path / n, v)) for n, v in (("c.png", 70), ("a.png", 128), ("b.png", 10))]
    batch = ctl.inspect("fake", files)  # scores: c ~0.225, a ~0.002, b ~0.46
    head, rows = ctl.compare_table("scaled", batch, 0.3)
    assert head[:7] == ["#", "file", "score · fake", "verdict · fake", "score · scaled", "verdict · scaled",
                        "verdicts agree"]
    # the disagreement first, then worst first by the model in use
    assert [r[1] for r in rows] == ["c.png", "b.png", "a.png"]
    assert [batch.names[r[0]] for r in rows] == [r[1] for r in rows]  # '#' is the batch index (row clicks)
    assert [(r[3], r[5]) for r in rows] == [("good", "anomalous"), ("anomalous", "anomalous"), ("good", "good")]
    assert [r[6] for r in rows] == ["✗ DIFFERS", "✓ same", "✓ same"]
    assert rows[0][4] == pytest.approx(10 * rows[0][2], rel=1e-3)  # each model's own score
    assert ctl.compare_table("", batch) == ([], [])


def test_each_row_shows_that_images_own_time(ctl: AppController, tmp_path: Path) -> None:
    class Timed(FakeDetector):
        def predict(self, item: Any) -> Any:
            p = super().predict(item)
            p.seconds = 0.0101 * (1 + self.runs)  # 0.0202, 0.0303, 0.0404
            return p

    ctl.registry.add("timed", Timed(), "test")
    files = [str(grey(tmp_path / f"{v}.png", v)) for v in (10, 60, 128)]
    batch = ctl.inspect("timed", files)
    rows = {r[1]: r[4] for r in ctl.table_rows(batch, 0.3)}
    assert rows == {"10.png": "0.0202 s", "60.png": "0.0303 s", "128.png": "0.0404 s"}
    assert [ctl.panels(batch, i)["time"] for i in range(3)] == ["0.0202 s", "0.0303 s", "0.0404 s"]


def test_evaluation_has_per_defect_type_rows_and_named_false_negatives(ctl: AppController, root: Path) -> None:
    from ccad.data.sample import Sample
    from ccad.evaluate import evaluate

    (root / "ds").mkdir()
    samples = [Sample(str(grey(root / "ds" / f"g{i}.png", 125 + i)), None, 0, "tex") for i in range(3)]
    samples += [Sample(str(grey(root / "ds" / f"spot{i}.png", 10 + 5 * i)), None, 1, "tex", "spot") for i in range(2)]
    samples += [Sample(str(grey(root / "ds" / "faint.png", 110)), None, 1, "tex", "faint")]
    ctl.engine.load_dataset = lambda path, split, layout: samples

    class Scored(FakeDetector):
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
    assert r["defect_headers"][:6] == ["category", "defect type", "images", "detected", "missed", "detection rate"]
    rows = {row[1]: row for row in r["defect_rows"]}
    assert list(rows) == ["good (false alarms)", "faint", "spot"]
    assert rows["spot"][2:6] == [2, 2, 0, 1.0] and rows["spot"][6] == pytest.approx(1.0)
    assert rows["faint"][2:6] == [1, 0, 1, 0.0]  # missed at threshold 0.3 (score ~0.07), yet above the good ones
    assert rows["faint"][6] == pytest.approx(1.0)
    assert rows["good (false alarms)"][2:4] == [3, 0]
    assert [cap for _, cap in r["fn"]] == ["score 0.06863 · faint.png · tex / faint"]
