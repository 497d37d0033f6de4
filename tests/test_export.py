"""ccad export + ccad.runtime: the exported folder scores as the torch detector, without torch.

Every exportable method (PatchCore; feat-diff alone and with bank fusion) is trained on tiny
generated textures, exported, and run by the runtime (real onnxruntime, real OpenVINO when
installed) against the torch detector on the same images. Tolerance: scores within 1e-4 relative
(measured ~1e-6 here), maps within 1e-4 of their range, 0 verdicts and 0 out-of-domain flags differ.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccad.config import ScoringConfig
from ccad.data.synthetic import write_dataset
from ccad.export import ExportParityError, ExportRefused, export_detector
from ccad.pipeline import fit_detector, train_detector
from ccad.runtime import (SPINNING_ENV, THREADS_ENV, ExportFolderError, load, model_input, resize, resize_taps,
                          resize_weights, thread_settings)
from ccad.training import TrainConfig

SIZE = 64
RTOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("export-data"), kinds=("granular",), n_train=8, n_test_good=2,
                         n_test_defect=2, size=SIZE, seed=4, defects=("spot", "scratch"))


def good_and_defect_images(data):
    return sorted(str(p) for p in Path(data).rglob("*.png") if "/test/" in str(p) and "ground_truth" not in str(p))


@pytest.fixture(scope="module")
def patchcore(data, tmp_path_factory):
    det = fit_detector(str(data), variant="patchcore", image_size=SIZE, calibration_fraction=0.3)
    folder = tmp_path_factory.mktemp("pc") / "model"
    det.save_pretrained(folder)
    return det, folder


def _feat_diff(data, run, fusion):
    from ccad.data.detect import load_dataset
    from ccad.methods.feat_diff import FeatDiffConfig

    cfg = FeatDiffConfig(preset="tiny", memory_size=64, search=False, noise_level=100, steps=2, edit=0.5)
    # the fused variant also scores by the mean of the top-k map values (the runtime's other score rule)
    kw = {"scoring": ScoringConfig(fusion="bank", fusion_image_size=SIZE, fusion_ratio=0.1, score="topk")} if fusion \
        else {}
    return train_detector(load_dataset(str(data), split="train"), run, variant="feat-diff", method=cfg,
                          image_size=SIZE, bank_size=16, calibration_fraction=0.3,
                          train=TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, show_progress=False), **kw)


def _assert_same(det, runtime, images):
    """The runtime's predictions equal the detector's (scores, maps, verdicts, domain flags)."""
    a, _ = det.predict_many(images, batch_size=3)
    b, _ = runtime.predict_many(images, batch_size=2)  # another batching: the graph's batch is dynamic
    assert len(a) == len(b) == len(images)
    for p, q in zip(a, b):
        assert q.anomaly_map.shape == p.anomaly_map.shape == p.image.shape[:2]
        assert abs(p.score - q.score) <= RTOL * max(abs(p.score), abs(p.threshold)), (p.path, p.score, q.score)
        span = float(p.anomaly_map.max() - p.anomaly_map.min())
        assert np.abs(p.anomaly_map - q.anomaly_map).max() <= RTOL * span
        assert (p.verdict, p.out_of_domain, p.threshold) == (q.verdict, q.out_of_domain, q.threshold)
        assert q.domain_distance == pytest.approx(p.domain_distance, rel=RTOL)
        assert q.reconstruction is None


def _assert_parity_record(folder):
    par = json.loads((Path(folder) / "parity.json").read_text())
    assert par["passed"] and par["verdicts_differ"] == 0 and par["out_of_domain_differ"] == 0
    assert par["n_images"] == 12 and par["max_score_rel_diff"] <= RTOL
    assert all(r["torch_verdict"] == r["export_verdict"] for r in par["images"])
    return par


def test_resize_is_torchs():
    rng = np.random.default_rng(0)
    for h, w in [(100, 80), (37, 150), (301, 300), (20, 30), (64, 64)]:
        im = rng.random((h, w, 3), dtype=np.float32)
        from ccad.data.convert import to_tensor

        np.testing.assert_allclose(model_input(im, SIZE), to_tensor(im, SIZE).numpy(), atol=1e-6)
        m = np.cumsum(rng.random((SIZE, SIZE), dtype=np.float32), axis=1)  # a smooth map, as real maps are
        ref = F.interpolate(torch.from_numpy(m)[None, None], size=(h, w), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(resize(m, (h, w), antialias=False), ref[0, 0].numpy(), atol=1e-4 * m.max())


def test_banded_resize_equals_the_dense_interpolation_matrix():
    """``resize`` runs each axis through its band of taps (no BLAS); the numbers are the dense
    ``resize_weights`` product's, up and down, grey and colour, with and without antialiasing."""
    rng = np.random.default_rng(2)
    for (h, w), (oh, ow) in [((368, 502), (64, 64)), ((64, 64), (368, 502)), ((700, 33), (64, 90)),
                             ((64, 64), (64, 200)), ((5, 300), (64, 64)), ((64, 64), (1, 1))]:
        for aa in (True, False):
            wh, ww = resize_weights(h, oh, aa).astype(np.float32), resize_weights(w, ow, aa).astype(np.float32)
            im = rng.random((h, w, 3), dtype=np.float32)
            got = resize(im, (oh, ow), antialias=aa)
            assert got.shape == (oh, ow, 3) and got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_allclose(got, np.einsum("ij,jkc,lk->ilc", wh, im, ww), atol=1e-5)
            np.testing.assert_allclose(resize(im[..., 0], (oh, ow), aa), wh @ im[..., 0] @ ww.T, atol=1e-5)
            idx, wt = resize_taps(h, oh, aa)
            assert idx.shape == wt.shape and idx.shape[0] == oh and idx.max() < h
            np.testing.assert_allclose(wt.sum(1), 1.0, atol=1e-5)  # every row's taps, no weight lost or doubled
    assert resize_taps(100, 64, True) is resize_taps(100, 64, True)  # cached


