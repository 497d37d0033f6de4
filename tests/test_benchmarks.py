"""Smoke tests of the benchmarks package: ``python -m benchmarks NAME`` on tiny generated data.

Each standing benchmark runs once at a size far below its ``--quick`` (a handful of 64-px
synthetic images, one training step, ``taef2:random`` for the latent methods: no ../shared, no
network, no GPU) and must exit 0 and append parseable JSON lines with the fields its committed
results (benchmarks/results/*.jsonl) carry. They run in this process through
:func:`benchmarks.run` (the dispatcher ``python -m benchmarks`` calls), with ``--threads 1``; the
dispatcher itself runs once as a subprocess. The experiments are checked to import and parse
their arguments, and three of them (levers, fusion_grid, latent_diagnostics) run on the models
the mtd smoke run saved (ablations trains four methods: too slow for a smoke test).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks
from ccad.data.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
AE = "taef2:random"  # the TAEF2 architecture with random weights: the same code path, no weight file


@pytest.fixture(autouse=True)
def _keep_threads():
    """A benchmark sets torch's thread count (``--threads``); restore it for the tests after."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(name: str, *args: str, out: Path) -> list[dict]:
    """Run benchmark ``name`` in this process with ``--json out``; its JSON lines (exit status 0)."""
    rc = benchmarks.run(name, [*args, "--threads", "1", "--json", str(out)])
    assert rc == 0, f"{name} exited {rc}"
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert rows, f"{name} wrote no JSON line to {out}"
    return rows


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A CSV manifest (image, split, defect_type, label, mask: MTD's split.csv columns) of a tiny
    generated set: 6 good train, 2 good test and 2 defective test images of one texture, 64 px."""
    root = write_dataset(tmp_path_factory.mktemp("bench-data") / "set", kinds=("granular",), n_train=6,
                         n_test_good=2, n_test_defect=1, size=64, seed=0, defects=("spot", "scratch"))
    rows = []
    for split in ("train", "test"):
        for img in sorted((root / "granular" / split).rglob("*.png")):
            defect = img.parent.name
            mask = root / "granular" / "ground_truth" / defect / f"{img.stem}_mask.png"
            rows.append({"image": img.relative_to(root).as_posix(), "split": split, "defect_type": defect,
                         "label": int(defect != "good"),
                         "mask": mask.relative_to(root).as_posix() if defect != "good" else ""})
    assert sum(r["label"] for r in rows) == 2 and all(Path(root, r["mask"]).is_file() for r in rows if r["mask"])
    path = root / "split.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def mtd_run(manifest, tmp_path_factory) -> tuple[Path, list[dict]]:
    """``mtd --quick`` on the tiny manifest: PatchCore and a one-step DeCo-Diff (its own and fused rows)."""
    tmp = tmp_path_factory.mktemp("bench-mtd")
    rows = run("mtd", "--quick", "--data", str(manifest), "--methods", "patchcore,deco-diff", "--steps", "1",
               "--image-size", "64", "--autoencoder", AE, "--workdir", str(tmp / "work"), "--batch-size", "4",
               out=tmp / "mtd.jsonl")
    return tmp / "work", rows


def test_dispatcher_lists_every_benchmark_and_refuses_an_unknown_name():
    env_cmd = [sys.executable, "-m", "benchmarks"]
    listed = subprocess.run([*env_cmd, "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    for name in benchmarks.names():
        assert name in listed.stdout
    bad = subprocess.run([*env_cmd, "no-such-bench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown benchmark 'no-such-bench'" in bad.stderr
    with pytest.raises(KeyError, match="no-such-bench"):
        benchmarks.load("no-such-bench")


def test_no_benchmark_patches_sys_path():
    for py in (ROOT / "benchmarks").rglob("*.py"):
        assert "sys.path" not in py.read_text(), py


@pytest.mark.parametrize("name", benchmarks.names())
def test_every_benchmark_parses_its_arguments(name, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmarks.run(name, ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m benchmarks {name}" in out and "--json" in out and "--threads" in out


def test_mtd(mtd_run):
    work, rows = mtd_run
    # own map, fused, the bank's map alone, and the ablation (the same model without its correction steps)
    assert [r["method"] for r in rows] == ["patchcore", "deco-diff", "deco-diff+bank", "deco-diff/bank",
                                           "deco-diff/ablation"]
    assert rows[-1]["settings"]["view"] == "ablation" and rows[-1]["settings"]["ablation"].startswith("zero corr")
    for r in rows:
        for k in (*METRICS, "fit_seconds", "ms_per_image", "peak_ram_mb", "peak_vram_mb", "device", "settings"):
            assert k in r, k
        assert 0.0 <= r["image_auroc"] <= 1.0
        assert r["settings"]["n_test"] == 4 and r["settings"]["run"]["command"].startswith("python -m benchmarks mtd")
    assert (work / "deco-diff" / "model").is_dir()  # what the experiments and speed --model read


def test_experiments_rescore_the_saved_mtd_models(mtd_run, manifest, tmp_path):
    work, _ = mtd_run
    common = ["--workdir", str(work), "--methods", "deco-diff", "--data", str(manifest), "--batch-size", "4"]
    levers = run("experiments.levers", *common, "--arm", "fusion_norm=quantile", out=tmp_path / "levers.jsonl")
    assert {(r["method"], r["arm"]) for r in levers} == {(m, a) for m in ("deco-diff", "deco-diff+bank")
                                                         for a in ("baseline", "fusion_norm=quantile")}
    assert all(k in r for r in levers for k in (*METRICS, "seconds", "settings"))
    grid = run("experiments.fusion_grid", *common, out=tmp_path / "grid.jsonl")
    assert sum(r["chosen"] for r in grid) == 1
    assert all({"norm", "weight_of_method_map", "synthetic", "test", "settings"} <= set(r) for r in grid)
    (diag,) = run("experiments.latent_diagnostics", str(work / "deco-diff" / "model"), "--data", str(manifest),
                  "--n", "4", out=tmp_path / "diag.jsonl")
    assert diag["variant"] == "deco-diff" and diag["n_good"] == 4
    assert {"ae_err", "rec_err", "rec_vs_ae", "latent_dev", "map_p99", "calibration_scores"} <= set(diag)


def test_multiclass(tmp_path):
    rows = run("multiclass", "--quick", "--per-class", "3,1,1", "--methods", "patchcore,deco-diff", "--steps", "1",
               "--image-size", "64", "--autoencoder", AE, "--workdir", str(tmp_path / "work"),
               out=tmp_path / "mc.jsonl")
    assert [r["method"] for r in rows] == ["patchcore", "deco-diff", "deco-diff/ablation"]
    for r in rows:
        assert {"per_class", "mean", "fit_seconds", "ms_per_image", "peak_ram_mb", "peak_vram_mb", "device",
                "settings"} <= set(r)
        assert len(r["per_class"]) == 5 and set(METRICS) <= set(r["mean"])
    assert rows[0]["settings"]["models"] == 5 and rows[1]["settings"]["models"] == 1
    # the ablation row: the same model without its correction steps (DeCo-Diff's declared ablation)
    assert rows[2]["settings"]["view"] == "ablation" and rows[2]["settings"]["ablation"].startswith("zero correction")
    assert rows[2]["per_class"] != rows[1]["per_class"]


def test_speed_throughput_latency_and_saved_model(mtd_run, manifest, tmp_path):
    thr = run("speed", "--quick", "--methods", "patchcore,deco-diff", "--autoencoder", AE,
              "--train-images", "4", out=tmp_path / "thr.jsonl")
    assert [r["method"] for r in thr] == ["patchcore", "deco-diff"]
    for r in thr:
        assert r["benchmark"] == "throughput" and r.get("error") is None, r.get("error")
        assert [x["batch"] for x in r["results"]] == [1, 2] and r["best_images_per_s"] > 0
    lat = run("speed", "--mode", "latency", "--data", str(manifest), "--methods", "patchcore", "--sizes", "64",
              "--batch-sizes", "1,2", "--reps", "1", "--n-train", "4", "--workdir", str(tmp_path / "lat"),
              out=tmp_path / "lat.jsonl")
    assert len(lat) == 1 and lat[0]["method"] == "patchcore" and lat[0]["image_size"] == 64
    assert lat[0]["ms_per_image_b1"] > 0 and lat[0]["ms_per_image_b2"] > 0 and "settings" in lat[0]
    work, _ = mtd_run
    saved = run("speed", "--model", str(work / "deco-diff" / "model"), "--n-images", "2", "--batch-sizes", "1,2",
                "--reps", "1", "--check", "--sessions", "2", out=tmp_path / "saved.jsonl")
    r = saved[0]
    assert r["benchmark"] == "saved-model" and r["variant"] == "deco-diff" and r["predict_s_per_image"] > 0
    assert set(r["predict_many_s_per_image"]) == {"1", "2"} and r["batch_check"]["max_abs_score_diff"] < 1e-3
    assert r["sessions"]["batcher"]["detector_calls"] >= 1


def test_bank_scaling(tmp_path):
    rows = run("bank_scaling", "--sizes", "6", "--image-size", "32", "--batch-size", "4", "--xi", "8",
               out=tmp_path / "bank.jsonl")
    assert rows[0]["n_images"] == 6 and rows[0]["xi"] == 8
    assert {"seconds", "peak_ram_mb", "build_growth_mb", "n_patches", "images_per_s", "settings"} <= set(rows[0])


def test_bank_speed(manifest, tmp_path):
    """Both coreset modes fitted and evaluated in one run (the old one stays selectable), the summary
    row compares them; inference stage shares add up; the selection-only part on cached features."""
    rows = run("bank_speed", "--part", "fit", "--quick", "--data", str(manifest), "--image-size", "64",
               "--batch-size", "4", "--inference", "--repeats", "1", out=tmp_path / "fit.jsonl")
    assert [r.get("method") for r in rows[:2]] == ["patchcore[coreset=legacy]", "patchcore[coreset=fast]"]
    for r in rows[:2]:
        assert {*METRICS, "fit_seconds"} <= set(r) and r["settings"]["run"]["omp_wait_policy"] == "PASSIVE"
    assert rows[2]["summary"] == "fast vs legacy" and {"fit_speedup", "delta_image_auroc"} <= set(rows[2])
    assert [r["batch"] for r in rows[3:]] == [1, 8]
    for r in rows[3:]:
        assert abs(sum(r["share"].values()) - 1.0) < 0.01
    feats = tmp_path / "feats.pt"
    rows = run("bank_speed", "--part", "coreset", "--data", str(manifest), "--image-size", "64", "--features",
               str(feats), "--ratio", "0.1", out=tmp_path / "coreset.jsonl")
    assert feats.is_file() and [(r["part"], r["mode"]) for r in rows] == [
        ("coreset", "legacy"), ("coreset", "fast"), ("feat-diff selections", "legacy"),
        ("feat-diff selections", "fast"), ("feat-diff selections", "streamed (select_cells)")]
    assert rows[0]["memory_rows"] == rows[1]["memory_rows"]
    # coreset variants and seeds from one feature pass, scored by the fitted detector's own path
    rows = run("bank_speed", "--part", "seeds", "--quick", "--data", str(manifest), "--image-size", "64",
               "--batch-size", "4", "--variants", "fast@0,fast@1,legacy@0,fast-noprecut@0,fast-64@0",
               out=tmp_path / "seeds.jsonl")
    scores = ("image_auroc", "pixel_auroc", "pixel_aupro")
    assert [(r["part"], r["variant"]) for r in rows[:5]] == [
        ("seeds", "fit"), ("seeds", "fast"), ("seeds", "fast"), ("seeds", "legacy"), ("seeds", "fast-noprecut")]
    fit, fast0 = rows[0], rows[1]
    assert fast0["memory_equals_fit"] and all(fast0[k] == fit[k] for k in scores)  # the replay is the fit
    assert all(r["backbone_misses"] == rows[1]["backbone_misses"] for r in rows[1:5])  # no image ran twice
    for r in rows[1:5]:
        assert {*scores, "selection_seconds", "coverage_held_out", "coverage_train"} <= set(r)
        assert r["memory_rows"] == fit["memory_rows"] and set(r["coverage_held_out"]) == {"max", "q999", "mean"}
    assert fit["n_held_out_patches"] == fit["n_held_out"] * 64  # 64 px: 8 x 8 patches per image
    assert rows[5]["variant"] == "fast-64" and rows[5]["changes"] == {"proj_dim": 64}
    assert [(r["part"], r["variant"]) for r in rows[6:]] == [
        ("seeds summary", "fast"), ("seeds summary", "legacy"), ("seeds summary", "fast-noprecut"),
        ("seeds summary", "fast-64")]
    assert rows[6]["seeds"] == [0, 1] and set(rows[6]["image_auroc"]) == {"min", "max", "range", "mean"}


def test_bank_speed_inference_torch_and_onnx(manifest, tmp_path):
    """--part inference times the torch detector and its ONNX export (with and without onnxruntime's
    spinning) in one run, batch 1 and 8, each with stage shares; the export passed its parity check."""
    rows = run("bank_speed", "--part", "inference", "--data", str(manifest), "--image-size", "64", "--repeats", "1",
               "--engines", "torch,onnx,onnx-spin", "--memory-rows", "50", "--workdir", str(tmp_path / "w"),
               out=tmp_path / "inf.jsonl")
    assert [(r["engine"], r["batch"]) for r in rows] == [(e, b) for b in (1, 8) for e in ("torch", "onnx", "onnx-spin")]
    for r in rows:
        assert abs(sum(r["share"].values()) - 1.0) < 0.01 and r["ms_per_image"] > 0 and r["memory_rows"] >= 1
        assert r["loadavg_start"] and r["coreset_ratio"] > 0.01  # sized up to ~50 rows from 5 x 64 patches
    onnx = [r for r in rows if r["engine"] != "torch"]
    assert all(r["parity_passed"] and r["parity_verdicts_differ"] == 0 for r in onnx)
    assert [r["runtime_threading"]["spinning"] for r in onnx] == [False, True, False, True]


def test_peak_memory(mtd_run, tmp_path):
    work, _ = mtd_run
    rows = run("peak_memory", "--model", str(work / "deco-diff" / "model"), "--side", "0",  # the sample only
               out=tmp_path / "peak.jsonl")
    assert [r["image"] for r in rows] == ["good_1.png"]
    assert all(r["rc"] == 0 and r["peak_rss_mb"] > 0 for r in rows), rows


def test_metrics_speed(tmp_path):
    (r,) = run("metrics_speed", "--n", "6", "--size", "32", out=tmp_path / "metrics.jsonl")
    assert r["pixels"] == 6 * 32 * 32 and {"pixel_auroc_s", "pixel_aupro_s", "total_s", "peak_rss_mb"} <= set(r)
    assert set(r["metrics"]) >= {"pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"}


def test_dagm_relabel(tmp_path):
    (r,) = run("dagm_relabel", "--quick", "--kinds", "granular", "--defects", "spot", "scratch", "--size", "64",
               "--out", str(tmp_path / "dagm"), out=tmp_path / "dagm.jsonl")
    assert r["n_images"] == 2 and 0.0 <= r["proposal_iou"] <= 1.0 and 0.0 <= r["ellipse_iou"] <= 1.0
    assert {"seconds_per_image", "proposal_iou_image_only", "proposal_iou_no_grabcut", "settings"} <= set(r)


@pytest.mark.slow
def test_app_load(mtd_run, tmp_path):
    pytest.importorskip("gradio")
    work, _ = mtd_run
    (r,) = run("app_load", "--n", "2", "--model", str(work / "deco-diff" / "model"), "--startup-timeout", "240",
               "--timeout", "240", "--no-warmup", out=tmp_path / "app.jsonl")
    assert r["ok"] == 2 and r["server_alive"] and r["order_violations"] == 0
    assert {"latency_p50_s", "throughput_per_s", "lost", "failed", "refused"} <= set(r)


def test_serve(manifest, tmp_path):
    """`ccad serve` in a subprocess under 2 clients, with and without batching, on a PatchCore fitted here."""
    pytest.importorskip("fastapi")
    rows = run("serve", "--data", str(manifest), "--n-train", "6", "--image-size", "64", "--n-images", "3",
               "--clients", "2", "--requests", "2", "--workdir", str(tmp_path / "work"), out=tmp_path / "serve.jsonl")
    served = [r for r in rows if "skipped" not in r]
    assert [r["row"] for r in served][:2] == ["torch-batch-off", "torch-batch-on"]
    for r in served:
        assert r["ok"] == 4 and r["lost"] == 0 and r["refused"] == 0 and r["failed"] == 0 and r["server_alive"]
        assert r["wrong_answer"] == 0 and r["max_score_diff"] < 1e-4
        assert {"requests_per_s", "latency_p50_s", "latency_p99_s", "mean_batch", "command"} <= set(r)
        if r["engine"] == "onnx":  # the export's threading, as /model reports it: no spinning by default
            assert r["runtime_threading"]["spinning"] is False


def test_a_method_without_a_settings_row_gets_a_default_one(monkeypatch):
    """Adding a method needs no benchmark row: without one the method's own defaults are used."""
    from benchmarks import common

    monkeypatch.delitem(common.SETTINGS, "deco-diff")
    quick = common.settings_for("deco-diff", "quick", "taef2:random")
    full = common.settings_for("deco-diff", "full", "taef2:random", overrides={"steps": 7})
    assert quick["image_size"] <= 128 and quick["steps"] == 200 and "no settings row" in quick["budget"]
    assert full["steps"] == 7 and "overrides: steps 7" in full["budget"]
    from ccad.methods import get_method

    cfg, scoring = common.method_configs("deco-diff", quick)  # validated: the method's own defaults
    assert cfg == get_method("deco-diff").default_config() and scoring == get_method("deco-diff").default_scoring()
    with pytest.raises(Exception, match="available"):
        common.settings_for("no-such-method", "quick", "taef2:random")


def test_cli_startup(tmp_path):
    rows = run("cli_startup", "--repeat", "1", out=tmp_path / "cli.jsonl")
    assert {r["command"] for r in rows} >= {"ccad --help", "ccad --version", "ccad train --help"}
    assert all(r["heavy_imports"] == [] and r["median_s"] > 0 for r in rows), rows


def test_synthetic_speed(tmp_path):
    rows = run("synthetic_speed", "--size", "32", "--repeat", "1", out=tmp_path / "syn.jsonl")
    from ccad.data.synthetic import DEFECTS, TEXTURES

    assert [r["kind"] for r in rows] == list(TEXTURES)
    assert all(set(r["best_ms"]) == {"good", *DEFECTS} for r in rows)


def test_operating_points(manifest, tmp_path):
    rows = run("operating_points", "--quick", "--datasets", str(manifest), "--methods", "patchcore",
               "--targets", "0.01,0.5", "--calibration-fraction", "0.5", "--workdir", str(tmp_path / "w"),
               out=tmp_path / "op.jsonl")
    assert [r["target_fpr"] for r in rows] == [0.01, 0.5]
    low, high = rows
    assert low["threshold_is_max_good"] and low["threshold"] >= high["threshold"]  # a laxer target, a lower bar
    assert low["recall"] <= high["recall"] and low["n_defects"] == 2 and low["n_good"] == 2
    assert low["missed"] == round((1 - low["recall"]) * low["n_defects"])


def test_resize_modes(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert benchmarks.run("resize_modes", ["--skip-mtd", "--elong-shape", "32x96", "--elong-size", "32",
                                           "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["square", "keep-aspect", "tile"]
    assert all(r["n_test"] == 12 and 0.0 <= r["pixel_auroc"] <= 1.0 for r in rows)
    assert rows[2]["settings"]["n_train_inputs"] > rows[2]["settings"]["n_train"]  # built from tiles
