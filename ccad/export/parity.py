"""Parity, proven: the exported folder run by :mod:`ccad.runtime` against the torch detector.

The images: the good images given (``--parity-images``: the model's held-out good images are
the right ones; the saved model does not keep their paths), else synthetic textures
(:mod:`ccad.data.synthetic`) at several sizes, square and not; plus, for every one of them, a
copy with a synthetic anomaly pasted in (:func:`ccad.data.anomaly_synth.synthesize_batch`, the
recipe the fusion weight is fitted with). Both sides run their full ``predict_many`` (read,
resize, graph or torch, score, verdict, map back to the image's size) in batches of 4.

Recorded: the largest score difference (absolute, and relative to ``max(|score|, |threshold|)``),
the largest map difference (absolute, and relative to the torch map's range), the largest domain
distance difference, and the number of verdicts and out-of-domain flags that differ. Passed
when no verdict or flag differs and every score is within :data:`SCORE_RTOL`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

#: relative score tolerance: float32 through a different kernel library (onnxruntime's MLAS vs
#: torch's oneDNN/MKL) measured ~1e-6 on the tests' tiny models and lite0 (see parity.json)
SCORE_RTOL = 1e-4
N_SYNTHETIC = 6


def _synthetic_goods(size: int, n: int = N_SYNTHETIC, seed: int = 0) -> list[np.ndarray]:
    from ..data.synthetic import TEXTURES, generate_texture

    shapes = [(size, size), (size + size // 3, size - size // 5), (max(8, size // 2), size), (2 * size, 2 * size)]
    out = []
    for i in range(n):
        img = generate_texture(TEXTURES[i % len(TEXTURES)], shapes[i % len(shapes)], seed=seed + i)
        out.append(np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img)
    return out


def parity_items(detector: Any, images: Optional[Sequence[Any]] = None, seed: int = 0
                 ) -> tuple[list[np.ndarray], str]:
    """The good images (given or synthetic) and a synthetic-anomaly copy of each, as arrays."""
    import torch

    from ..data.anomaly_synth import synthesize_batch
    from ..data.coerce import coerce_image
    from ..data.convert import to_tensor

    if images:
        goods = [coerce_image(x) for x in images]
        source = f"{len(goods)} images given"
    else:
        goods = _synthetic_goods(detector.input_size, seed=seed)
        source = f"{len(goods)} synthetic textures (no good images given: pass --parity-images)"
    x = torch.stack([to_tensor(g, detector.input_size) for g in goods])
    x_a, _ = synthesize_batch(x, torch.Generator().manual_seed(seed), ratio=1.0)
    anomalous = [a.permute(1, 2, 0).contiguous().numpy() for a in x_a]
    return goods + anomalous, f"{source} + {len(anomalous)} copies with a synthetic anomaly pasted in"


def compare(torch_preds: Sequence[Any], export_preds: Sequence[Any]) -> dict[str, Any]:
    """The figures of the module docstring for two prediction lists of the same images."""
    if len(torch_preds) != len(export_preds):
        raise ValueError(f"parity: {len(torch_preds)} torch predictions but {len(export_preds)} exported ones")
    sd = sr = md = mr = dd = 0.0
    verdicts = ood = 0
    rows = []
    for a, b in zip(torch_preds, export_preds):
        ds = abs(a.score - b.score)
        scale = max(abs(a.score), abs(a.threshold) if math.isfinite(a.threshold) else 0.0, 1e-6)
        dm = float(np.abs(a.anomaly_map - b.anomaly_map).max())
        span = max(float(a.anomaly_map.max() - a.anomaly_map.min()), 1e-6)
        sd, sr, md, mr = max(sd, ds), max(sr, ds / scale), max(md, dm), max(mr, dm / span)
        if a.domain_distance is not None and b.domain_distance is not None:
            dd = max(dd, abs(a.domain_distance - b.domain_distance))
        verdicts += a.verdict != b.verdict
        ood += a.out_of_domain != b.out_of_domain
        rows.append({"torch_score": a.score, "export_score": b.score, "torch_verdict": a.verdict,
                     "export_verdict": b.verdict, "out_of_domain": [a.out_of_domain, b.out_of_domain]})
    return {"n_images": len(rows), "max_score_abs_diff": sd, "max_score_rel_diff": sr, "max_map_abs_diff": md,
            "max_map_rel_diff": mr, "max_domain_distance_abs_diff": dd, "verdicts_differ": int(verdicts),
            "out_of_domain_differ": int(ood), "images": rows}


def check_parity(detector: Any, folder: Path, images: Optional[Sequence[Any]] = None,
                 batch_size: int = 4) -> dict[str, Any]:
    """Run both on the same images and return the parity record (``passed`` and the figures)."""
    from ..runtime import load

    items, source = parity_items(detector, images)
    runtime = load(folder)
    torch_preds, _ = detector.predict_many(items, batch_size=batch_size, on_error="raise")
    export_preds, _ = runtime.predict_many(items, batch_size=batch_size, on_error="raise")
    rec = compare(torch_preds, export_preds)
    rec.update({"sources": source, "backend": runtime.backend, "threshold": detector.threshold,
                "tolerance": {"score_rel": SCORE_RTOL, "verdicts_differ": 0, "out_of_domain_differ": 0}})
    rec["passed"] = bool(rec["verdicts_differ"] == 0 and rec["out_of_domain_differ"] == 0
                         and rec["max_score_rel_diff"] <= SCORE_RTOL)
    rec = {k: rec[k] for k in ("passed", "tolerance", "sources", "backend", "n_images", "threshold",
                               "max_score_abs_diff", "max_score_rel_diff", "max_map_abs_diff", "max_map_rel_diff",
                               "max_domain_distance_abs_diff", "verdicts_differ", "out_of_domain_differ",
                               "images")}
    return rec
