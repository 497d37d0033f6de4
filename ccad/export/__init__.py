"""``ccad export``: a detector -> one folder a line PC runs without torch (:mod:`ccad.runtime`).

The folder holds

- ``model.onnx`` (or the OpenVINO IR ``model.xml`` + ``model.bin``, saved at float32): the
  detector's map computation (:mod:`ccad.export.graph`), dynamic batch, input ``image``
  ``B x 3 x S x S`` in [0, 1];
- ``verdict.json``: everything the verdict needs beyond the graph (input size and resize rule,
  normalisation (in the graph; stated), the score rule, threshold and calibration, the out-of-domain
  limit, the fusion statistics, map smoothing (in the graph; stated), the map floor, the model card);
- ``parity.json``: the export run by :mod:`ccad.runtime` against the torch detector on the same
  images (:mod:`ccad.export.parity`); an export whose verdicts differ is refused, loudly;
- ``README.md``: the model card and how to run it.

Methods: PatchCore and feat-diff (with or without bank fusion) export; every other method is
refused by name with the reason (:data:`REFUSED`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from ..runtime import FORMAT, FORMAT_VERSION, VERDICT_FILE

FORMATS = ("onnx", "openvino")
EXPORTABLE = ("patchcore", "feat-diff")
PARITY_FILE = "parity.json"
CARD_FILE = "README.md"

#: why a method is not exported (it never exports something that scores differently)
_NOT_YET = "no ONNX graph of it has been built and proven to score as the torch model does yet"
REFUSED = {
    "ccad-v": f"its reconstruction is a DDAD-guided DDIM loop (eq. 12-14) with seeded per-image noise and a second "
              f"backbone for the eq. 16 map; {_NOT_YET}",
    "ccad-c": f"it reconstructs through a latent autoencoder and a bank-conditioned UNet over a DDIM loop, with an "
              f"optional per-image dynamic start; {_NOT_YET}",
    "ccad-f": f"it reconstructs through a latent autoencoder and a bank-conditioned UNet over a DDIM loop, with an "
              f"optional per-image dynamic start; {_NOT_YET}",
    "deco-diff": f"its deviation-corrected reconstruction runs a latent autoencoder and a UNet; {_NOT_YET}",
    "d3ad": f"its dynamic implicit conditioning picks each image's noise level from the image; {_NOT_YET}",
    "glad": f"its adaptive reconstruction draws seeded per-image noise and scores with a separate extractor; "
            f"{_NOT_YET}",
}


OUTPUTS = {"method_map": "B x 1 x S x S, the method's map (upsampled and Gaussian-smoothed in the graph)",
           "bank_map": "B x 1 x S x S, the fusion memory's nearest-neighbour map (fusion only)",
           "patch_distances": "B x P nearest-memory distance per patch (domain distance = lower median)"}


class ExportRefused(ValueError):
    """The detector cannot be exported (its method, its sizes); the message says which and why."""


class ExportParityError(RuntimeError):
    """The exported model's verdicts (or scores beyond the tolerance) differ from the torch detector's."""


def check_exportable(detector: Any) -> None:
    """Raise :class:`ExportRefused` naming the method / setting that cannot be exported."""
    name = detector.variant
    if name not in EXPORTABLE:
        why = REFUSED.get(name, _NOT_YET)
        raise ExportRefused(f"method {name!r} cannot be exported: {why}. Exportable methods: "
                            f"{', '.join(EXPORTABLE)}; serve this model with torch instead (`ccad predict MODEL`)")
    s = detector.input_size
    sizes = {"image_size": detector.image_size}
    scorer = getattr(detector.method, "scorer", None)
    if scorer is not None:
        sizes["PatchCore memory image_size"] = int(scorer.image_size)
    if detector.fusion is not None:
        sizes["scoring.fusion_image_size"] = detector.fusion.image_size
    elif detector.domain_source and detector._bank_is_backbone() and not hasattr(
            getattr(detector.method, "scorer", None), "score_maps"):
        sizes["bank image_size"] = int((detector.bank.meta or {}).get("image_size") or detector.image_size)
    other = {k: v for k, v in sizes.items() if int(v) != int(s)}
    if other:
        raise ExportRefused(f"{name}: the export reads every image at one size ({s} px); this model also resizes "
                            f"to {other}. Rebuild it with equal sizes to export it")


def verdict_spec(detector: Any, outputs: Sequence[str], graph_file: str, backend: str) -> dict[str, Any]:
    """The ``verdict.json`` of ``detector`` (see the module docstring)."""
    sc = detector.config.scoring
    cal = detector.calibration
    bb = None
    for obj in (getattr(getattr(detector.method, "scorer", None), "backbone", None),
                getattr(getattr(detector.method, "_encoder", None), "backbone", None)):
        if obj is not None:
            bb = obj
            break
    norm = None if bb is None else {"mean": [float(v) for v in bb.mean.flatten()],
                                    "std": [float(v) for v in bb.std.flatten()], "in_graph": True,
                                    "rule": "(x - mean) / std per channel, inside the graph"}
    fusion = None
    if detector.fusion is not None:
        f = detector.fusion
        if not f.fitted:
            raise ExportRefused("the fusion statistics are not fitted: calibrate the detector before exporting")
        fusion = {"weight": float(f.weight), "norm": f.norm, "stats": {k: vars(v) for k, v in f.stats.items()},
                  "rule": "w * (method - loc_m) / scale_m + (1 - w) * (bank - loc_b) / scale_b (std: mean/std; "
                          "quantile: median / (q99.9 - median)), in numpy"}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": detector.variant,
        "graph": {"file": graph_file, "backend": backend, "outputs": list(outputs), "dynamic_batch": True},
        "input": {"name": "image", "size": int(detector.input_size),
                  "framing": detector.config.resize, "tile_stride": detector.config.tile_stride,
                  "layout": "B x 3 x S x S, RGB, float32 in [0, 1]",
                  "read": "ccad.data.coerce.coerce_image (grey/RGB/RGBA/16-bit -> float32 RGB in [0, 1])",
                  "resize": "bilinear with antialias (torch F.interpolate antialias=True = PIL triangle filter), "
                            "align_corners=False, then clamp to [0, 1]; none when already S x S",
                  "normalisation": norm},
        "outputs": {k: v for k, v in OUTPUTS.items() if k in outputs},
        "map": {"smoothing": {"sigma_at_256px": float(sc.sigma), "in_graph": True},
                "to_image_size": "bilinear, align_corners=False, no antialias (numpy)"},
        "score": {"score": sc.score, "topk_ratio": float(sc.topk_ratio),
                  "topk_count": None if sc.topk_count is None else int(sc.topk_count),
                  "rule": "max of the map, or the mean of its top k values (k = topk_count or round(topk_ratio * "
                          "pixels)), on the S x S map"},
        "threshold": None if cal is None else float(cal.threshold),
        "calibration": None if cal is None else json.loads(json.dumps(cal.to_dict(), default=float)),
        "verdict_rule": "error if score or map is NaN/inf; uncalibrated without a finite threshold; anomalous "
                        "if score > threshold; else good (ccad.scoring.verdict.status_of)",
        "domain_rule": "out of domain when the lower median of patch_distances > calibration.domain.limit",
        "fusion": fusion, "map_floor": float(detector.map_floor),
        "card": json.loads(json.dumps(detector.card(), default=str)),
    }


def card_text(spec: dict[str, Any], parity: dict[str, Any]) -> str:
    card = spec["card"]
    rows = "\n".join(f"| {k} | {json.dumps(v, default=str)} |" for k, v in card.items() if k != "search")
    return (f"# ccad export: {card.get('title', spec['method'])}\n\n"
            f"Graph: `{spec['graph']['file']}` ({spec['graph']['backend']}), input {spec['input']['size']} px, "
            f"dynamic batch. Everything the verdict needs beyond the graph is in `{VERDICT_FILE}`.\n\n"
            "```python\nfrom ccad.runtime import load   # numpy + Pillow + onnxruntime (or openvino); no torch\n"
            "p = load('this folder').predict('image.png')\nprint(p.score, p.verdict, p.out_of_domain)\n```\n\n"
            f"Or `ccad predict THIS_FOLDER images/ --out results/`.\n\n"
            f"## Parity with the torch detector ({PARITY_FILE})\n\n"
            f"{parity['n_images']} images ({parity['sources']}): largest score difference "
            f"{parity['max_score_abs_diff']:.3g} (relative {parity['max_score_rel_diff']:.3g}), largest map difference "
            f"{parity['max_map_abs_diff']:.3g} (relative to the map's range {parity['max_map_rel_diff']:.3g}), "
            f"verdicts differing: {parity['verdicts_differ']}, out-of-domain flags differing: "
            f"{parity['out_of_domain_differ']}.\n\n## Model\n\n| field | value |\n|---|---|\n{rows}\n")


def export_detector(detector: Any, out: str | Path, format: str = "onnx",
                    parity_images: Optional[Sequence[Any]] = None, overwrite: bool = False) -> Path:
    """Write the export folder of ``detector`` into ``out`` and prove it (``parity.json``).

    ``parity_images``: good images (paths or arrays) to compare on; default: synthetic textures
    (:mod:`ccad.export.parity`). Raises :class:`ExportRefused` (method or sizes) or
    :class:`ExportParityError` (a verdict differs: ``out`` then holds ``parity.json`` only)."""
    from .graph import export_onnx
    from .parity import check_parity

    if format not in FORMATS:
        raise ExportRefused(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_exportable(detector)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ccad-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        outputs = export_onnx(detector, onnx_path)
        if format == "onnx":
            shutil.copyfile(onnx_path, out / "model.onnx")
            graph_file, backend = "model.onnx", "onnxruntime"
        else:
            try:
                import openvino as ov
            except ImportError as exc:
                raise ExportRefused("--format openvino needs the openvino package: pip install 'ccad[openvino]'") \
                    from exc
            # float32 weights: OpenVINO's default FP16 compression moved a score by 2e-2 (issue 22)
            ov.save_model(ov.convert_model(str(onnx_path)), str(out / "model.xml"), compress_to_fp16=False)
            graph_file, backend = "model.xml", "openvino"
    spec = verdict_spec(detector, outputs, graph_file, backend)
    (out / VERDICT_FILE).write_text(json.dumps(spec, indent=1, default=float), encoding="utf-8")
    parity = check_parity(detector, out, parity_images)
    (out / PARITY_FILE).write_text(json.dumps(parity, indent=1, default=float), encoding="utf-8")
    if not parity["passed"]:
        (out / VERDICT_FILE).unlink()
        raise ExportParityError(f"{out / PARITY_FILE}: the export does not score as the torch detector: "
                                f"{parity['verdicts_differ']} verdict(s) and {parity['out_of_domain_differ']} "
                                f"out-of-domain flag(s) differ, largest score difference "
                                f"{parity['max_score_abs_diff']:.3g} (tolerance {parity['tolerance']}); the folder "
                                f"holds no {VERDICT_FILE}, so it cannot be run")
    (out / CARD_FILE).write_text(card_text(spec, parity), encoding="utf-8")
    return out
