"""Resize modes side by side (issue 24 item 3): ``square`` / ``keep-aspect`` / ``tile``.

    python -m benchmarks resize_modes --quick                        # synthetic + MTD, PatchCore, CPU
    python -m benchmarks resize_modes --quick --subset 150           # MTD: every k-th image, ~150 each
    python -m benchmarks resize_modes --quick --skip-mtd             # the synthetic part only

Two data sets, PatchCore (the quick MTD row of ``benchmarks/common.py``: lite0 layers 2+3, bank
200, memory 1 % of the patches), one model per mode, built and scored through the public API
(``fit_detector(..., resize=MODE)``, ``predict_many``):

* ``elongated``: generated granular textures of ``--elong-shape`` (default 64 x 320) scored by a
  64 px model; every test defect is a thin dark line 1-2 px wide running across the long axis
  (its width lies along the long side, which a square resize compresses 5x), its mask exact.
* ``mtd``: the Magnetic Tile Defect split (``--data``), images of many shapes (about 200-600 px),
  at 256 px, thresholds on 10 % of the good training images.

Every mode is judged the same way: the map ``predict`` returns (at the image's own size) against
the full-size mask, so ``square`` is not favoured by comparing at its own squashed grid. Rows:
image AUROC, pixel AUROC, pixel AUPRO, fit seconds, ms/image (predict, batch 8) and the load
average before and after (the machine is shared). One JSON line per (data, mode), then a table.
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.common import (MTD_SPLIT, JsonLines, PeakRSS, command, git_commit, machine, make_parser, parse,
                               settings_for)

MODES = ("square", "keep-aspect", "tile")
TABLE_KEYS = ["image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds", "ms_per_image", "n_test"]


def write_elongated(root: Path, shape: tuple[int, int] = (64, 320), n_train: int = 12, n_good: int = 4,
                    n_defect: int = 8, seed: int = 0) -> tuple[list, list]:
    """Elongated granular textures (``shape`` = H x W, W the long side) as PNGs under ``root``:
    ``n_train`` good training images and a test set of ``n_good`` good and ``n_defect`` images
    with one thin dark line each (1 or 2 px wide, across the long axis, 2/3 of the short side
    long, at a random column), masks beside them. Returns ``(train, test)`` samples."""
    from PIL import Image

    from ccad.data.sample import Sample
    from ccad.data.synthetic import generate_texture

    h, w = shape
    rng = np.random.default_rng(seed)

    def save(path: Path, a: np.ndarray) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).save(path)
        return str(path)

    train = [Sample(save(root / "train" / f"{i:03d}.png", generate_texture("granular", (h, w), seed=seed * 1000 + i)),
                    None, 0, split="train") for i in range(n_train)]
    test = [Sample(save(root / "test" / "good" / f"{i:03d}.png",
                        generate_texture("granular", (h, w), seed=seed * 1000 + 500 + i)), None, 0)
            for i in range(n_good)]
    for i in range(n_defect):
        t = generate_texture("granular", (h, w), seed=seed * 1000 + 700 + i).copy()
        m = np.zeros((h, w), bool)
        width = 1 + i % 2
        col = int(rng.integers(w // 8, w - w // 8 - width))
        top = int(rng.integers(0, h // 3))
        m[top:top + (2 * h) // 3, col:col + width] = True
        t[m] = np.clip(t[m] - 0.3, 0, 1)
        img = save(root / "test" / "line" / f"{i:03d}.png", t)
        mask = save(root / "ground_truth" / "line" / f"{i:03d}_mask.png", m.astype(np.float32))
        test.append(Sample(img, mask, 1, defect_type="line"))
    return train, test


def native_report(det: Any, test: list, batch_size: int = 8) -> dict[str, Any]:
    """Metrics of ``det`` on ``test`` from the maps ``predict_many`` returns (each at its image's
    size) against full-size masks, and the ms/image of that predict pass."""
    from ccad.data.dataset import load_sample_mask
    from ccad.metrics import compute_metrics

    t0 = time.perf_counter()
    preds, errors = det.predict_many([s.image_path for s in test], batch_size=batch_size)
    seconds = time.perf_counter() - t0
    by_path = {p.path: p for p in preds}
    labels, scores, maps, masks = [], [], [], []
    for s in test:
        p = by_path.get(s.image_path)
        if p is None:
            continue
        m = load_sample_mask(s, p.anomaly_map.shape)
        labels.append(int(s.label))
        scores.append(float(p.score))
        maps.append(p.anomaly_map)
        masks.append(np.zeros(p.anomaly_map.shape, bool) if m is None else np.asarray(m) > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = compute_metrics(np.asarray(labels), np.asarray(scores), masks, maps)
    return {**{k: round(float(v), 4) for k, v in metrics.items()}, "ms_per_image":
            round(1000 * seconds / max(1, len(preds)), 1), "n_test": len(preds), "unreadable": len(errors)}


def run_mode(data: str, mode: str, train: list, test: list, settings: dict, device: str, stride: Optional[int],
             run: dict) -> dict[str, Any]:
    from ccad.data.framing import tile_stride
    from ccad.methods import get_method
    from ccad.pipeline import fit_detector

    cfg = get_method("patchcore").default_config()
    cfg.ratio = float(settings["options"]["ratio"])
    load_start = machine()["loadavg"]
    with PeakRSS() as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the aspect-ratio warning of square is the point of the comparison
        t0 = time.perf_counter()
        det = fit_detector(train, image_size=settings["image_size"], bank_size=settings["bank_size"],
                           backbone=settings["backbone"], layers=settings["layers"], method=cfg,
                           calibration_fraction=0.1, device=device, resize=mode, tile_stride=stride)
        fit_s = time.perf_counter() - t0
        rep = native_report(det, test)
    return {"data": data, "mode": mode, "method": "patchcore", **rep, "fit_seconds": round(fit_s, 1),
            "peak_ram_mb": mem.peak_mb, "threshold": round(det.threshold, 6), "device": device,
            "settings": {"image_size": settings["image_size"], "bank_size": settings["bank_size"],
                         "backbone": settings["backbone"], "layers": list(settings["layers"]),
                         "ratio": cfg.ratio,
                         "tile_stride": tile_stride(det.input_size, det.config.tile_stride) if mode == "tile" else None,
                         "n_train": det.info.get("n_train_images"), "n_train_inputs": det.info.get("n_train_inputs"),
                         "judged": "predict's map at the image's own size vs the full-size mask",
                         "loadavg_start": load_start, "loadavg_end": machine()["loadavg"], "run": run}}


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("resize_modes", __doc__, quick="CPU mode (the quick PatchCore row)",
                     workdir="where the generated images go (default: a temporary folder)", device=True, threads=None)
    ap.add_argument("--data", default=str(MTD_SPLIT), help="MTD split.csv (or any CSV manifest)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated (default {','.join(MODES)})")
    ap.add_argument("--subset", type=int, default=None, help="MTD: every k-th train and test image, about N of each")
    ap.add_argument("--skip-mtd", action="store_true", help="the generated elongated images only")
    ap.add_argument("--skip-synthetic", action="store_true", help="MTD only")
    ap.add_argument("--tile-stride", type=int, default=None, help="tile stride (default: half the model's size)")
    ap.add_argument("--elong-shape", default="64x320", help="H x W of the generated images (default 64x320)")
    ap.add_argument("--elong-size", type=int, default=64, help="model input size on the generated images")
    a = parse(ap, argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"error: --modes: unknown mode(s) {bad}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = {"commit": git_commit(), "command": command("resize_modes", argv), **machine()}
    print(f"# {run}", file=sys.stderr, flush=True)
    out = JsonLines(a.json)
    pc = settings_for("patchcore", "quick" if a.quick else "full", "")
    if not a.skip_synthetic:
        h, w = (int(v) for v in a.elong_shape.lower().split("x"))
        work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="ccad-resize-"))
        train, test = write_elongated(work / "elongated", (h, w))
        s = {**pc, "image_size": int(a.elong_size)}
        for mode in modes:
            out.emit(run_mode(f"elongated {h}x{w}", mode, train, test, s, device, a.tile_stride, run))
    if not a.skip_mtd:
        if not Path(a.data).is_file():
            print(f"error: {a.data} not found (the MTD part reads ../shared/data/mtd/split.csv; --skip-mtd to "
                  f"run without it)", file=sys.stderr)
            return 2
        from ccad.data.layouts import load_csv_manifest

        train = load_csv_manifest(a.data, split="train")
        test = load_csv_manifest(a.data, split="test")
        if a.subset:
            train = train[::max(1, len(train) // a.subset)]
            test = test[::max(1, len(test) // a.subset)]
        name = "mtd" + (f" subset {a.subset}" if a.subset else "")
        for mode in modes:
            out.emit(run_mode(name, mode, train, test, pc, device, a.tile_stride, run))
    print()
    print(f"{'data':<22}{'mode':<13}" + "".join(f"{k:>13}" for k in TABLE_KEYS))
    for r in out.rows:
        print(f"{r['data']:<22}{r['mode']:<13}" + "".join(f"{r[k]:>13}" for k in TABLE_KEYS))
    print(f"\n# loadavg at end {machine()['loadavg']}")
    return 0
