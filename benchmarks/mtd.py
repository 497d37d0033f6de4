"""MTD benchmark: PatchCore and CCAD(V) on the fixed Magnetic Tile Defect split.

    python benchmarks/mtd.py --quick        # CPU, reduced size, < 15 minutes
    python benchmarks/mtd.py                # full size (a GPU)

Prints one JSON line per method with the keys method, image_auroc, image_ap, image_f1max,
pixel_auroc, pixel_ap, pixel_f1max, pixel_aupro, fit_seconds, ms_per_image, peak_ram_mb,
peak_vram_mb, device, settings; then a table. Data: ../shared/data/mtd/split.csv (read-only).
Reference (paper Table 3, image/pixel AUROC): CCAD(V) 0.897/0.755, CCAD(C) 0.959/0.826,
CCAD(F) 0.968/0.818; anomalib 2.7 PatchCore (lite0, 256 px, CPU) 0.965/0.822, AUPRO 0.728.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ccad.data.datasets import load_csv_manifest  # noqa: E402
from ccad.evaluate import METRIC_KEYS, evaluate  # noqa: E402
from ccad.pipeline import fit_detector, train_detector  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mtd" / "split.csv"


class PeakRSS:
    """Samples the process RSS in a thread; ``peak_mb`` is the high-water mark while active."""

    def __init__(self, every: float = 0.05) -> None:
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def peak_vram_mb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else 0.0


def run_method(name: str, fit, test, settings: dict, device: str, batch_size: int) -> dict:
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        det = fit()
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        report = evaluate(det, test, batch_size=batch_size)
        infer_s = time.perf_counter() - t1
    m = report.per_category["mean"]
    n = len(report.records)
    row = {"method": name, **{k: round(float(m[k]), 4) for k in METRIC_KEYS}, "fit_seconds": round(fit_s, 1),
           "ms_per_image": round(1000 * infer_s / max(n, 1), 1), "peak_ram_mb": mem.peak_mb,
           "peak_vram_mb": peak_vram_mb(), "device": device,
           "settings": {**settings, "n_train": settings.get("n_train"), "n_test": n, "threshold": det.threshold,
                        "unreadable": len(report.errors)}}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU mode at reduced size (< 15 min)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="MTD split.csv")
    ap.add_argument("--methods", default="patchcore,ccad-v", help="comma-separated: patchcore, ccad-v")
    ap.add_argument("--steps", type=int, default=None, help="override CCAD(V) training steps")
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    a = ap.parse_args()

    if not Path(a.data).is_file():
        print(f"error: {a.data} not found (the benchmark reads ../shared/data/mtd/split.csv)", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = load_csv_manifest(a.data, split="train")
    test = load_csv_manifest(a.data, split="test")
    if a.quick:
        pc = {"image_size": 256, "backbone": "tf_efficientnet_lite0", "layers": (2, 3), "patchcore_ratio": 0.01,
              "bank_size": 200}
        cv = {"image_size": 128, "preset": "tiny", "steps": 240, "batch_size": 8, "lr": 1e-3, "start_step": 250,
              "ddim_steps": 5, "guidance": 2.0, "score_layers": (1, 2, 3)}
    else:
        pc = {"image_size": 256, "backbone": "tf_efficientnet_lite0", "layers": (2, 3), "patchcore_ratio": 0.01,
              "bank_size": 200}
        cv = {"image_size": 256, "preset": "base", "steps": 20000, "batch_size": 32, "lr": 3e-4, "start_step": 250,
              "ddim_steps": 10, "guidance": 2.0, "score_layers": (1, 2, 3)}
    if a.steps is not None:
        cv["steps"] = a.steps
    rows = []
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for method in methods:
        if method == "patchcore":
            settings = {**pc, "n_train": len(train), "mode": "quick" if a.quick else "full"}
            row = run_method("patchcore", lambda: fit_detector(
                train, backbone=pc["backbone"], layers=pc["layers"], bank_size=pc["bank_size"],
                image_size=pc["image_size"], patchcore_ratio=pc["patchcore_ratio"], calibration_fraction=0.1),
                test, settings, device, batch_size=16)
        elif method == "ccad-v":
            settings = {**cv, "n_train": len(train), "mode": "quick" if a.quick else "full"}
            run_dir = Path(tempfile.mkdtemp(prefix="ccad-mtd-"))
            row = run_method("ccad-v", lambda: train_detector(
                train, run_dir, preset=cv["preset"], image_size=cv["image_size"], steps=cv["steps"],
                batch_size=cv["batch_size"], lr=cv["lr"], calibration_fraction=0.1,
                diffusion={"start_step": cv["start_step"], "steps": cv["ddim_steps"], "guidance": cv["guidance"]},
                scoring={"score_layers": tuple(cv["score_layers"])},
                train_options={"checkpoint_every": max(cv["steps"], 1), "warmup_steps": min(100, cv["steps"] // 10),
                               "show_progress": False}),
                test, settings, device, batch_size=16)
        else:
            print(f"error: unknown method {method!r}", file=sys.stderr)
            return 2
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        Path(a.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print()
    keys = ["image_auroc", "pixel_auroc", "pixel_aupro", "image_ap", "pixel_ap", "fit_seconds", "ms_per_image",
            "peak_ram_mb"]
    print(f"{'method':<10}" + "".join(f"{k:>13}" for k in keys))
    for r in rows:
        print(f"{r['method']:<10}" + "".join(f"{r[k]:>13}" for k in keys))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
