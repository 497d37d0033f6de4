"""Per-image inference time of every method at the same image sizes (batch 1 and batch 8).

    python benchmarks/speed.py                       # sizes 128,256; quick settings; CPU or GPU
    python benchmarks/speed.py --sizes 256 --methods deco-diff,ccad-v

Each method is built through the benchmarks' one code path (``common.build_detector``, the
``--quick`` settings row of ``benchmarks/common.py`` at the requested size) on a handful of MTD
training images and trained for ONE step: the networks are effectively untrained, which does not
change the cost of a forward pass (same architecture, same number of denoising / correction
steps, same autoencoder and scoring backbone). ``NAME@full`` uses the method's full-mode row
(e.g. ``ccad-v@full``: the base denoiser, 10 DDIM steps), still at the requested size.

Timed: ``detector.maps_for_batch(x)`` - everything a prediction costs after the image is
decoded and resized (for a latent method: TAEF2 encode, the denoiser / corrector steps, decode,
the map) - on real MTD test images, after one warm-up call; the median of ``--reps`` runs.
Prints one JSON line per (method, size) with ms per image at batch 1 and 8, then a table with
the ratio to CCAD(V) (quick row) at the same size and batch. CPU timings on a shared machine are
inflated by other processes: the load average before / after each row is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, build_detector, default_autoencoder, git_commit, machine, settings_for  # noqa: E402

from ccad.data.layouts import load_csv_manifest  # noqa: E402
from ccad.data.io import load_image, to_tensor  # noqa: E402
from ccad.methods import get_method  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mtd" / "split.csv"
DEFAULT_METHODS = "patchcore,ccad-v,ccad-v@full,ccad-c,ccad-f,deco-diff"


def time_call(det, x: torch.Tensor, reps: int) -> float:
    """Median seconds of ``det.maps_for_batch(x)`` over ``reps`` runs after one warm-up."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    det.maps_for_batch(x)
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        det.maps_for_batch(x)
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated NAME or NAME@full "
                                                                f"(default {DEFAULT_METHODS})")
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per batch size (median)")
    ap.add_argument("--n-train", type=int, default=16, help="images the (untrained) detectors are built on")
    ap.add_argument("--autoencoder", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    ae = a.autoencoder or default_autoencoder()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = load_csv_manifest(a.data, split="train")[:: max(1, 762 // a.n_train)][: a.n_train]
    test = load_csv_manifest(a.data, split="test")
    test = test[:: max(1, len(test) // 8)][:8]
    images = [load_image(s.image_path) for s in test]
    sizes = [int(v) for v in a.sizes.split(",")]
    batches = [int(v) for v in a.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ccad-speed-"))
    run = {"commit": git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **machine()}
    print(f"# {json.dumps(run)}", file=sys.stderr, flush=True)
    rows = []
    for size in sizes:
        xs = torch.stack([to_tensor(im, size) for im in images])
        for spec in [m.strip() for m in a.methods.split(",") if m.strip()]:
            name, _, mode = spec.partition("@")
            mode = mode or "quick"
            trainable = get_method(name).trainable
            s = settings_for(name, mode, ae, {"image_size": size, "steps": 1 if trainable else None,
                                              "batch_size": 2 if trainable else None,
                                              "warmup_steps": 0 if trainable else None})
            load0 = machine()["loadavg"]
            t0 = time.perf_counter()
            det = build_detector(name, train, s, work / f"{spec}-{size}", calibration_fraction=0.25, device=device,
                                 latent_cache=work / f"latents-{size}")
            build_s = time.perf_counter() - t0
            ms = {}
            for b in batches:
                if ms and max(ms.values()) > 10000:  # > 10 s an image: larger batches add nothing but minutes
                    ms[f"ms_per_image_b{b}"] = None
                    continue
                x = xs[:b] if b <= len(xs) else xs.repeat((b + len(xs) - 1) // len(xs), 1, 1, 1)[:b]
                first = time.perf_counter()
                det.maps_for_batch(x)
                reps = a.reps if time.perf_counter() - first < 20 else 1  # slow rows: one timed run
                ms[f"ms_per_image_b{b}"] = round(1000 * time_call(det, x, reps) / b, 1)
            row = {"method": spec, "image_size": size, **ms, "device": device,
                   "settings": {"mode": mode, "preset": s.get("preset"), "options": s.get("options", {}),
                                "trained_steps": 1 if trainable else None, "untrained_networks": trainable,
                                "build_seconds": round(build_s, 1), "reps": a.reps,
                                "loadavg_start": load0, "loadavg_end": machine()["loadavg"], "run": run}}
            print(json.dumps(row, default=str), flush=True)
            rows.append(row)
            if a.json:
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    print()
    ref = {(r["image_size"]): r for r in rows if r["method"] == "ccad-v"}
    head = f"{'method':<14}{'size':>6}" + "".join(f"{'ms/img b' + str(b):>14}{'vs ccad-v':>11}" for b in batches)
    print(head)
    for r in rows:
        line = f"{r['method']:<14}{r['image_size']:>6}"
        for b in batches:
            v = r[f"ms_per_image_b{b}"]
            base = ref.get(r["image_size"], {}).get(f"ms_per_image_b{b}")
            line += f"{str(v):>14}" + (f"{base / v:>10.2f}x" if base and v else f"{'-':>11}")
        print(line)
    print("\n('vs ccad-v' = CCAD(V) quick-row ms / this row's ms at the same size and batch; > 1 = faster. "
          "Networks untrained: forward cost only.)")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
