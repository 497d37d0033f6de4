"""DAGM re-labelling benchmark: how close are proposed masks and DAGM ellipses to the truth?

    python -m benchmarks dagm_relabel            # 5 textures x 4 defects x 3 = 60 images, 256 px
    python -m benchmarks dagm_relabel --quick    # 2 textures x 4 defects x 1, 128 px, no detector
    python -m benchmarks dagm_relabel --detector none

Generates the synthetic DAGM-style set (``ccad.data.synthetic.write_dataset(layout="dagm")``:
the published DAGM layout with ellipse weak labels in ``Label/`` and the exact masks in
``Exact/``), reads it back through :class:`ccad.relabel.ReviewSession` as the review app does,
optionally fits one PatchCore detector per class from the class's good ``Train`` images
(``ccad.pipeline.fit_detector``, the offline efficientnet-lite0 backbone) for the anomaly maps,
and measures against the exact masks the IoU of

* ``ellipse_iou``: the DAGM-style ellipse itself,
* ``proposal_iou``: :func:`ccad.relabel.propose_mask` as the app runs it (anomaly map + image
  cue + GrabCut when a detector is used; image cue + GrabCut otherwise),
* ablations: ``proposal_iou_image_only`` (no map), ``proposal_iou_no_grabcut`` (seeds only),
  ``map_otsu_iou`` (the detector's map thresholded by Otsu inside the ellipse, no image cue).

Prints one JSON line (n_images, ellipse_iou, proposal_iou, seconds_per_image, ablations,
settings) and then a per-texture / per-defect table. ``seconds_per_image`` is the proposal time
(detector inference is reported separately as ``detector_seconds_per_image``).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import JsonLines, make_parser, parse
from ccad.data.synthetic import DEFECTS, TEXTURES, write_dataset
from ccad.relabel import ProposalSettings, ReviewSession, _otsu, mask_iou, propose_mask


def _fit_detectors(root: Path, classes: list[str], size: int, seed: int) -> dict[str, object]:
    from ccad.data.layouts import load_dagm
    from ccad.methods import get_method
    from ccad.pipeline import fit_detector

    out: dict[str, object] = {}
    for cls in classes:
        good = [s for s in load_dagm(root, "train", category=cls) if s.label == 0]
        out[cls] = fit_detector(good, variant="patchcore", image_size=size, bank_size=64,
                                method=get_method("patchcore").Config(ratio=0.05), calibration_fraction=0.0,
                                seed=seed)
    return out


def _map_otsu(amap: np.ndarray, ellipse: np.ndarray) -> np.ndarray:
    t = _otsu(amap[ellipse])
    return (amap > t) & ellipse


def main(argv: list[str] | None = None) -> int:
    ap = make_parser("dagm_relabel", __doc__, quick="2 textures x 4 defects x 1 image, 128 px, no detector",
                     threads=None)
    ap.add_argument("--kinds", nargs="+", default=list(TEXTURES), choices=TEXTURES)
    ap.add_argument("--defects", nargs="+", default=list(DEFECTS), choices=DEFECTS)
    ap.add_argument("--n-defect", type=int, default=3, help="test images per texture and defect")
    ap.add_argument("--n-train", type=int, default=12, help="good train images per class (detector)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detector", choices=["patchcore", "none"], default="patchcore")
    ap.add_argument("--out", type=Path, default=None, help="dataset folder (default: a temp dir)")
    args = parse(ap, argv)
    if args.quick:
        args.kinds, args.n_defect, args.size, args.detector = args.kinds[:2], 1, 128, "none"

    import torch

    if args.threads is None:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    tmp = Path(tempfile.mkdtemp(prefix="dagm-relabel-"))
    root = args.out or tmp / "dagm"
    t0 = time.perf_counter()
    write_dataset(root, kinds=tuple(args.kinds), n_train=args.n_train if args.detector != "none" else 0,
                  n_test_good=0, n_test_defect=args.n_defect, size=args.size, seed=args.seed,
                  layout="dagm", defects=tuple(args.defects))
    gen_s = time.perf_counter() - t0
    sess = ReviewSession(root, tmp / "store")
    items = [it for it in sess.items if it.exact_path]
    if not items:
        raise SystemExit(f"no items with exact masks under {root}")
    meta = json.loads((root / "synthetic.json").read_text())
    defect_of = {str((root / r["image"]).resolve()): r["defect"] for r in meta["images"]}
    kind_of = {f"Class{i + 1}": k for i, k in enumerate(args.kinds)}

    fit_s = 0.0
    detectors: dict[str, object] = {}
    if args.detector == "patchcore":
        t0 = time.perf_counter()
        detectors = _fit_detectors(root, sorted({it.category for it in items}), args.size, args.seed)
        fit_s = time.perf_counter() - t0

    no_gc = ProposalSettings(grabcut_iters=0)
    rows = []
    t_prop = t_det = 0.0
    for i, it in enumerate(items):
        img, ell, exact = sess.image(i), sess.ellipse(i), sess.exact(i)
        amap = None
        if detectors:
            t0 = time.perf_counter()
            amap = np.asarray(detectors[it.category].predict(img).anomaly_map, np.float32)
            t_det += time.perf_counter() - t0
        t0 = time.perf_counter()
        prop = propose_mask(img, ell, amap)
        t_prop += time.perf_counter() - t0
        row = {"kind": kind_of.get(it.category, it.category),
               "defect": defect_of.get(str(Path(it.image_path).resolve()), "?"),
               "ellipse": mask_iou(ell, exact), "proposal": mask_iou(prop, exact),
               "image_only": mask_iou(propose_mask(img, ell, None), exact) if amap is not None
               else mask_iou(prop, exact),
               "no_grabcut": mask_iou(propose_mask(img, ell, amap, no_gc), exact)}
        if amap is not None:
            row["map_otsu"] = mask_iou(_map_otsu(amap, ell), exact)
        rows.append(row)

    def mean(key: str, sel: list[dict] | None = None) -> float:
        vals = [r[key] for r in (sel if sel is not None else rows) if key in r]
        return round(float(np.mean(vals)), 4) if vals else float("nan")

    n = len(rows)
    result = {
        "n_images": n,
        "ellipse_iou": mean("ellipse"),
        "proposal_iou": mean("proposal"),
        "seconds_per_image": round(t_prop / n, 4),
        "proposal_iou_image_only": mean("image_only"),
        "proposal_iou_no_grabcut": mean("no_grabcut"),
        "map_otsu_iou": mean("map_otsu") if detectors else None,
        "proposal_beats_ellipse_fraction": round(float(np.mean([r["proposal"] > r["ellipse"] for r in rows])), 4),
        "detector_seconds_per_image": round(t_det / n, 4) if detectors else None,
        "settings": {"kinds": args.kinds, "defects": args.defects, "n_defect": args.n_defect,
                     "size": args.size, "seed": args.seed, "detector": args.detector,
                     "n_train": args.n_train if detectors else 0,
                     "detector_fit_seconds": round(fit_s, 1), "generate_seconds": round(gen_s, 1),
                     "torch_threads": torch.get_num_threads()},
    }
    JsonLines(args.json).emit(result)
    print()
    cols = ["ellipse", "proposal", "image_only", "no_grabcut"] + (["map_otsu"] if detectors else [])
    print(f"{'group':<18}{'n':>4}" + "".join(f"{c:>12}" for c in cols))
    groups = [("all", rows)]
    groups += [(k, [r for r in rows if r["kind"] == k]) for k in args.kinds]
    groups += [(d, [r for r in rows if r["defect"] == d]) for d in args.defects]
    for name, sel in groups:
        if sel:
            print(f"{name:<18}{len(sel):>4}" + "".join(f"{mean(c, sel):>12.3f}" for c in cols))
    return 0
