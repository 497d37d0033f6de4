"""MTD benchmark: every method on the fixed Magnetic Tile Defect split, through one code path.

    python -m benchmarks mtd --quick        # CPU (2 cores): reduced budgets, whole default run <= 30 min
    python -m benchmarks mtd                # full size (a GPU)
    python -m benchmarks mtd --quick --methods deco-diff --steps 20      # a smoke run

Methods (default: patchcore,ccad-v,ccad-c,ccad-f,deco-diff): each has a row of settings per mode
in ``benchmarks/common.py`` (image size, preset, steps, batch size, lr, method-config fields set
with ``ccad.config.set_option``, its budget); ``--option [METHOD:]key=value`` adds fields.
Trained methods go through ``train_detector(train, run_dir, variant=name, method=cfg,
train=TrainConfig(...))``; PatchCore (``trainable=False``) through ``fit_detector``. The latent
methods encode with TAEF2 (``--autoencoder``; default ``taef2:../shared/weights``, or
``taef2:.device/weights``). On the GPU machine ../shared is absent: copy the weights along,
``mkdir -p .device/weights && cp ../shared/weights/taef2_*.pth .device/weights/`` here (5.4 MB;
device_pack.py has no option for extra files), then they are found automatically.

Thresholds are calibrated on 10 % of the good training images; no setting reads a test label.

Prints one JSON line per method with the keys method, image_auroc, image_ap, image_f1max,
pixel_auroc, pixel_ap, pixel_f1max, pixel_aupro, fit_seconds, ms_per_image, peak_ram_mb,
peak_vram_mb, device, settings; then a table. Data: ../shared/data/mtd/split.csv (read-only; any
CSV manifest with ``--data``).
Reference (paper Table 3, image/pixel AUROC): CCAD(V) 0.897/0.755, CCAD(C) 0.959/0.826,
CCAD(F) 0.968/0.818; anomalib 2.7 PatchCore (lite0, 256 px, CPU) 0.965/0.822, AUPRO 0.728.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import (ALL_CORES, DEFAULT_METHODS, MTD_SPLIT, JsonLines, PeakRSS, build_detector, command,
                               default_autoencoder, false_alarm_fields, git_commit, learned_part_lines, loss_summary,
                               machine, make_parser, parse, parse_options, peak_vram_mb, settings_for)
from ccad.data.layouts import load_csv_manifest
from ccad.evaluate import METRIC_KEYS, evaluate, evaluate_views
from ccad.methods import get_method
from ccad.methods.base import ABLATION_VIEW

DEFAULT_DATA = MTD_SPLIT
TABLE_KEYS = ["image_auroc", "pixel_auroc", "pixel_aupro", "image_ap", "pixel_ap", "fit_seconds", "ms_per_image",
              "peak_ram_mb"]


def fusion_memory_from(det: object, s: dict) -> object:
    """The PatchCore row's fitted memory, when it matches what a fused method would fit itself
    (same training images; the fusion defaults: 256 px, ratio 0.01, the bank's backbone/layers)."""
    from ccad.config import BankConfig, ScoringConfig

    sc = getattr(getattr(det, "method", None), "scorer", None)
    want, bank = ScoringConfig(), BankConfig()
    if sc is None or sc.image_size != want.fusion_image_size or abs(sc.ratio - want.fusion_ratio) > 1e-12:
        return None
    cfg = sc.config()
    if cfg["backbone"] != (s.get("backbone") or bank.backbone) or tuple(cfg["layers"]) != tuple(
            s.get("layers") or bank.layers):
        return None
    return sc


def run_method(name: str, train: list, test: list, s: dict, mode: str, device: str, work: Path,
               latent_cache: Path, batch_size: int, fuse: bool = False, fusion_memory: object = None
               ) -> tuple[list[dict], object]:
    """One method's rows. A trained method with ``fuse`` gives three rows from one model and one pass
    over the test images: its own map (``name``), the fused map (``name+bank``) and the fusion
    memory's nearest-neighbour map alone (``name/bank``). A method that declares an ablation
    (:attr:`ccad.methods.base.Method.ablation`) adds ``name/ablation``: the same saved model with its
    learned part replaced by the trivial one, scored in a second pass (its own ``ms_per_image``)."""
    run_dir = work / name
    load_start = machine()["loadavg"]
    fuse = fuse and get_method(name).trainable
    if fuse:
        s = {**s, "scoring": {**s.get("scoring", {}), "fusion": "bank"}}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        det = build_detector(name, train, s, run_dir, calibration_fraction=0.1, device=device,
                             latent_cache=latent_cache, fusion_memory=fusion_memory if fuse else None)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if fuse:
            reports = evaluate_views(det, test, batch_size=batch_size, views=("method", "fused", "bank"))
        else:
            reports = {None: evaluate(det, test, batch_size=batch_size)}
        infer_s = time.perf_counter() - t1
        seconds = {v: infer_s for v in reports}
        if ABLATION_VIEW in det.views:
            t2 = time.perf_counter()
            reports.update(evaluate_views(det, test, batch_size=batch_size, views=(ABLATION_VIEW,)))
            seconds[ABLATION_VIEW] = time.perf_counter() - t2
    n = len(next(iter(reports.values())).records)
    errors = len(next(iter(reports.values())).errors)
    extra = {"n_train": len(train), "n_test": n, "threshold": det.threshold, "unreadable": errors,
             "mode": mode, "trained": bool(get_method(name).trainable), "eval_batch_size": batch_size,
             "loadavg_start": load_start, "loadavg_end": machine()["loadavg"]}
    if get_method(name).trainable:
        extra["loss"] = loss_summary(run_dir)
        extra["train_seconds"] = det.info.get("train_seconds")
    if fuse:
        extra["fusion"] = {**det.fusion.card(), "memory_reused_from_patchcore_row": fusion_memory is not None,
                           "note": "both rows come from one model and one pass over the test images; "
                                   "ms_per_image is that shared pass (method map + bank map); the threshold "
                                   "is the fused row's"}
    if ABLATION_VIEW in seconds:
        extra["ablation"] = det.method.ablation
    rows = []
    for view, report in reports.items():
        m = report.per_category["mean"]
        label = {None: name, "method": name, "fused": f"{name}+bank"}.get(view, f"{name}/{view}")
        # the threshold is the scored view's own only without fusion, or for the fused view
        judged = false_alarm_fields(report.records, det) if view in (None, "fused") else {}
        rows.append({"method": label, **{k: round(float(m[k]), 4) for k in METRIC_KEYS}, **judged,
                     "fit_seconds": round(fit_s, 1), "ms_per_image": round(1000 * seconds[view] / max(n, 1), 1),
                     "peak_ram_mb": mem.peak_mb, "peak_vram_mb": peak_vram_mb(), "device": device,
                     "settings": {**s, **extra, "view": view or "method"}})
    return rows, det


def print_table(rows: list[dict]) -> None:
    """One row per method and view (own map, ``+bank`` fused, ``/bank`` the nearest-neighbour map
    alone, ``/ablation`` the learned part replaced), then per method what its learned part adds
    (its own row minus its ablation row, signed)."""
    print(f"{'method':<20}" + "".join(f"{k:>13}" for k in TABLE_KEYS))
    for r in rows:
        print(f"{r['method']:<20}" + "".join(f"{r[k]:>13}" for k in TABLE_KEYS))
    for line in learned_part_lines(rows):
        print(line)


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("mtd", __doc__, quick="CPU mode: the quick budgets (whole default run <= 30 min)",
                     workdir="run folders (default: a temporary folder)", autoencoder=True, device=True,
                     threads=ALL_CORES)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="MTD split.csv (or any CSV manifest)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    ap.add_argument("--steps", type=int, default=None, help="override every trained method's training steps")
    ap.add_argument("--image-size", type=int, default=None, help="override every method's image size")
    ap.add_argument("--scoring", action="append", default=[], metavar="KEY=VALUE",
                    help="a scoring-config field for every method (as ccad train --scoring), e.g. target_fpr=0.01")
    ap.add_argument("--option", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                    help="a method-config field (dotted, as ccad train --option), for METHOD or every method")
    ap.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    ap.add_argument("--subset", type=int, default=None,
                    help="smoke runs: every k-th train and test image so that about N of each remain")
    ap.add_argument("--fusion", choices=["both", "off"], default="both",
                    help="both (default): every trained method also gives a fused row (its map + the bank's "
                         "nearest-neighbour map, normalised on held-out good images) next to its own row, "
                         "from the same model; off: its own row only")
    a = parse(ap, argv)

    if not Path(a.data).is_file():
        print(f"error: {a.data} not found (the benchmark reads ../shared/data/mtd/split.csv)", file=sys.stderr)
        return 2
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    mode = "quick" if a.quick else "full"
    ae = a.autoencoder or default_autoencoder()
    opts = parse_options(a.option)
    try:
        table = {m: settings_for(m, mode, ae, {"steps": a.steps if get_method(m).trainable else None,
                                                "image_size": a.image_size}, {**opts.get("*", {}), **opts.get(m, {})})
                 for m in methods}
        scoring = parse_options(a.scoring).get("*", {})
        for s in table.values():  # each row's own scoring fields, then the command line's
            s["scoring"] = {**s.get("scoring", {}), **scoring}
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train = load_csv_manifest(a.data, split="train")
    test = load_csv_manifest(a.data, split="test")
    if a.subset:
        train = train[::max(1, len(train) // a.subset)]
        test = test[::max(1, len(test) // a.subset)]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="ccad-mtd-"))
    run_info = {"commit": git_commit(), "command": command("mtd", argv), **machine()}
    print(f"# {json.dumps(run_info)}", file=sys.stderr, flush=True)
    out = JsonLines(a.json)
    t_all = time.perf_counter()
    memory = None
    for method in methods:
        s = table[method]
        cache = work / f"latents-{s['image_size']}"
        new, det = run_method(method, train, test, s, mode, device, work, cache, a.batch_size,
                              fuse=a.fusion == "both", fusion_memory=memory)
        if memory is None:
            memory = fusion_memory_from(det, s)  # the PatchCore row's memory serves the fused rows
        for row in new:  # written as each method finishes, so a long run keeps what it has
            row["settings"]["run"] = run_info
            out.emit(row)
    print()
    print_table(out.rows)
    print(f"\n# total {time.perf_counter() - t_all:.0f} s; loadavg at end {machine()['loadavg']}")
    return 0
