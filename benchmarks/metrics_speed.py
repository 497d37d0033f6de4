"""Speed and memory of the pooled pixel metrics at MTD test-set scale.

Generates ``--n`` (582, the MTD test split) random ``--size`` x ``--size`` (256) float32
anomaly maps with elliptical blob masks (about half of the images defect-free), then times
each pixel metric on its own (each call sorts all pixels once) and the combined
``pixel_metrics`` call (one sort for all four), and prints one JSON line:

    {"pixels": ..., "regions": ..., "pixel_auroc_s": ..., "pixel_ap_s": ...,
     "pixel_f1max_s": ..., "pixel_aupro_s": ..., "total_s": ..., "data_rss_mb": ...,
     "peak_rss_mb": ..., "metrics": {...}}

``total_s`` is the combined call (what ``compute_metrics`` pays); ``data_rss_mb`` is the peak
RSS after generating the data, ``peak_rss_mb`` the peak RSS of the whole run.

Usage: ``python -m benchmarks metrics_speed [--n 582] [--size 256] [--seed 0] [--json PATH]``
"""

from __future__ import annotations

import resource
import time
from typing import Optional

import numpy as np

from benchmarks.common import JsonLines, make_parser, parse
from ccad.metrics import aupro, label_regions, pixel_ap, pixel_auroc, pixel_f1max, pixel_metrics


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bool masks with 1-4 random ellipses on about half the images; float32 maps where the
    blobs score higher on average (uniform noise, so nearly every pixel score is distinct)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    for i in range(n):
        if rng.random() < 0.5:
            continue
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(2, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    maps = rng.random((n, size, size), dtype=np.float32)
    maps[masks] += np.float32(0.35)
    return masks, maps


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("metrics_speed", __doc__)
    ap.add_argument("--n", type=int, default=582)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = parse(ap, argv)

    masks, maps = make_data(args.n, args.size, args.seed)
    regions = sum(label_regions(m)[1] for m in masks)
    data_rss = peak_rss_mb()

    out: dict[str, object] = {"pixels": int(maps.size), "regions": int(regions)}
    for name, fn in (
        ("pixel_auroc", lambda: pixel_auroc(masks, maps)),
        ("pixel_ap", lambda: pixel_ap(masks, maps)),
        ("pixel_f1max", lambda: pixel_f1max(masks, maps)),
        ("pixel_aupro", lambda: aupro(masks, maps, fpr_limit=0.3)),
    ):
        t0 = time.perf_counter()
        fn()
        out[f"{name}_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    metrics = pixel_metrics(masks, maps, fpr_limit=0.3)
    out["total_s"] = round(time.perf_counter() - t0, 3)
    out["data_rss_mb"] = round(data_rss, 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["metrics"] = {k: round(v, 6) for k, v in metrics.items()}
    JsonLines(args.json).emit(out)
    return 0