@pytest.mark.parametrize("k", [1, 3])
def test_the_graphs_nearest_distances_root_only_the_nearest(k):
    """The graph takes the nearest by squared distance and roots those only: the same values as
    rooting every distance first (bit for bit) and as the detector's chunked cdist (float32)."""
    from ccad.export.graph import mm_nearest_distances
    from ccad.features.patchcore import nearest_distances

    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(300, 24, generator=g), torch.randn(500, 24, generator=g)
    bank[7] = q[3]  # a zero distance: the 1e-30 clamp, then 1e-15
    v, _ = mm_nearest_distances(q, bank, k)
    qa = torch.cat([-2.0 * q, q.pow(2).sum(-1, keepdim=True), torch.ones(300, 1)], dim=-1)
    ba = torch.cat([bank, torch.ones(500, 1), bank.pow(2).sum(-1, keepdim=True)], dim=-1)
    every = (qa @ ba.T).clamp_min(1e-30).sqrt()
    first = every.min(1, keepdim=True).values if k == 1 else every.topk(k, dim=1, largest=False).values
    assert torch.equal(v, first.clamp_min(0.0))
    ref, _ = nearest_distances(q, bank, k)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-3)


def test_runtime_threading_defaults_and_overrides(patchcore, tmp_path, monkeypatch):
    """onnxruntime's pool threads do not spin by default (its own default is to spin); an argument,
    else ``$CCAD_RUNTIME_THREADS`` / ``$CCAD_RUNTIME_SPINNING``, overrides; nonsense is refused by name."""
    det, _ = patchcore
    out = export_detector(det, tmp_path / "export")

    def entries(m):
        so = m.session.sess.get_session_options()
        return (so.get_session_config_entry("session.intra_op.allow_spinning"),
                so.get_session_config_entry("session.inter_op.allow_spinning"), so.intra_op_num_threads)

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv(SPINNING_ENV, raising=False)
    m = load(out)
    assert m.threading == {"threads": None, "spinning": False} and entries(m)[:2] == ("0", "0")
    m = load(out, threads=1, spinning=True)
    assert m.threading == {"threads": 1, "spinning": True} and entries(m) == ("1", "1", 1)
    monkeypatch.setenv(THREADS_ENV, "1")
    monkeypatch.setenv(SPINNING_ENV, "1")
    assert entries(load(out)) == ("1", "1", 1)
    assert load(out, spinning=False).threading == {"threads": 1, "spinning": False}  # the argument wins
    p = load(out).predict(np.full((40, 50, 3), 0.5, np.float32))
    assert p.anomaly_map.shape == (40, 50) and np.isfinite(p.score)
    monkeypatch.setenv(SPINNING_ENV, "sometimes")
    with pytest.raises(ExportFolderError, match=SPINNING_ENV):
        thread_settings()
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(ExportFolderError, match=THREADS_ENV):
        thread_settings(spinning=False)


