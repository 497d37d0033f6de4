"""Multi-class benchmark: ONE model per latent method over the five synthetic texture classes.

    python -m benchmarks multiclass --quick      # CPU (2 cores), well under 30 min
    python -m benchmarks multiclass              # full (a GPU)

The data is generated, deterministically (seed 0), by ``ccad.data.synthetic.write_dataset`` at
256 x 256: the five classes of ``TEXTURES`` (fibrous, granular, cloud, woven, speckle) in the
MVTec layout, each with good training images, good test images and every defect type
(scratch, spot, blur, stain) with exact masks. Each latent method (ccad-c, ccad-f, deco-diff)
trains ONE model on the good images of all five classes (the dataset root is passed to
``train_detector``; the samples carry their ``category``; the threshold is calibrated on a
good-only slice stratified by class) and is evaluated per class and as the mean over classes,
next to one PatchCore fitted per class. The per-method settings are the rows of
``benchmarks/common.py`` (the quick rows at 128 px model size on CPU, the full rows at 256).

Prints one JSON line per method (``per_class``: the metrics of each class; ``mean``: their mean;
fit_seconds, ms_per_image, peak_ram_mb, device, settings), then a table of image / pixel AUROC
and AUPRO per class. A method that declares an ablation (:attr:`ccad.methods.base.Method.ablation`)
adds a row ``NAME/ablation``: the same model(s) with the learned part replaced by the trivial one
(a second pass over the test images, its own ``ms_per_image``), and the table ends with what each
learned part adds (own minus ablation, signed).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks.common import (ALL_CORES, JsonLines, PeakRSS, build_detector, command, default_autoencoder,
                               false_alarm_fields, git_commit, learned_part_lines, loss_summary, machine, make_parser,
                               parse, parse_options, peak_vram_mb, settings_for)
from ccad.data.detect import load_dataset
from ccad.data.synthetic import TEXTURES, write_dataset
from ccad.evaluate import METRIC_KEYS, evaluate, evaluate_views
from ccad.methods import get_method
from ccad.methods.base import ABLATION_VIEW

SIZES = {  # images per class: good train, good test, defective test per defect type (4 types)
    "quick": {"n_train": 40, "n_test_good": 8, "n_test_defect": 2},
    "full": {"n_train": 200, "n_test_good": 40, "n_test_defect": 10},
}
DEFAULT_METHODS = "patchcore,ccad-c,ccad-f,deco-diff"


def generate(root: Path, mode: str) -> Path:
    """The five classes at 256 x 256, seed 0 (skipped when ``synthetic.json`` says it is the same)."""
    args = {"kinds": list(TEXTURES), "size": [256, 256], "seed": 0, "layout": "mvtec", **SIZES[mode]}
    meta = root / "synthetic.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if all(old.get(k) == v for k, v in args.items()):
            return root
    write_dataset(root, kinds=TEXTURES, size=256, seed=0, layout="mvtec", **SIZES[mode])
    return root


def mean_of(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in METRIC_KEYS:
        vals = [r[k] for r in per_class.values() if r.get(k) is not None and np.isfinite(r[k])]
        out[k] = round(float(np.mean(vals)), 4) if vals else None
    return out


def clean(row: dict[str, float]) -> dict[str, float]:
    return {k: (round(float(row[k]), 4) if row.get(k) is not None and np.isfinite(row[k]) else None)
            for k in METRIC_KEYS}


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("multiclass", __doc__, quick="CPU mode (quick rows, 40 train images per class)",
                     workdir="run folders and the generated set (default: a temporary folder)", autoencoder=True,
                     device=True, threads=ALL_CORES)
    ap.add_argument("--root", default=None, help="where the synthetic set is written (default: a temp folder)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS}); "
                                                                "patchcore is fitted once per class")
    ap.add_argument("--steps", type=int, default=None, help="override every trained method's steps")
    ap.add_argument("--image-size", type=int, default=None, help="override the model image size")
    ap.add_argument("--option", action="append", default=[], metavar="[METHOD:]KEY=VALUE")
    ap.add_argument("--per-class", default=None, metavar="TRAIN,TEST_GOOD,TEST_DEFECT",
                    help="smoke runs: images per class (defective: per defect type) instead of the mode's")
    a = parse(ap, argv)
    if a.per_class:
        n = [int(v) for v in a.per_class.split(",")]
        SIZES["custom"] = {"n_train": n[0], "n_test_good": n[1], "n_test_defect": n[2]}

    mode = "quick" if a.quick else "full"
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="ccad-multiclass-"))
    sizes = "custom" if a.per_class else mode
    root = generate(Path(a.root) if a.root else work / f"synthetic5-256-{sizes}", sizes)
    ae = a.autoencoder or default_autoencoder()
    opts = parse_options(a.option)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    test = load_dataset(root, split="test")
    train_all = [s for s in load_dataset(root, split="train") if s.label == 0]
    run = {"commit": git_commit(), "command": command("multiclass", argv), **machine(),
           "data": {"generator": "ccad.data.synthetic.write_dataset", "classes": list(TEXTURES), "size": 256,
                    "seed": 0, **SIZES[sizes], "n_train_total": len(train_all), "n_test_total": len(test)}}
    print(f"# {json.dumps(run)}", file=sys.stderr, flush=True)
    out = JsonLines(a.json)
    rows = out.rows
    for name in methods:
        trainable = get_method(name).trainable
        s = settings_for(name, mode, ae, {"steps": a.steps if trainable else None, "image_size": a.image_size},
                         {**opts.get("*", {}), **opts.get(name, {})})
        load0 = machine()["loadavg"]
        per_class: dict[str, dict[str, float]] = {}
        ablated: dict[str, dict[str, float]] = {}  # the ablation view per class (methods that declare one)
        fit_s = infer_s = abl_s = 0.0
        n_eval = 0
        extra: dict = {}

        def ablation_of(det: object, items: list) -> object:
            nonlocal abl_s
            t = time.perf_counter()
            rep = evaluate_views(det, items, batch_size=16, views=(ABLATION_VIEW,))[ABLATION_VIEW]
            abl_s += time.perf_counter() - t
            return rep
        with PeakRSS() as mem:
            if get_method(name).multi_class:
                t0 = time.perf_counter()
                det = build_detector(name, str(root), s, work / name, calibration_fraction=0.1, device=device,
                                     latent_cache=work / f"latents-{s['image_size']}")
                fit_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                rep = evaluate(det, test, batch_size=16)
                infer_s = time.perf_counter() - t1
                n_eval = len(rep.records)
                per_class = {c: clean(r) for c, r in rep.per_category.items() if c != "mean"}
                if ABLATION_VIEW in det.views:
                    ablated = {c: clean(r) for c, r in ablation_of(det, test).per_category.items() if c != "mean"}
                judged = false_alarm_fields(rep.records, det)
                extra = {"models": 1, "threshold": det.threshold, "categories_trained": det.info.get("categories"),
                         "loss": loss_summary(work / name) if trainable else None}
            else:  # one model per class
                thresholds = {}
                records: list[dict] = []
                for kind in TEXTURES:
                    t0 = time.perf_counter()
                    det = build_detector(name, str(root / kind), s, work / f"{name}-{kind}", calibration_fraction=0.1,
                                         device=device)
                    fit_s += time.perf_counter() - t0
                    cls_test = [x for x in test if x.category == kind]
                    t1 = time.perf_counter()
                    rep = evaluate(det, cls_test, batch_size=16)
                    infer_s += time.perf_counter() - t1
                    n_eval += len(rep.records)
                    per_class[kind] = clean(rep.per_category.get(kind) or rep.per_category["mean"])
                    thresholds[kind] = det.threshold
                    if ABLATION_VIEW in det.views:
                        ab = ablation_of(det, cls_test)
                        ablated[kind] = clean(ab.per_category.get(kind) or ab.per_category["mean"])
                    records += [{**r, "threshold": det.threshold} for r in rep.records]
                    per_class[kind].update(false_alarm_fields(rep.records, det))
                extra = {"models": len(TEXTURES), "thresholds": thresholds}
                # pooled over the classes, each image judged against its own class's threshold
                good = [r for r in records if int(r["label"]) == 0]
                bad = [r for r in records if int(r["label"]) == 1]
                judged = {**{k: v for k, v in false_alarm_fields([], det).items() if k == "target_fpr"},
                          "test_good_fpr": round(sum(r["score"] > r["threshold"] for r in good) / max(len(good), 1), 4),
                          "test_good_false_alarms": int(sum(r["score"] > r["threshold"] for r in good)),
                          "test_good_n": len(good),
                          "test_recall": round(sum(r["score"] > r["threshold"] for r in bad) / max(len(bad), 1), 4),
                          "test_defect_n": len(bad)}
        row = {"method": name, "per_class": per_class, "mean": mean_of(per_class), **judged,
               "fit_seconds": round(fit_s, 1),
               "ms_per_image": round(1000 * infer_s / max(n_eval, 1), 1), "peak_ram_mb": mem.peak_mb,
               "peak_vram_mb": peak_vram_mb(), "device": device,
               "settings": {**s, **extra, "mode": mode, "n_test": n_eval, "loadavg_start": load0,
                            "loadavg_end": machine()["loadavg"], "run": run}}
        if ablated:
            row["settings"]["ablation"] = det.method.ablation
        out.emit(row)
        if ablated:
            out.emit({**row, "method": f"{name}/{ABLATION_VIEW}", "per_class": ablated, "mean": mean_of(ablated),
                      "ms_per_image": round(1000 * abl_s / max(n_eval, 1), 1),
                      "settings": {**row["settings"], "view": ABLATION_VIEW}})
    print()
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        print(f"{key:<20}" + "".join(f"{c:>10}" for c in (*TEXTURES, "mean")))
        for r in rows:
            vals = [r["per_class"].get(c, {}).get(key) for c in TEXTURES] + [r["mean"][key]]
            print(f"{r['method']:<20}" + "".join(f"{'-' if v is None else f'{v:.4f}':>10}" for v in vals))
        print()
    for line in learned_part_lines(rows, metrics=lambda r: r["mean"]):
        print(line)
    return 0
