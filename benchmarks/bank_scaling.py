"""Feature-bank build time and peak memory versus the number of images.

The coarse bank ``B_c = Coreset(D, xi)`` (CCAD eq. 5-6) must be buildable from thousands of
images without holding every patch feature at once. This builds banks from 100, 1,000 and
10,000 synthetic texture images (generated on the fly with numpy, batch by batch, never stored)
with the real ``tf_efficientnet_lite0`` backbone and the streaming coreset, each size in its own
subprocess so that the process's RSS high-water mark (``ru_maxrss``) belongs to that build only.
A psutil sampling thread also records the RSS peak during the build itself.

Prints one JSON line per size (keys ``n_images``, ``seconds``, ``peak_ram_mb``, ... and the
``settings``) and then a small table. Memory should stay flat as the image count grows.

Usage::

    python -m benchmarks bank_scaling                       # 100, 1000, 10000 images at 64 px
    python -m benchmarks bank_scaling --image-size 128 --sizes 100 1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Iterator, Optional

from benchmarks.common import ROOT, JsonLines, make_parser, parse

if TYPE_CHECKING:
    import torch


def synthetic_batches(n: int, size: int, batch: int, seed: int = 0) -> Iterator["torch.Tensor"]:
    """``n`` random woven/stripe textures with noise and occasional blobs, in batches."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    done = 0
    while done < n:
        b = min(batch, n - done)
        period = rng.uniform(4, 16, (b, 1, 1)).astype(np.float32)
        angle = rng.uniform(0, np.pi, (b, 1, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (b, 1, 1)).astype(np.float32)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        g = 0.5 + 0.25 * np.sin(2 * np.pi * u / period + phase)
        g = g + rng.normal(0, 0.05, (b, size, size)).astype(np.float32)
        tint = rng.uniform(0.8, 1.0, (b, 3, 1, 1)).astype(np.float32)
        img = np.clip(g[:, None] * tint, 0, 1)
        yield torch.from_numpy(np.ascontiguousarray(img))
        done += b


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def worker(args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from ccad.features import FeatureBank, get_backbone

    bb = get_backbone("tf_efficientnet_lite0")
    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    bank = FeatureBank.build(
        synthetic_batches(args.worker, args.image_size, args.batch_size, args.seed),
        bb, size=args.xi, image_size=args.image_size, batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "n_images": int(bank.meta["n_images"]),
        "seconds": round(seconds, 2),
        "peak_ram_mb": round(maxrss_mb, 1),
        "build_peak_rss_mb": round(peak[0], 1),
        "rss_before_build_mb": round(base, 1),
        "build_growth_mb": round(peak[0] - base, 1),
        "n_patches": int(bank.meta["n_patches"]),
        "xi": int(bank.features.shape[0]),
        "coreset_buffer_rows": bank.meta["coreset"]["buffer"],
        "reductions": bank.meta["coreset"]["reductions"],
        "images_per_s": round(bank.meta["n_images"] / seconds, 1),
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("bank_scaling", __doc__, threads=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--xi", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parse(ap, argv)
    args.threads = args.threads if args.threads is not None else 2

    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0

    settings = {
        "backbone": "tf_efficientnet_lite0",
        "layers": [2, 3],
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "xi": args.xi,
        "threads": args.threads,
        "device": "cpu",
        "data": "synthetic textures generated on the fly (numpy), never stored",
    }
    out_rows = JsonLines(args.json)
    rows = out_rows.rows
    for n in args.sizes:  # the worker: this benchmark in a fresh process (cwd: the repo root, for -m)
        cmd = [sys.executable, "-m", "benchmarks", "bank_scaling", "--worker", str(n),
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--xi", str(args.xi), "--threads", str(args.threads), "--seed", str(args.seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            return out.returncode
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["settings"] = settings
        out_rows.emit(row)

    print()
    print(f"{'images':>8} {'seconds':>9} {'img/s':>7} {'peak RSS MB':>12} {'build growth MB':>16} "
          f"{'patches':>10} {'reductions':>10}")
    for r in rows:
        print(f"{r['n_images']:>8} {r['seconds']:>9.1f} {r['images_per_s']:>7.1f} "
              f"{r['peak_ram_mb']:>12.1f} {r['build_growth_mb']:>16.1f} {r['n_patches']:>10} "
              f"{r['reductions']:>10}")
    return 0
