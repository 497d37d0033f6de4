"""Scoring levers on already trained MTD models: one JSON line per (model, arm, view).

    python -m benchmarks experiments.levers --workdir /tmp/mtd-run/work --methods deco-diff,d3ad \\
        --arm fusion_weight_fit=synthetic --arm feature_match=neighbourhood --json levers.jsonl

``python -m benchmarks mtd`` saves every trained model in ``WORKDIR/<method>/model`` (fused with the
bank's nearest-neighbour map when it ran with ``--fusion both``, its default). This script loads
each one, applies an arm (``KEY=VALUE`` fields of the scoring config, several per arm joined by
``,``), re-calibrates on the same held-out good slice the model was calibrated on (10 % of the
good training images, the same seed: the fusion normalisation, a fitted fusion weight and the
threshold all come from good images), and evaluates the ``method`` (unfused) and ``fused``
views on the test split from one pass. The ``baseline`` arm is the model as saved. Nothing here
reads a test label before the metrics; each arm is a lever measured, not a choice made.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from benchmarks.common import (ALL_CORES, JsonLines, add_saved_model_args, command, git_commit, machine, make_parser,
                               parse, saved_model_split)
from ccad.config import set_option
from ccad.evaluate import METRIC_KEYS, evaluate_views
from ccad.pipeline import AnomalyDetector

def parse_arm(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --arm {text!r}: expected KEY=VALUE[,KEY=VALUE]")
        out[key.strip()] = value.strip()
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("experiments.levers", __doc__, threads=ALL_CORES)
    add_saved_model_args(ap)
    ap.add_argument("--arm", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="scoring-config fields of one arm (repeatable); 'baseline' is always run first")
    ap.add_argument("--no-baseline", action="store_true", help="skip the model as saved")
    a = parse(ap, argv)

    # the slice mtd.py calibrated on (a fused model's: grown to one selection + one threshold image at least)
    test, cal = saved_model_split(a.data, a.subset, at_least=2)
    arms = ([] if a.no_baseline else [("baseline", {})]) + [(arm, parse_arm(arm)) for arm in a.arm]
    run = {"commit": git_commit(), "command": command("experiments.levers", argv), **machine()}
    out = JsonLines(a.json)
    rows = out.rows
    for name in [m.strip() for m in a.methods.split(",") if m.strip()]:
        folder = Path(a.workdir) / name / "model"
        for label, fields in arms:
            det = AnomalyDetector.from_pretrained(folder)
            for key, value in fields.items():
                set_option(det.config.scoring, key, value, "--arm")
            det.config.validate()
            det.method.ctx.scoring = det.config.scoring
            t0 = time.perf_counter()
            if fields:
                det.calibrate(cal, batch_size=a.batch_size)
            reports = evaluate_views(det, test, batch_size=a.batch_size, views=tuple(v for v in ("method", "fused")
                                                                                 if v in det.views))
            secs = time.perf_counter() - t0
            for view, rep in reports.items():
                m = rep.per_category["mean"]
                row = {"method": name if view == "method" else f"{name}+bank", "arm": label,
                       **{k: round(float(m[k]), 4) for k in METRIC_KEYS}, "seconds": round(secs, 1),
                       "settings": {"view": view, "arm": fields, "model": str(folder),
                                    "fusion": det.fusion.card() if det.fusion is not None else None,
                                    "n_test": len(rep.records), "n_calibration": len(cal), "run": run}}
                out.emit(row)
    print()
    keys = ["image_auroc", "pixel_auroc", "pixel_aupro"]
    print(f"{'method':<16}{'arm':<40}" + "".join(f"{k:>13}" for k in keys))
    for r in rows:
        print(f"{r['method']:<16}{r['arm'][:39]:<40}" + "".join(f"{r[k]:>13}" for k in keys))
    return 0
