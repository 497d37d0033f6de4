"""Operating points: what a good-only threshold catches, at several target false-alarm rates.

Issue 21 item 1 asks which default target a line wants: escapes (a defect passed as good) cost
more than re-inspections (a good part flagged). For every (dataset, method) this fits the model
once (the benchmarks' own settings, ``benchmarks.common.build_detector``; thresholds from held-out
GOOD images only, never a test label), scores the test split once, then for each ``--targets``
value sets the threshold as ``ccad`` calibrates it (``Calibration.fit(good_scores, fpr=t)``: the
``1 - t`` quantile of the held-out good scores, ``method="higher"``) and reports on the TEST images:
recall (defects flagged), the false-alarm rate on the test's good images, both per defect type,
and how many held-out good images the threshold rests on (with ``n`` images a target below
``1 / n`` is simply their maximum score: ``threshold_is_max_good``). The labels are read only to
report these rates, as every benchmark does; nothing is chosen from them.

Datasets: ``mtd`` (../shared/data/mtd/split.csv), ``multiclass`` (the five synthetic textures of
``python -m benchmarks multiclass``, generated). The DAGM sample (../shared/data/dagm-sample) has
no known-good image (its 6 unlabelled images are not known to be good) and so cannot calibrate a
good-only threshold: it is not a dataset here.

Usage: ``python -m benchmarks operating_points --quick [--datasets mtd,multiclass]
[--methods patchcore,feat-diff] [--targets 0.01,0.02,0.05] [--subset N] [--json PATH]``
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.common import (ALL_CORES, MTD_SPLIT, JsonLines, build_detector, command, default_autoencoder,
                               git_commit, machine, make_parser, parse, settings_for)

DATASETS = ("mtd", "multiclass")


def load_split(name: str, work: Path, mode: str, subset: Optional[int]) -> tuple[list, list]:
    """``(train, test)`` samples of a dataset (every k-th image with ``subset``)."""
    if name == "mtd":
        from ccad.data.layouts import load_csv_manifest

        if not Path(MTD_SPLIT).is_file():
            raise SystemExit(f"error: {MTD_SPLIT} not found (the benchmark reads ../shared/data/mtd/split.csv)")
        train, test = load_csv_manifest(str(MTD_SPLIT), split="train"), load_csv_manifest(str(MTD_SPLIT), split="test")
    elif name == "multiclass":
        from benchmarks.multiclass import generate
        from ccad.data.detect import load_dataset

        root = generate(work / "multiclass-data", mode)
        train, test = list(load_dataset(str(root), split="train")), list(load_dataset(str(root), split="test"))
    elif name.endswith(".csv") and Path(name).is_file():  # any CSV manifest (split, label, mask columns)
        from ccad.data.layouts import load_csv_manifest

        train, test = load_csv_manifest(name, split="train"), load_csv_manifest(name, split="test")
    else:
        raise SystemExit(f"error: unknown dataset {name!r}; known: {', '.join(DATASETS)} or a CSV manifest")
    if subset:
        train = train[::max(1, len(train) // subset)]
        test = test[::max(1, len(test) // subset)]
    return train, test


def operating_rows(det: Any, records: list[dict], targets: list[float]) -> list[dict[str, Any]]:
    """One row per target: the good-only threshold and what it does on the scored test records."""
    from ccad.scoring.threshold import Calibration

    good = np.asarray(det.calibration.good_scores, np.float64)
    scores = np.array([float(r["score"]) for r in records])
    labels = np.array([int(r["label"]) for r in records])
    types = np.array([str(r.get("defect_type") or ("good" if r["label"] == 0 else "defect")) for r in records])
    rows = []
    for t in targets:
        thr = float(Calibration.fit(good, fpr=t).threshold)
        flagged = scores > thr  # ccad's verdict: anomalous above the threshold
        per_type = {d: {"n": int((types == d).sum()), "recall": round(float(flagged[(types == d)].mean()), 4)}
                    for d in sorted(set(types[labels == 1]))}
        rows.append({"target_fpr": t, "threshold": round(thr, 5), "n_threshold_images": int(good.size),
                     "threshold_is_max_good": bool(thr >= good.max()),
                     "recall": round(float(flagged[labels == 1].mean()), 4),
                     "test_fpr": round(float(flagged[labels == 0].mean()), 4),
                     "missed": int((~flagged & (labels == 1)).sum()), "n_defects": int((labels == 1).sum()),
                     "false_alarms": int((flagged & (labels == 0)).sum()), "n_good": int((labels == 0).sum()),
                     "per_type": per_type})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("operating_points", __doc__, quick="CPU mode (the quick settings rows)",
                     workdir="run folders (default: a temporary folder)", threads=ALL_CORES)
    ap.add_argument("--datasets", default=",".join(DATASETS),
                    help=f"comma-separated of {', '.join(DATASETS)} or CSV manifests")
    ap.add_argument("--methods", default="patchcore,feat-diff", help="comma-separated methods")
    ap.add_argument("--targets", default="0.01,0.02,0.05", help="target false-alarm rates, comma-separated")
    ap.add_argument("--subset", type=int, default=None, help="smoke runs: about N train and N test images")
    ap.add_argument("--calibration-fraction", type=float, default=0.1,
                    help="share of the good training images held out (as the mtd benchmark)")
    ap.add_argument("--batch-size", type=int, default=16)
    a = parse(ap, argv)
    from ccad.evaluate import evaluate

    mode = "quick" if a.quick else "full"
    targets = [float(t) for t in a.targets.split(",") if t.strip()]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="ccad-opp-"))
    run = {"commit": git_commit(), "command": command("operating_points", argv), **machine()}
    out = JsonLines(a.json)
    for ds in [d.strip() for d in a.datasets.split(",") if d.strip()]:
        train, test = load_split(ds, work, mode, a.subset)
        for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
            s = settings_for(method, mode, default_autoencoder())
            t0 = time.perf_counter()
            det = build_detector(method, train, s, work / f"{ds}-{method}", calibration_fraction=a.calibration_fraction)
            fit_s = time.perf_counter() - t0
            report = evaluate(det, test, batch_size=a.batch_size)
            for row in operating_rows(det, report.records, targets):
                out.emit({"dataset": ds, "method": method, **row, "image_auroc": round(float(
                    report.per_category["mean"]["image_auroc"]), 4), "fit_seconds": round(fit_s, 1),
                    "n_train": len(train), "mode": mode, "run": run})
    print(f"\n{'dataset':<11}{'method':<11}{'target':>7}{'thr':>10}{'n_thr':>6}{'recall':>8}{'test_fpr':>9}"
          f"{'missed':>8}{'false_al':>9}")
    for r in out.rows:
        print(f"{r['dataset']:<11}{r['method']:<11}{r['target_fpr']:>7.2f}{r['threshold']:>10.4g}"
              f"{r['n_threshold_images']:>6}{r['recall']:>8.3f}{r['test_fpr']:>9.3f}"
              f"{r['missed']:>4}/{r['n_defects']:<3}{r['false_alarms']:>5}/{r['n_good']:<3}")
    print(f"# {run['command']}", file=sys.stderr)
    return 0
