"""The detector's map computation as one ONNX graph.

The graph is traced from the detector's own code (:meth:`ccad.detector.AnomalyDetector._map_parts`:
the method's ``maps`` hook, the fusion memory's map, the domain distances), so the exported numbers
come from the code the torch detector runs. Two functions are swapped while tracing, each for one
that computes the same numbers with operators ONNX has:

- :func:`ccad.features.patchcore.nearest_distances` (``torch.cdist``, chunked) by
  :func:`mm_nearest_distances`: the same Euclidean distance written as ``torch.cdist`` computes it
  for more than 25 rows (its "use_mm_for_euclid_dist" path): ``d^2 = [-2q, |q|^2, 1] [m, 1, |m|^2]^T``;
  the nearest ``k`` by ``min`` / ``topk`` of ``d^2`` (PatchCore eq. 6), then clamped at 1e-30 and
  square-rooted (monotonic, so the same values as rooting every distance first);
- :func:`ccad.scoring.domain.patch_median` by the flattened patch distances (``torch.median`` has
  no ONNX operator; the runtime takes the lower median in numpy, as ``torch.median`` does).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

OPSET = 17


def mm_nearest_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
                         chunk_elems: int = 0, group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ccad.features.patchcore.nearest_distances` as one matmul (no chunks, so ``group`` is
    moot; see the module docstring)."""
    q, b = queries.float(), bank.float()
    k = min(int(k), b.shape[0])
    qn = q.pow(2).sum(-1, keepdim=True)
    bn = b.pow(2).sum(-1, keepdim=True)
    qa = torch.cat([-2.0 * q, qn, torch.ones_like(qn)], dim=-1)
    ba = torch.cat([b, torch.ones_like(bn), bn], dim=-1)
    d2 = qa @ ba.transpose(0, 1)
    # the nearest by squared distance, then clamp + square root of those k only: both are
    # non-decreasing, so the values equal rooting every distance first, bit for bit, without two passes over
    # the whole queries x memory matrix (a third less CPU for the kNN of a 7025-row memory, issue 22)
    if k == 1:
        v, j = d2.min(dim=1, keepdim=True)
    else:
        v, j = d2.topk(k, dim=1, largest=False)
    return v.clamp_min(1e-30).sqrt().clamp_min(0.0), j


def _flat_distances(distances: torch.Tensor) -> torch.Tensor:
    return distances.reshape(distances.shape[0], -1).float()


@contextlib.contextmanager
def exportable_ops() -> Iterator[None]:
    """Swap in the ONNX-friendly equivalents of the module docstring while tracing."""
    import ccad.features.patchcore as pc
    import ccad.scoring.domain as dom

    saved = pc.nearest_distances, dom.patch_median
    pc.nearest_distances, dom.patch_median = mm_nearest_distances, _flat_distances
    try:
        yield
    finally:
        pc.nearest_distances, dom.patch_median = saved


class DetectorGraph(nn.Module):
    """``image B x 3 x S x S`` -> ``method_map B x 1 x S x S`` [, ``bank_map``] [, ``patch_distances B x P``]."""

    def __init__(self, detector: Any) -> None:
        super().__init__()
        self.detector = detector
        self.output_names: list[str] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps, bank, rec, dist = self.detector._map_parts(x)
        if rec is not None:
            raise RuntimeError("DetectorGraph: the method returned reconstructions; only map-only methods export")
        outs = [("method_map", maps)]
        if bank is not None:
            outs.append(("bank_map", bank))
        if dist is not None:
            outs.append(("patch_distances", dist))
        self.output_names = [n for n, _ in outs]
        return tuple(t.float() for _, t in outs)


def export_onnx(detector: Any, path: Path, batch: int = 2) -> list[str]:
    """Trace ``detector`` into ``path`` (opset 17, dynamic batch); returns the output names."""
    s = int(detector.input_size)
    graph = DetectorGraph(detector).eval()
    x = torch.rand(batch, 3, s, s, generator=torch.Generator().manual_seed(0), device=detector.device)
    params = [q for q in detector.method.modules.parameters() if q.requires_grad]
    for q in params:  # a trained network's weights become graph constants
        q.requires_grad_(False)
    try:
        return _trace(graph, x, path)
    finally:
        for q in params:
            q.requires_grad_(True)


def _trace(graph: DetectorGraph, x: torch.Tensor, path: Path) -> list[str]:
    with exportable_ops(), torch.no_grad():
        graph(x)  # fills lazily built state (a method's fixed noise field) before tracing
        names = list(graph.output_names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["image"],
                              output_names=names, do_constant_folding=True,
                              dynamic_axes={n: {0: "batch"} for n in ["image", *names]})
    return names