def test_patchcore_export_scores_as_the_torch_detector(patchcore, data, tmp_path):
    det, _ = patchcore
    out = export_detector(det, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"model.onnx", "verdict.json", "parity.json", "README.md"}
    _assert_parity_record(out)
    spec = json.loads((out / "verdict.json").read_text())
    assert spec["threshold"] == pytest.approx(det.threshold) and spec["input"]["size"] == SIZE
    assert spec["calibration"]["domain"]["limit"] == pytest.approx(det.calibration.domain.limit)
    runtime = load(out)
    _assert_same(det, runtime, good_and_defect_images(data))
    # a non-square image of another size, and a grey uint8 array, are resized as the detector resizes them
    odd = (np.random.default_rng(1).random((90, 51)) * 255).astype(np.uint8)
    p, q = det.predict(odd), runtime.predict(odd)
    assert q.score == pytest.approx(p.score, rel=RTOL) and q.anomaly_map.shape == (90, 51)


@pytest.mark.parametrize("fusion", [False, True], ids=["feat-diff", "feat-diff+fusion"])
def test_feat_diff_export_scores_as_the_torch_detector(data, tmp_path, fusion):
    det = _feat_diff(data, tmp_path / "run", fusion)
    out = export_detector(det, tmp_path / "export")
    _assert_parity_record(out)
    spec = json.loads((out / "verdict.json").read_text())
    assert (spec["fusion"] is not None) == fusion and spec["score"]["score"] == ("topk" if fusion else "max")
    assert "bank_map" in spec["graph"]["outputs"] if fusion else "bank_map" not in spec["graph"]["outputs"]
    _assert_same(det, load(out), good_and_defect_images(data))


def test_runtime_never_imports_torch(patchcore, data, tmp_path):
    det, _ = patchcore
    out = export_detector(det, tmp_path / "export")
    image = good_and_defect_images(data)[-1]
    code = (f"import os, sys, json\nimport ccad.runtime as rt\nm = rt.load({str(out)!r})\np = m.predict({image!r})\n"
            "from ccad import Prediction\nassert isinstance(p, Prediction)\n"
            "so = m.session.sess.get_session_options()\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'score': p.score, 'verdict': p.verdict, "
            "'ood': p.out_of_domain, 'shape': list(p.anomaly_map.shape), 'omp': os.environ.get('OMP_WAIT_POLICY'), "
            "'spin': so.get_session_config_entry('session.intra_op.allow_spinning')}))")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OMP_WAIT_POLICY", "CCAD_RUNTIME_SPINNING", "CCAD_RUNTIME_THREADS")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                         env={**env, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    ref = det.predict(image)
    assert got["torch"] is False
    # the torch-free path still gets the package's thread policy: OpenMP passive (import ccad), no ORT spinning
    assert got["omp"] == "PASSIVE" and got["spin"] == "0"
    assert got["score"] == pytest.approx(ref.score, rel=RTOL)
    assert (got["verdict"], got["ood"], got["shape"]) == (ref.verdict, ref.out_of_domain, list(ref.anomaly_map.shape))


