"""Peak resident memory of ``ccad predict`` on one huge image (issue 13, item 9d).

    python -m benchmarks peak_memory                      # 8000 x 8000 PNG and JPEG, the bundled demo
    python -m benchmarks peak_memory --code /work/main    # the same against another checkout's ccad

Writes a smooth 8000 x 8000 RGB test image (PNG and JPEG) into a temporary folder, runs
``python -m ccad.cli predict <model> <image> --out <tmp>`` in a child process with ``PYTHONPATH``
set to ``--code`` (default: this checkout), and prints the child's peak RSS (``getrusage``
``ru_maxrss``), once per image plus once for a small sample image (the model's own baseline).
Prints one JSON line per run, then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks.common import ROOT, JsonLines, make_parser, parse


def write_images(folder: Path, side: int) -> list[Path]:
    import cv2
    import numpy as np

    y, x = np.mgrid[0:side, 0:side]
    a = ((np.sin(x / 37.0) + np.cos(y / 23.0)) * 60 + 128).astype(np.uint8)
    a = np.stack([a, a[::-1], a[:, ::-1]], -1)
    png, jpg = folder / f"big{side}.png", folder / f"big{side}.jpg"
    cv2.imwrite(str(png), a)
    cv2.imwrite(str(jpg), a, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return [png, jpg]


def peak(code: Path, model: Path, image: Path) -> dict:
    """Each call runs ONE child; ru_maxrss of RUSAGE_CHILDREN is the max over children waited for,
    so the runs are made in separate python processes (see main)."""
    out = tempfile.mkdtemp(prefix="ccad-peak-")
    env = dict(os.environ, PYTHONPATH=str(code))
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "ccad.cli", "predict", str(model), str(image), "--out", out, "--quiet"],
                       env=env, capture_output=True, text=True, cwd=out)  # cwd: `-m` must not import ./ccad
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"code": str(code), "image": image.name, "rc": p.returncode, "peak_rss_mb": round(rss),
            "wall_s": round(time.time() - t, 1), "stdout": p.stdout.strip()[-200:], "loadavg": os.getloadavg()}


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("peak_memory", __doc__)
    ap.add_argument("--code", default=str(ROOT), help="checkout whose ccad is run (PYTHONPATH)")
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "demo"))
    ap.add_argument("--side", type=int, default=8000, help="the big images' side (0: the sample image only)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure this image only
    a = parse(ap, argv)
    if a.one:
        print(json.dumps(peak(Path(a.code), Path(a.model), Path(a.one))))
        return 0
    out = JsonLines(a.json)
    rows = out.rows
    with tempfile.TemporaryDirectory(prefix="ccad-peak-img-") as tmp:
        images = [ROOT / "assets" / "samples" / "good_1.png", *(write_images(Path(tmp), a.side) if a.side else [])]
        for im in images:  # one measuring process per image: ru_maxrss is a running maximum
            r = subprocess.run([sys.executable, "-m", "benchmarks", "peak_memory", "--code", a.code, "--model",
                                a.model, "--one", str(im)], capture_output=True, text=True, check=True, cwd=ROOT)
            out.emit(json.loads(r.stdout.strip().splitlines()[-1]))
    print()
    print("image | peak RSS (MB) | rc")
    for r in rows:
        print(f"{r['image']} | {r['peak_rss_mb']} | {r['rc']}")
    return 0
