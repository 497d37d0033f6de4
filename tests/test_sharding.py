"""Many images, many processes: ``ccad predict`` / ``ccad evaluate`` under ``accelerate launch``
with two CPU processes give the single-process CSV / report; ``seconds`` is each image's own time.

The launches are real subprocesses: ``accelerate launch --multi_gpu --num_processes 2`` is the
torchrun path (gloo on CPU; ``ACCELERATE_USE_CPU=true`` keeps it there on a GPU machine too).
``accelerate launch --cpu --num_processes 2`` would start one process unless MPI is set up.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ccad.cli import main
from ccad.data.synthetic import write_dataset
from ccad.distributed import Shard, current
from ccad.pipeline import AnomalyDetector


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A PatchCore detector at 64 px and a test set with same-named files in several folders
    (000.png in good/, scratch/, spot/) and one broken file."""
    from ccad.pipeline import fit_detector

    root = tmp_path_factory.mktemp("sharding")
    data = write_dataset(root / "data", kinds=("fibrous",), n_train=8, n_test_good=3, n_test_defect=2, size=64,
                         seed=3, defects=("spot", "scratch"))
    cat = data / "fibrous"
    (cat / "test" / "good" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    det = fit_detector(cat, image_size=64, bank_size=20)
    det.save_pretrained(root / "model")
    return SimpleNamespace(root=root, cat=cat, model=root / "model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, *args: str, late_rank_s: float = 0.0) -> subprocess.CompletedProcess:
    """``accelerate launch`` two CPU processes of ``python -m ccad.cli ARGS`` (offline, no prompt);
    ``late_rank_s``: rank 1 starts that many seconds after rank 0 (a slow process: a ``sitecustomize``
    that sleeps before anything is imported)."""
    cfg = tmp / "accelerate.yaml"  # an explicit config: a user's default config is never read
    cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                   "num_processes: 2\nmixed_precision: 'no'\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    if late_rank_s:
        site = tmp / "late-rank"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(
            "import os, time\n"
            f"if os.environ.get('RANK') == '1':\n    time.sleep({float(late_rank_s)})\n")
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), "-m", "ccad.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# Scores agree to float32 rounding, not bit for bit: the broken file shifts which images share a
# batch (a single process fills its batch with the next readable image, a slice stops at its end),
# and batched float32 math can differ by one ulp (2e-6 at a score of 24).


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


# ---- the slices -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (7, 2, 3), (2, 4, 3), (0, 8, 2), (9, 1, 4)])
def test_slices_cover_every_item_once_in_order_at_batch_boundaries(n, batch, world):
    items = list(range(n))
    parts = [Shard(rank=r, world=world).split(items, batch) for r in range(world)]
    assert [i for p in parts for i in p] == items  # rank order = single-process order
    for p in parts[:-1]:
        assert len(p) % batch == 0  # whole batches: each batch holds the same images as alone
    assert Shard().split(items, batch) == items


def test_alone_is_one_process_without_a_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    s = current()
    assert (s.rank, s.world, s.state, s.is_main, s.distributed) == (0, 1, None, True, False)
    assert s.gather([1, 2]) == [[1, 2]] and s.broadcast("x") == "x"


# ---- two processes = one ----------------------------------------------------------------------

def test_sharded_predict_writes_the_single_process_csv_and_files(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["predict", str(tiny.model), str(tiny.cat / "test"), "--out", str(one), "--batch-size", "2",
                 "--quiet"]) == 0
    proc = _launch(tmp_path, "predict", str(tiny.model), str(tiny.cat / "test"), "--out", str(two),
                   "--batch-size", "2", "--quiet")
    a, b = _rows(one / "scores.csv"), _rows(two / "scores.csv")
    assert [r["file"] for r in a] == [r["file"] for r in b]  # same files, same order
    assert len(a) == 8 and a[-1]["verdict"].startswith("error") and "zz_broken" in a[-1]["file"]
    for ra, rb in zip(a, b):
        assert ra["verdict"] == rb["verdict"] and ra["threshold"] == rb["threshold"]
        if ra["score"]:
            assert float(rb["score"]) == pytest.approx(float(ra["score"]), rel=1e-6, abs=2e-6)
            assert float(rb["seconds"]) >= 0
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert (two / "spot+000_heatmap.png").is_file() and (two / "scratch+000_mask.png").is_file()
    assert [(r["heatmap"], r["mask"]) for r in a] == [(r["heatmap"], r["mask"]) for r in b]
    assert proc.stdout.count("wrote") == 1  # one merged summary, from the main process
    assert proc.stderr.count("skipped") == 1 and "zz_broken" in proc.stderr


def test_sharded_evaluate_gives_the_single_process_report(tiny, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["evaluate", str(tiny.model), str(tiny.cat), "--json", str(one), "--batch-size", "2",
                 "--quiet"]) == 0
    shards = tmp_path / "shards"
    proc = _launch(tmp_path, "evaluate", str(tiny.model), str(tiny.cat), "--json", str(two), "--batch-size", "2",
                   "--shard-dir", str(shards), "--quiet")
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["per_category"].keys() == b["per_category"].keys() == {"fibrous", "mean"}
    for cat, row in a["per_category"].items():
        for key, value in row.items():
            other = b["per_category"][cat][key]
            # metrics of float32 maps computed in other processes (other thread counts): equal to
            # float32 rounding, which can move a rank-based metric by ~1e-7; 1e-5 is far below a
            # difference a user could see in the 4-digit tables
            assert (value is None and other is None) or abs(value - other) <= 1e-5, (cat, key)
    assert a["per_category"]["mean"]["pixel_aupro"] is not None  # the pixel metrics used the gathered maps
    assert [r["path"] for r in a["records"]] == [r["path"] for r in b["records"]]
    for ra, rb in zip(a["records"], b["records"]):
        assert rb["score"] == pytest.approx(ra["score"], rel=1e-5, abs=1e-6) and ra["label"] == rb["label"]
    assert a["errors"] == b["errors"] and len(a["errors"]) == 1
    assert proc.stdout.count("pixel_aupro") == 1  # one table, from the main process
    assert not list(shards.iterdir())  # the per-process files are removed after the merge


# ---- per-image seconds ------------------------------------------------------------------------

def test_seconds_are_each_images_own_time_plus_its_share_of_the_batch(tiny, monkeypatch):
    """A fake clock that only moves while an image is read (its own cost), resized (its own cost)
    or the batch runs forward (3 s): each image's seconds must be exactly its own costs + 1 s."""
    import ccad.detector as pl  # the module whose clock and readers predict_many uses

    det = pl.AnomalyDetector.from_pretrained(str(tiny.model))
    clock = [0.0]
    monkeypatch.setattr(pl, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    read_cost = {}

    def coerce(item):
        im = np.full((int(item), int(item), 3), 0.5, np.float32)
        clock[0] += read_cost[int(item)]
        return im

    real_to_tensor, real_maps = pl.to_tensor, det._map_parts  # the batched forward (maps + domain distances)

    def to_tensor(im, size):
        clock[0] += im.shape[0] / 1000.0
        return real_to_tensor(im, size)

    def maps_for_batch(x, *args, **kw):
        clock[0] += 3.0
        return real_maps(x, *args, **kw)

    monkeypatch.setattr(pl, "coerce_image", coerce)
    monkeypatch.setattr(pl, "to_tensor", to_tensor)
    monkeypatch.setattr(det, "_map_parts", maps_for_batch)
    sizes = [40, 64, 200]
    read_cost.update({40: 0.5, 64: 0.25, 200: 2.0})
    results, errors = det.predict_many(sizes, batch_size=3)
    assert not errors and [r.anomaly_map.shape for r in results] == [(s, s) for s in sizes]
    want = [read_cost[s] + s / 1000.0 + 1.0 for s in sizes]
    assert [r.seconds for r in results] == pytest.approx(want, abs=1e-9)


def test_seconds_differ_within_a_batch(tiny, tmp_path):
    """Images of very different sizes in one batch get their own (distinct, positive) seconds. No
    comparison with a wall clock here: timing belongs in benchmarks, not in tests (issue 20 item 5)."""
    import cv2

    from ccad.pipeline import AnomalyDetector

    det = AnomalyDetector.from_pretrained(str(tiny.model))
    rng = np.random.default_rng(0)
    paths = []
    for i, s in enumerate([32, 400, 64]):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), (rng.random((s, s, 3)) * 255).astype(np.uint8))
        paths.append(str(p))
    results, _ = det.predict_many(paths, batch_size=3)
    seconds = [r.seconds for r in results]
    assert all(s > 0 for s in seconds) and len(set(seconds)) == 3


def test_two_process_training_writes_one_model_and_reports_once(tiny, tmp_path):
    """``accelerate launch -m ccad.cli train`` on two CPU processes: training is data-parallel, and
    only the main process writes RUN/model and prints the result line. The second process starts
    late (as a loaded machine makes it): it must still find the fresh folder fresh, not refuse the
    bank the first one already wrote as "an existing run"."""
    run = tmp_path / "run"
    proc = _launch(tmp_path, "train", str(tiny.cat), "--variant", "ccad-v", "--preset", "tiny", "--image-size", "32",
                   "--steps", "2", "--batch-size", "2", "--size", "8", "--out", str(run), "--quiet",
                   "--option", "diffusion.start_step=50", "--option", "diffusion.steps=2", late_rank_s=8)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2
    det = AnomalyDetector.from_pretrained(str(run / "model"), device="cpu")
    assert det.variant == "ccad-v" and det.info["train_steps"] == 2