def test_cli_export_then_predict_writes_the_torch_models_outputs(patchcore, data, tmp_path, capsys):
    from ccad.cli import main

    _, model = patchcore
    good = str(Path(data) / "granular" / "test" / "good")
    assert main(["export", str(model), "--out", str(tmp_path / "exp"), "--parity-images", good]) == 0
    assert "verdicts differing 0" in capsys.readouterr().out
    assert json.loads((tmp_path / "exp" / "parity.json").read_text())["sources"].startswith("2 images given")
    assert main(["export", str(model), "--out", str(tmp_path / "exp")]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    test = str(Path(data) / "granular" / "test")
    assert main(["predict", str(model), test, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["predict", str(tmp_path / "exp"), test, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    rows = [list(csv.DictReader(open(tmp_path / d / "scores.csv"))) for d in ("a", "b")]
    assert len(rows[0]) == len(rows[1]) == 6
    for r, s in zip(*rows):
        assert (r["file"], r["verdict"], r["out_of_domain"], r["heatmap"]) == (s["file"], s["verdict"],
                                                                            s["out_of_domain"], s["heatmap"])
        assert float(s["score"]) == pytest.approx(float(r["score"]), rel=RTOL)
        assert (tmp_path / "b" / s["heatmap"]).is_file() and (tmp_path / "b" / s["overlay"]).is_file()


def test_openvino_ir_is_float32_and_scores_as_the_torch_detector(patchcore, data, tmp_path):
    ov = pytest.importorskip("openvino")
    det, _ = patchcore
    out = export_detector(det, tmp_path / "ov", format="openvino")
    assert (out / "model.xml").is_file() and (out / "model.bin").is_file() and not (out / "model.onnx").exists()
    model = ov.Core().read_model(str(out / "model.xml"))
    kinds = {str(op.get_output_element_type(0)) for op in model.get_ops() if op.get_type_name() == "Constant"}
    assert not any("16" in k for k in kinds), kinds  # saved with compress_to_fp16=False
    assert json.loads((out / "parity.json").read_text())["backend"] == "openvino"
    _assert_parity_record(out)
    _assert_same(det, load(out), good_and_defect_images(data))


def test_an_export_that_scores_differently_is_refused_loudly(patchcore, tmp_path, monkeypatch):
    import ccad.export.graph as graph

    right = graph.mm_nearest_distances

    def wrong(q, bank, k=1, chunk_elems=0, group=None):  # a graph whose distances are 20 % off
        d, i = right(q, bank, k)
        return d * 1.2, i

    monkeypatch.setattr(graph, "mm_nearest_distances", wrong)
    det, _ = patchcore
    with pytest.raises(ExportParityError, match="verdict"):
        export_detector(det, tmp_path / "bad")
    assert (tmp_path / "bad" / "parity.json").is_file() and not (tmp_path / "bad" / "verdict.json").exists()
    with pytest.raises(ExportFolderError, match="verdict.json"):
        load(tmp_path / "bad")


def test_other_methods_are_refused_by_name(data, tmp_path):
    from ccad.methods import get_method

    cfg = get_method("ccad-v").default_config("tiny")
    cfg.diffusion.start_step, cfg.diffusion.steps = 100, 2
    det = train_detector(str(data), tmp_path / "run", variant="ccad-v", method=cfg, image_size=32, bank_size=8,
                         train=TrainConfig(steps=1, batch_size=4, lr=1e-3, warmup_steps=1, show_progress=False))
    with pytest.raises(ExportRefused, match="'ccad-v' cannot be exported: .*Exportable methods: patchcore, feat-diff"):
        export_detector(det, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_runtime_names_the_bad_file_and_field(patchcore, tmp_path):
    det, _ = patchcore
    with pytest.raises(ExportFolderError, match="verdict.json: missing"):
        load(tmp_path)
    out = export_detector(det, tmp_path / "e")
    spec = json.loads((out / "verdict.json").read_text())
    (out / "verdict.json").write_text(json.dumps({**spec, "format": "other"}))
    with pytest.raises(ExportFolderError, match="field 'format'"):
        load(out)
    (out / "verdict.json").write_text(json.dumps(spec))
    (out / "model.onnx").unlink()
    with pytest.raises(ExportFolderError, match="model.onnx: missing"):
        load(out)


def test_app_export_button_gives_a_zip_the_runtime_runs(patchcore, data, tmp_path):
    import zipfile

    from app.controller import AppController

    det, _ = patchcore
    c = AppController(data_root=tmp_path, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    name = c.registry.add("tiles (patchcore)", det, "test")
    path, msg = c.export_zip(name)
    assert path.endswith(".zip") and "0 verdicts differ" in msg
    with zipfile.ZipFile(path) as z:
        assert {"model.onnx", "verdict.json", "parity.json", "README.md"} <= set(z.namelist())
        z.extractall(tmp_path / "unzipped")
    image = good_and_defect_images(data)[0]
    assert load(tmp_path / "unzipped").predict(image).score == pytest.approx(det.predict(image).score, rel=RTOL)


def test_commands_that_need_the_torch_model_refuse_an_export_folder(patchcore, data, tmp_path, capsys):
    from ccad.cli import main

    det, _ = patchcore
    out = export_detector(det, tmp_path / "exp")
    assert main(["evaluate", str(out), str(data)]) == 2
    assert "runs with `ccad predict` or ccad.runtime only" in capsys.readouterr().err
