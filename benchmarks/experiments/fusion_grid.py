"""The fusion weight grid of a saved, fused MTD model: what the good-only fit saw, and the ceiling.

    python -m benchmarks experiments.fusion_grid --workdir /tmp/mtd-run/work --methods deco-diff --json grid.jsonl

``python -m benchmarks mtd`` saves each fused model in ``WORKDIR/<method>/model``. This script computes
the two components of its map (the method's map and the bank's nearest-neighbour map) once, on
the held-out good slice the model was calibrated on, on copies of those images with a synthetic
anomaly each (what ``scoring.fusion_weight_fit = "synthetic"`` fits on), and on the MTD test
split; then, for every normalisation and every weight of the fit's grid
(:data:`ccad.scoring.fusion.WEIGHT_GRID`), it prints one JSON line with the synthetic-set
metrics and the test metrics of that fused map.

**The test columns of this table are not a result**: picking a row by them would be tuning on
test labels. The table answers two other questions: does the fit's objective (synthetic
anomalies of good images) rank the weights the way the real defects do, and what is the best
any weight of this fusion could do on this model (the ceiling, an oracle). ``"chosen": true``
marks the row the good-only fit picks (the objective of
:meth:`ccad.scoring.fusion.BankFusion.fit_weight`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks.common import (ALL_CORES, JsonLines, add_saved_model_args, command, git_commit, machine, make_parser,
                               parse, saved_model_split)
from ccad.data.anomaly_synth import synthesize_batch
from ccad.data.dataset import iter_batches
from ccad.metrics import aupro, auroc, pixel_auroc
from ccad.pipeline import AnomalyDetector
from ccad.scoring.fusion import NORMS, WEIGHT_GRID

def parts(det: AnomalyDetector, samples: list, batch_size: int, synthetic: bool = False) -> dict[str, torch.Tensor]:
    """Method and bank maps (``N x 1 x S x S``, float16 to save memory), labels and masks; with
    ``synthetic`` also those of a synthetic-anomaly copy of each image (the calibration's recipe:
    same generator seed, ratio 1)."""
    out: dict[str, list] = {k: [] for k in ("m", "b", "y", "k", "sm", "sb", "sk")}
    gen = torch.Generator().manual_seed(0)
    for b in iter_batches(samples, det.input_size, batch_size, on_error="skip"):
        m, bank, _ = det.map_parts(b["image"])
        out["m"].append(m.cpu().half())
        out["b"].append(bank.cpu().half())
        out["y"].append(torch.as_tensor(np.asarray(b["label"]).reshape(-1)))
        out["k"].append(b["mask"][:, :1] > 0.5)
        if synthetic:
            xa, masks = synthesize_batch(b["image"].float(), gen, ratio=1.0)
            ma, ba, _ = det.map_parts(xa)
            out["sm"].append(ma.cpu().half())
            out["sb"].append(ba.cpu().half())
            out["sk"].append(masks.cpu() > 0.5)
    return {k: torch.cat(v) for k, v in out.items() if v}


def metrics(det: AnomalyDetector, maps: torch.Tensor, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Image AUROC (the detector's own image score), pixel AUROC and AUPRO, to 5 decimals as
    :meth:`ccad.scoring.fusion.BankFusion.fit_weight` rounds them before it compares."""
    scores = det._score(maps).numpy()
    return {"image_auroc": round(float(auroc(labels, scores)), 5),
            "pixel_auroc": round(float(pixel_auroc(masks, maps[:, 0].numpy())), 5),
            "pixel_aupro": round(float(aupro(masks, maps[:, 0].numpy())), 5)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("experiments.fusion_grid", __doc__, threads=ALL_CORES)
    add_saved_model_args(ap, "fused models")
    a = parse(ap, argv)

    test, cal = saved_model_split(a.data, a.subset)  # the slice mtd.py calibrated on
    run = {"commit": git_commit(), "command": command("experiments.fusion_grid", argv), **machine()}
    out = JsonLines(a.json)
    rows = out.rows
    for name in [m.strip() for m in a.methods.split(",") if m.strip()]:
        folder = Path(a.workdir) / name / "model"
        det = AnomalyDetector.from_pretrained(folder)
        if det.fusion is None:
            raise SystemExit(f"error: {folder}: not a fused model (scoring.fusion is 'none')")
        t0 = time.perf_counter()
        c = parts(det, cal, a.batch_size, synthetic=True)
        t = parts(det, test, a.batch_size)
        secs = time.perf_counter() - t0
        cm, cb, tm, tb = (c["m"].float(), c["b"].float(), t["m"].float(), t["b"].float())
        fusion = det.fusion
        fusion.fit_stats(cm, cb)  # the normalisation on the good slice, as calibrate() fits it
        syn_labels = np.r_[np.zeros(len(cm)), np.ones(len(c["sm"]))]
        syn_masks = torch.cat([torch.zeros_like(c["k"]), c["sk"]])[:, 0].numpy()
        test_labels, test_masks = t["y"].numpy(), t["k"][:, 0].numpy()
        grid = []
        for norm in NORMS:
            for w in WEIGHT_GRID:
                fusion.norm, fusion.weight = norm, float(w)  # the product's own combine()
                fuse = fusion.combine
                syn = metrics(det, torch.cat([fuse(cm, cb), fuse(c["sm"].float(), c["sb"].float())]),
                              syn_labels, syn_masks)
                grid.append({"method": name, "norm": norm, "weight_of_method_map": w,
                             "synthetic": syn, "test": metrics(det, fuse(tm, tb), test_labels, test_masks)})
                print(json.dumps(grid[-1]), flush=True)  # progress; the file gets the full rows below
        # the good-only fit's choice: BankFusion.fit_weight's objective and tie-breaks
        best = max(grid, key=lambda r: ((r["synthetic"]["image_auroc"] + r["synthetic"]["pixel_auroc"]) / 2,
                                        r["norm"] == NORMS[0], -abs(r["weight_of_method_map"] - 0.5)))
        for r in grid:
            r["chosen"] = r is best
            r["settings"] = {"model": str(folder), "n_calibration": len(cm), "n_synthetic": len(c["sm"]),
                             "n_test": len(tm), "maps_seconds": round(secs, 1), "run": run,
                             "note": "test columns: diagnostic only (an oracle), never a choice"}
        for r in grid:
            out.emit(r, echo=False)
    print()
    print(f"{'method':<12}{'norm':<10}{'w':>5}  {'syn img':>9}{'syn pix':>9}{'syn pro':>9}  "
          f"{'img':>9}{'pix':>9}{'pro':>9}")
    for r in rows:
        s, q = r["synthetic"], r["test"]
        print(f"{r['method']:<12}{r['norm']:<10}{r['weight_of_method_map']:>5}  {s['image_auroc']:>9}"
              f"{s['pixel_auroc']:>9}{s['pixel_aupro']:>9}  {q['image_auroc']:>9}{q['pixel_auroc']:>9}"
              f"{q['pixel_aupro']:>9}" + ("  <- the good-only fit" if r["chosen"] else ""))
    return 0
