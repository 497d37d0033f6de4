"""Why a latent detector scores as it does, from GOOD images only (no test label is read).

    python -m benchmarks experiments.latent_diagnostics RUN_DIR/model [RUN_DIR/model ...] [--n 24]

For each saved latent detector (``model/`` of a benchmark run folder) and N good *training*
images of the dataset (default MTD; the ones it was trained on; the point is to see what the model does on normal
data), report:

* ``ae_err``: mean |decode(encode(x)) - x| (the autoencoder's own reconstruction error);
* ``rec_err``: mean |x_hat - x| (the method's reconstruction vs the input);
* ``rec_vs_ae``: mean |x_hat - decode(encode(x))|: ~0 means the reconstruction is an identity
  copy of the autoencoded input (the model changes nothing, so it cannot remove a defect);
* ``latent_dev``: mean |z_hat - z0| in unit-variance latent units;
* map statistics over the good images: median, 99th percentile, the fraction of pixels at
  >= 0.999 of the map's maximum possible value (DeCo-Diff's eq. 15 map is bounded by 1: a large
  saturated fraction on good images means the gamma thresholds are below the normal deviation);
* ``score_spread``: the calibration scores' (good held-out images) coefficient of variation;
* the training loss at the start and the end (trainer_state.json of the last checkpoint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks.common import MTD_SPLIT, JsonLines, loss_summary, make_parser, parse
from ccad.data.detect import load_dataset
from ccad.data.convert import to_tensor
from ccad.data.io import load_image
from ccad.pipeline import AnomalyDetector


@torch.no_grad()
def diagnose(model_dir: Path, samples: list, batch: int = 8) -> dict:
    det = AnomalyDetector.load_folder(model_dir, device="cpu")
    m = det.method
    S = det.image_size
    acc: dict[str, list] = {k: [] for k in ("ae_err", "rec_err", "rec_vs_ae", "latent_dev")}
    maps = []
    for i in range(0, len(samples), batch):
        x = torch.stack([to_tensor(load_image(s.image_path), S) for s in samples[i:i + batch]])
        z0 = m.encode(x)
        x_ae = m.decode(z0)
        out = m.maps(x)
        x_hat = out.reconstruction
        z_hat = m.encode(x_hat) if x_hat is not None else z0
        acc["ae_err"].append((x_ae - x).abs().mean().item())
        acc["rec_err"].append((x_hat - x).abs().mean().item())
        acc["rec_vs_ae"].append((x_hat - x_ae).abs().mean().item())
        acc["latent_dev"].append((z_hat - z0).abs().mean().item())
        maps.append(out.maps.float().numpy())
    mp = np.concatenate(maps)
    good_scores = det.calibration.good_scores if det.calibration is not None else np.array([np.nan])
    bounded = det.variant == "deco-diff"
    return {"model": str(model_dir), "variant": det.variant, "image_size": S, "n_good": len(samples),
            **{k: round(float(np.mean(v)), 4) for k, v in acc.items()},
            "map_median": round(float(np.median(mp)), 4), "map_p99": round(float(np.quantile(mp, 0.99)), 4),
            "map_max": round(float(mp.max()), 4),
            "saturated_fraction": round(float((mp >= 0.999).mean()), 4) if bounded else None,
            "images_with_saturated_pixel": round(float((mp.reshape(len(mp), -1) >= 0.999).any(1).mean()), 4)
            if bounded else None,
            "calibration_scores": {"mean": round(float(np.mean(good_scores)), 4),
                                   "cv": round(float(np.std(good_scores) / max(abs(np.mean(good_scores)), 1e-9)), 4)},
            "threshold": det.threshold, "loss": loss_summary(Path(model_dir).parent)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("experiments.latent_diagnostics", __doc__)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default=str(MTD_SPLIT),
                    help="any dataset ccad.data.detect.load_dataset reads (its good train images are used)")
    ap.add_argument("--n", type=int, default=24)
    a = parse(ap, argv)
    train = load_dataset(a.data, split="train")
    good = [s for s in train if s.label == 0][:: max(1, len(train) // a.n)][: a.n]
    out = JsonLines(a.json, default=float)
    for d in a.models:
        out.emit(diagnose(Path(d), good))
    return 0
