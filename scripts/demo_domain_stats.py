"""Add the out-of-domain statistic (``ccad.scoring.domain``) to the bundled demo without changing it.

The demo in ``checkpoints/demo/`` was calibrated before ccad stored the good images' domain
distances, so its predictions carried no out-of-domain flag. This script regenerates the demo's
held-out calibration slice exactly as ``scripts/build_demo.py`` made it (the same synthetic set,
seed and ``split_good`` slice), proves it is the same slice (the recomputed image scores match
the stored ``good_scores``), and writes only ``calibration.json`` with the ``domain`` entry added:
weights, threshold and every other file are untouched.

    python scripts/demo_domain_stats.py            # checkpoints/demo
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "checkpoints" / "demo"))
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest relative score difference accepted")
    a = p.parse_args(argv)

    import numpy as np
    import torch

    from ccad.data.dataset import iter_batches
    from ccad.data.synthetic import write_dataset
    from ccad.pipeline import AnomalyDetector, _as_samples, split_good

    det = AnomalyDetector.from_pretrained(a.model, device="cpu")
    demo = det.info.get("demo") or {}
    work = Path(tempfile.mkdtemp(prefix="ccad-demo-domain-"))
    try:
        # the arguments build_demo.py used (recorded in info.json "demo"; n_test_* as build_demo)
        ds = write_dataset(work / "data", kinds=(demo.get("kind", "fibrous"),), n_train=int(demo.get("n_train", 60)),
                           n_test_good=12, n_test_defect=4, size=int(demo.get("size", 128)),
                           seed=int(demo.get("seed", 0)))
        good = _as_samples(str(ds / demo.get("kind", "fibrous")))
        _, cal = split_good(good, 0.2, int(demo.get("seed", 0)))
        scores, domains = [], []
        for b in iter_batches(cal, det.input_size, 8):
            m, bank, _, dom = det._map_parts(b["image"])
            scores.append(det._score(det.combine(m, bank)).cpu())
            domains.append(dom.cpu())
        scores = torch.cat(scores).numpy()
        stored = np.asarray(det.calibration.good_scores, np.float64)
        if scores.shape != stored.shape or not np.allclose(scores, stored, rtol=a.tolerance, atol=1e-5):
            print(f"error: not the demo's calibration slice: scores {np.round(scores, 4)} vs stored "
                  f"{np.round(stored, 4)}", file=sys.stderr)
            return 1
        print(f"calibration slice reproduced: {scores.size} images, largest score difference "
              f"{float(np.max(np.abs(scores - stored))):.2e}")
        det.calibration.domain = det._fit_domain(domains)
        path = Path(a.model) / "calibration.json"
        path.write_text(json.dumps(det.calibration.to_dict(), indent=1))
        d = det.calibration.domain
        print(f"wrote {path}: domain distances of the good slice {np.round(d.good, 3).tolist()}, "
              f"limit {d.limit:.4f} ({d.factor} x max; {d.source})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
