"""The export runtime: a detector written by ``ccad export`` run with numpy, Pillow and
onnxruntime (or OpenVINO) only. It never imports torch (a test checks it in a fresh process);
the image reader it shares with the torch detector (``ccad.data.io``) uses OpenCV when installed
(to shrink images over 2048 px; heatmaps and overlays are drawn with it too).

    from ccad.runtime import load
    model = load("export_dir")                 # onnxruntime (or OpenVINO for an IR export)
    p = model.predict("part.png")              # path, PIL image or numpy array; any size
    p.score, p.anomaly_map, p.verdict, p.out_of_domain, p.threshold

``predict`` returns the same :class:`ccad.prediction.Prediction` as
:meth:`ccad.detector.AnomalyDetector.predict` (score, anomaly_map at the image's size, verdict /
status, threshold, out_of_domain, domain_distance, domain_limit, error, seconds, path; the
reconstruction is None: the exportable methods have none). ``predict_many(items, batch_size)``
returns ``(predictions, errors)`` as the detector's does.

What the graph computes and what this module computes (``verdict.json`` holds every number):

1. the image is read as the detector reads it (:func:`ccad.data.coerce.coerce_image`: float32
   ``H x W x 3`` in [0, 1]) and resized to the model's square input size with the bilinear
   antialiased filter torch's ``F.interpolate(..., antialias=True)`` uses (the PIL triangle
   filter, :func:`resize_weights`), then clamped to [0, 1] (``ccad.data.convert.to_tensor``);
2. the graph (normalisation, backbone, the nearest-neighbour distance to the memory as a matmul,
   the method's map, its bilinear upsampling and Gaussian smoothing) gives the method's map
   ``B x 1 x S x S``, the bank's map when the detector fuses, and the per-patch memory distances;
3. here: the fusion (``w * (M - mu_m) / sd_m + (1 - w) * (B - mu_b) / sd_b``,
   :mod:`ccad.scoring.fusion`), the image score (``max`` or the mean of the top k,
   :func:`ccad.scoring.anomaly_map.image_score`), the domain distance (the lower median of the
   patch distances, as ``torch.median``; :mod:`ccad.scoring.domain`), the verdict
   (:func:`ccad.scoring.verdict.status_of`) and the map's plain bilinear resize back to the
   image's size.

Threading: onnxruntime's pool threads do not busy-wait between operators (onnxruntime's default
is to spin; on a shared CPU that doubled the CPU per image, issue 22), and the thread count is the
backend's default; ``load(DIR, threads=N, spinning=True)`` or ``$CCAD_RUNTIME_THREADS`` /
``$CCAD_RUNTIME_SPINNING=1`` change them (:func:`thread_settings`). Resizing is numpy only, no
BLAS call (:func:`resize_taps`).

A model built with ``resize`` = ``keep-aspect`` or ``tile`` (``input.framing`` in ``verdict.json``,
:mod:`ccad.data.framing`) is framed here as the torch detector frames it: step 1 letterboxes the
image (resized without distortion, centred on its mean colour) or cuts its tiles at native size
(:func:`framed_inputs`); step 3 crops the map to the image's region or stitches the tiles' maps
(overlaps averaged, :func:`framed_region`), takes the score on that region and the domain
distance as the lower median over the image's inputs.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .data.coerce import coerce_image, decode_item
from .prediction import Prediction

VERDICT_FILE = "verdict.json"
FORMAT = "ccad-export"
FORMAT_VERSION = 1


class ExportFolderError(ValueError):
    """An export folder that cannot be run (missing file, unknown field); the message names it."""


# ---- resizing, as torch does it ------------------------------------------------------------

def resize_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """``n_out x n_in`` interpolation matrix of torch's bilinear ``F.interpolate`` (align_corners=False).

    ``antialias=True``: the separable triangle filter of PIL / torch's antialiased path: scale
    ``s = n_in / n_out``, support ``max(s, 1)``, centre ``s (i + 0.5)``, weights
    ``max(0, 1 - |j + 0.5 - centre| / max(s, 1))`` over the clipped window, normalised.
    ``antialias=False``: source ``s (i + 0.5) - 0.5`` clamped at 0, the two neighbours
    ``floor`` and ``floor + 1`` (clamped to the last pixel) weighted linearly."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    if antialias:
        support = scale if scale >= 1.0 else 1.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(n_out):
            centre = scale * (i + 0.5)
            lo = max(int(centre - support + 0.5), 0)
            hi = min(int(centre + support + 0.5), n_in)
            j = np.arange(lo, hi)
            k = np.clip(1.0 - np.abs((j - centre + 0.5) * inv), 0.0, None)
            s = k.sum()
            w[i, lo:hi] = k / s if s > 0 else k
        return w
    f32 = np.float32
    s32 = f32(n_in) / f32(n_out)  # torch computes the source index in float32: so do we
    for i in range(n_out):
        src = max(f32(s32 * f32(i + 0.5)) - f32(0.5), f32(0.0))
        i0 = min(int(src), n_in - 1)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        lam = min(max(f32(src - f32(i0)), f32(0.0)), f32(1.0))
        w[i, i0] += f32(1.0) - lam
        w[i, i1] += lam
    return w


@functools.lru_cache(maxsize=64)
def resize_taps(n_in: int, n_out: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero band of :func:`resize_weights` per output row: ``(index n_out x K, weight n_out x K
    float32)`` (a weight of 0 where a row has fewer than ``K`` taps). Cached: a line camera sends one size.

    Each output pixel reads 2 input pixels (bilinear) or ``~2 n_in / n_out + 1`` (antialiased), so the
    resize costs ``out x K`` multiply-adds instead of the dense matrix's ``out x n_in``, and no BLAS
    call (numpy's OpenBLAS threads busy-wait after each call: on a shared CPU the dense resize cost
    more CPU than the graph itself, issue 22)."""
    w = resize_weights(n_in, n_out, antialias)
    nz = w != 0
    first = np.where(nz.any(1), nz.argmax(1), 0)
    last = np.where(nz.any(1), n_in - 1 - nz[:, ::-1].argmax(1), 0)
    k = max(1, int((last - first).max()) + 1)
    idx = first[:, None] + np.arange(k)[None, :]
    inside = idx < n_in
    idx = np.minimum(idx, n_in - 1)
    weight = np.where(inside, np.take_along_axis(w, idx, axis=1), 0.0).astype(np.float32)
    idx.setflags(write=False)
    weight.setflags(write=False)
    return idx, weight


def _resize_axis(a: np.ndarray, n_out: int, axis: int, antialias: bool) -> np.ndarray:
    idx, weight = resize_taps(a.shape[axis], n_out, antialias)
    shape = [1] * a.ndim
    shape[axis] = n_out
    out = np.take(a, idx[:, 0], axis=axis) * weight[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        out += np.take(a, idx[:, k], axis=axis) * weight[:, k].reshape(shape)
    return out


def resize(a: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Resize ``H x W`` or ``H x W x C`` float32 as :func:`resize_weights` (float32 out): rows, then
    columns, each through its :func:`resize_taps` band."""
    h, w = a.shape[:2]
    if (h, w) == tuple(size):
        return a
    a = a.astype(np.float32, copy=False)
    if h != int(size[0]):
        a = _resize_axis(a, int(size[0]), 0, antialias)
    if w != int(size[1]):
        a = _resize_axis(a, int(size[1]), 1, antialias)
    return np.ascontiguousarray(a, dtype=np.float32)


def model_input(image: np.ndarray, size: int) -> np.ndarray:
    """``H x W x 3`` float image -> ``3 x S x S`` (``ccad.data.convert.to_tensor``: antialiased
    bilinear, then clamped to [0, 1]; untouched when already S x S)."""
    if tuple(image.shape[:2]) != (size, size):
        image = np.clip(resize(image, (size, size), antialias=True), 0.0, 1.0)
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def framed_inputs(image: np.ndarray, layout: Any) -> list[np.ndarray]:
    """The ``3 x S x S`` inputs of one image under ``keep-aspect`` / ``tile``
    (:func:`ccad.data.framing.frame_tensor` in numpy): the image resized without distortion and
    centred on its mean colour, or its tiles at native size (padded with its mean colour where
    the image is smaller than a tile)."""
    s = layout.size
    if layout.mode == "keep-aspect":
        nh, nw = layout.content
        content = image if (nh, nw) == tuple(image.shape[:2]) else np.clip(
            resize(image, (nh, nw), antialias=True), 0.0, 1.0)
        content = np.ascontiguousarray(content.transpose(2, 0, 1), dtype=np.float32)
        top, left = layout.offset
        x = np.empty((3, s, s), np.float32)
        x[:] = content.mean(axis=(1, 2), keepdims=True)
        x[:, top:top + nh, left:left + nw] = content
        return [x]
    ch, cw = layout.canvas
    img = image
    if (ch, cw) != image.shape[:2]:
        img = np.empty((ch, cw, 3), np.float32)
        img[:] = image.reshape(-1, 3).mean(0)
        img[:image.shape[0], :image.shape[1]] = image
    return [np.ascontiguousarray(img[t:t + s, le:le + s].transpose(2, 0, 1), dtype=np.float32)
            for t, le in layout.boxes]


def framed_region(maps: np.ndarray, layout: Any) -> np.ndarray:
    """One image's maps ``K x S x S`` -> the map its score is taken on (:func:`ccad.data.framing.score_region`):
    keep-aspect: the image's region of the input; tile: the stitched map at the image's size."""
    if layout.mode == "keep-aspect":
        (nh, nw), (top, left) = layout.content, layout.offset
        return maps[0, top:top + nh, left:left + nw]
    s = layout.size
    ch, cw = layout.canvas
    acc = np.zeros((ch, cw), np.float32)
    cnt = np.zeros((ch, cw), np.float32)
    for k, (t, le) in enumerate(layout.boxes):
        acc[t:t + s, le:le + s] += maps[k]
        cnt[t:t + s, le:le + s] += 1
    return (acc / cnt)[:layout.height, :layout.width]


# ---- the post-processing the graph leaves to numpy -----------------------------------------

def image_score(maps: np.ndarray, rule: dict[str, Any]) -> np.ndarray:
    """Image scores ``B`` from ``B x H x W`` maps (:func:`ccad.scoring.anomaly_map.image_score`)."""
    flat = maps.reshape(maps.shape[0], -1)
    if rule["score"] == "max":
        return flat.max(1)
    if rule["score"] == "topk":
        n = flat.shape[1]
        k = (max(1, min(int(rule["topk_count"]), n)) if rule.get("topk_count") is not None
             else max(1, int(round(n * float(rule["topk_ratio"])))))
        top = -np.partition(-flat, k - 1, axis=1)[:, :k]
        return np.sort(top, axis=1)[:, ::-1].mean(1, dtype=np.float32)
    raise ExportFolderError(f"{VERDICT_FILE}: score.score must be 'max' or 'topk', got {rule['score']!r}")


def lower_median(a: np.ndarray) -> np.ndarray:
    """``torch.median(dim=1)``: the lower of the two middle values for an even count (``B x N`` -> ``B``)."""
    n = a.shape[1]
    return np.partition(a, (n - 1) // 2, axis=1)[:, (n - 1) // 2]


def normalise(maps: np.ndarray, stats: dict[str, Any], norm: str) -> np.ndarray:
    """:meth:`ccad.scoring.fusion.ComponentStats.normalise` in float32."""
    if norm == "quantile":
        return (maps - np.float32(stats["median"])) / np.float32(max(float(stats["q_hi"]) - float(stats["median"]),
                                                                     1e-8))
    return (maps - np.float32(stats["mean"])) / np.float32(max(float(stats["std"]), 1e-8))


def fuse(method: np.ndarray, bank: np.ndarray, fusion: dict[str, Any]) -> np.ndarray:
    """:meth:`ccad.scoring.fusion.BankFusion.combine` (view ``fused``)."""
    w = float(fusion["weight"])
    st = fusion["stats"]
    return (np.float32(w) * normalise(method, st["method"], fusion["norm"])
            + np.float32(1.0 - w) * normalise(bank, st["bank"], fusion["norm"]))


# ---- backends -------------------------------------------------------------------------------

#: environment variables that override the backend's threading (``load(..., threads=, spinning=)`` win)
THREADS_ENV = "CCAD_RUNTIME_THREADS"
SPINNING_ENV = "CCAD_RUNTIME_SPINNING"


def thread_settings(threads: Optional[int] = None, spinning: Optional[bool] = None) -> dict[str, Any]:
    """The backend's threading: ``{"threads": N or None, "spinning": bool}``.

    ``threads``: the intra-op threads (onnxruntime ``intra_op_num_threads``, OpenVINO
    ``INFERENCE_NUM_THREADS``); default ``$CCAD_RUNTIME_THREADS``, else None: the backend's own
    default (one per physical core). ``spinning``: whether onnxruntime's pool threads busy-wait for
    the next operator (``session.intra_op.allow_spinning`` and ``session.inter_op.allow_spinning``);
    default ``$CCAD_RUNTIME_SPINNING`` (``1`` / ``0``), else **off**. onnxruntime spins by default;
    measured on the shared 2-core machine (issue 22), spinning about doubled the graph's CPU time
    per image (PatchCore at 256 px, batch 1: 96 vs 40 ms, ``python -m benchmarks bank_speed --part
    inference``), as OpenMP's active wait does for torch (``import ccad`` sets
    ``OMP_WAIT_POLICY=PASSIVE`` for that; onnxruntime's own thread pool does not read it).
    Turn it on for a dedicated, idle machine where the lowest latency matters more than CPU."""
    if threads is None and os.environ.get(THREADS_ENV, "").strip():
        try:
            threads = int(os.environ[THREADS_ENV])
        except ValueError:
            raise ExportFolderError(f"${THREADS_ENV} must be a whole number of threads, got "
                                    f"{os.environ[THREADS_ENV]!r}") from None
    if threads is not None and int(threads) < 0:
        raise ExportFolderError(f"threads must be >= 0 (0: the backend's default), got {threads}")
    if spinning is None:
        raw = os.environ.get(SPINNING_ENV, "").strip().lower()
        if raw not in ("", "0", "1", "false", "true", "off", "on", "no", "yes"):
            raise ExportFolderError(f"${SPINNING_ENV} must be 1 or 0, got {os.environ[SPINNING_ENV]!r}")
        spinning = raw in ("1", "true", "on", "yes")
    return {"threads": int(threads) if threads else None, "spinning": bool(spinning)}


class _OnnxSession:
    def __init__(self, path: Path, threads: Optional[int], spinning: Optional[bool] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency
            raise ExportFolderError(f"{path}: onnxruntime is not installed (pip install onnxruntime)") from exc
        self.settings = thread_settings(threads, spinning)
        opts = ort.SessionOptions()
        if self.settings["threads"]:
            opts.intra_op_num_threads = self.settings["threads"]
        spin = "1" if self.settings["spinning"] else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))


class _OpenVinoSession:
    def __init__(self, path: Path, threads: Optional[int], spinning: Optional[bool] = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ExportFolderError(f"{path}: this export is an OpenVINO IR and openvino is not installed "
                                    "(pip install 'ccad[openvino]')") from exc
        self.settings = thread_settings(threads, spinning)  # OpenVINO's CPU plugin has no spin setting
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # never bf16/fp16 on capable CPUs
        if self.settings["threads"]:
            config["INFERENCE_NUM_THREADS"] = self.settings["threads"]
        self.model = ov.Core().compile_model(str(path), "CPU", config)
        self.outputs = [o.get_any_name() for o in self.model.outputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.model(feeds)
        return {name: np.asarray(res[out]) for name, out in zip(self.outputs, self.model.outputs)}


# ---- the runtime detector -------------------------------------------------------------------

class ExportedDetector:
    """A detector read from an export folder (see the module docstring). ``threshold`` can be set
    for a run (as ``AnomalyDetector.threshold``); ``spec`` is ``verdict.json``."""

    def __init__(self, path: str | Path, backend: Optional[str] = None, threads: Optional[int] = None,
                 spinning: Optional[bool] = None) -> None:
        self.path = Path(path)
        f = self.path / VERDICT_FILE
        if not f.is_file():
            raise ExportFolderError(f"{f}: missing; not a ccad export folder (write one with `ccad export MODEL "
                                    f"--out DIR`)")
        try:
            spec = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ExportFolderError(f"{f}: not valid JSON ({exc})") from None
        if spec.get("format") != FORMAT:
            raise ExportFolderError(f"{f}: field 'format' is {spec.get('format')!r}, expected {FORMAT!r}")
        if int(spec.get("format_version", 0)) > FORMAT_VERSION:
            raise ExportFolderError(f"{f}: format_version {spec.get('format_version')} is newer than this ccad "
                                    f"reads ({FORMAT_VERSION}); upgrade ccad")
        for key in ("graph", "input", "score", "outputs"):
            if key not in spec:
                raise ExportFolderError(f"{f}: field {key!r} is missing")
        self.spec = spec
        graph = spec["graph"]
        self.backend = backend or graph["backend"]
        g = self.path / graph["file"]
        if not g.is_file():
            raise ExportFolderError(f"{g}: missing (named by {VERDICT_FILE} field 'graph.file')")
        if self.backend == "onnxruntime":
            self.session: Any = _OnnxSession(g, threads, spinning)
        elif self.backend == "openvino":
            self.session = _OpenVinoSession(g, threads, spinning)
        else:
            raise ExportFolderError(f"{f}: graph.backend must be 'onnxruntime' or 'openvino', got {self.backend!r}")
        self.threading: dict[str, Any] = dict(self.session.settings)  # thread_settings(threads, spinning)
        cal = spec.get("calibration") or {}
        self._threshold = float(spec["threshold"]) if spec.get("threshold") is not None else float("nan")
        dom = cal.get("domain") or None
        self.domain_limit: Optional[float] = None if dom is None else float(dom["limit"])
        self.map_floor = float(spec.get("map_floor", 0.0))
        self.input_size = int(spec["input"]["size"])
        self.framing = spec["input"].get("framing", "square")  # the model's resize mode (ccad.data.framing)
        self.tile_stride = spec["input"].get("tile_stride")
        if self.framing not in ("square", "keep-aspect", "tile"):
            raise ExportFolderError(f"{f}: input.framing must be square, keep-aspect or tile, got {self.framing!r}")
        self.variant = str(spec.get("method", ""))
        self.source: Optional[Path] = self.path

    # ---- the same surface as AnomalyDetector where ccad predict / serve use it ------------------
    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value}")
        self._threshold = value

    @property
    def image_size(self) -> int:
        return self.input_size

    def card(self) -> dict[str, Any]:
        return dict(self.spec.get("card") or {}, threshold=self.threshold, export=str(self.path))

    def run_graph(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for a batch ``B x 3 x S x S`` float32 in [0, 1]."""
        return self.session({self.spec["input"]["name"]: np.ascontiguousarray(x, dtype=np.float32)})

    def maps_and_scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(maps B x S x S, scores B, domain distances B or None)`` for a model-size batch."""
        out = self.run_graph(x)
        maps = out["method_map"][:, 0]
        fusion = self.spec.get("fusion")
        if fusion is not None:
            maps = fuse(maps, out["bank_map"][:, 0], fusion)
        scores = image_score(maps, self.spec["score"])
        dist = out.get("patch_distances")
        domain = None if dist is None else lower_median(dist.reshape(dist.shape[0], -1))
        return maps.astype(np.float32), scores.astype(np.float32), domain

    def _predict_batch(self, images: list[np.ndarray], paths: list[Optional[str]],
                       read_seconds: Sequence[float]) -> list[Prediction]:
        own = list(read_seconds)
        if self.framing != "square":
            return self._predict_framed(images, paths, own)
        xs = []
        for i, im in enumerate(images):
            t = time.perf_counter()
            xs.append(model_input(im, self.input_size))
            own[i] += time.perf_counter() - t
        t0 = time.perf_counter()
        maps, scores, domain = self.maps_and_scores(np.stack(xs))
        per = (time.perf_counter() - t0) / len(images)
        out = []
        for i, im in enumerate(images):
            t = time.perf_counter()
            h, w = im.shape[:2]
            m = resize(maps[i], (h, w), antialias=False)
            finite = bool(np.isfinite(maps[i]).all() and np.isfinite(scores[i]))
            err = None if finite else (f"the exported model gave a non-finite anomaly score or map (NaN or inf): no "
                                       f"verdict; check the export folder {self.path} (re-export it)")
            p = Prediction(image=im, reconstruction=None, anomaly_map=m.astype(np.float32), score=float(scores[i]),
                           threshold=self.threshold, seconds=0.0, path=paths[i], map_floor=self.map_floor, error=err,
                           domain_distance=None if domain is None else float(domain[i]),
                           domain_limit=self.domain_limit)
            p.seconds = own[i] + per + (time.perf_counter() - t)
            out.append(p)
        return out

    def _predict_framed(self, images: list[np.ndarray], paths: list[Optional[str]],
                        own: list[float]) -> list[Prediction]:
        """``keep-aspect`` / ``tile`` (:mod:`ccad.data.framing`, as ``AnomalyDetector._predict_framed``):
        each image's letterboxed input or tiles through the graph; the map cropped to the image
        (keep-aspect) or stitched (tile, overlaps averaged), the score by the model's rule on that
        region, the domain distance the (lower) median over the image's inputs."""
        from .data.framing import plan

        layouts, xs = [], []
        for i, im in enumerate(images):
            t = time.perf_counter()
            lay = plan(im.shape[0], im.shape[1], self.input_size, self.framing, self.tile_stride)
            layouts.append(lay)
            xs.extend(framed_inputs(im, lay))
            own[i] += time.perf_counter() - t
        t0 = time.perf_counter()
        maps, _, domain = self.maps_and_scores(np.stack(xs))
        seconds = time.perf_counter() - t0
        total = len(xs)
        out, at = [], 0
        for i, (im, lay) in enumerate(zip(images, layouts)):
            t = time.perf_counter()
            k = lay.n_inputs
            region = framed_region(maps[at:at + k], lay)
            score = float(image_score(region[None], self.spec["score"])[0])
            m = region if lay.mode == "tile" else resize(region, (lay.height, lay.width), antialias=False)
            dom = None if domain is None else float(lower_median(domain[at:at + k][None].astype(np.float32))[0])
            at += k
            finite = bool(np.isfinite(m).all() and math.isfinite(score))
            err = None if finite else (f"the exported model gave a non-finite anomaly score or map (NaN or inf): no "
                                       f"verdict; check the export folder {self.path} (re-export it)")
            p = Prediction(image=im, reconstruction=None, anomaly_map=m.astype(np.float32), score=score,
                           threshold=self.threshold, seconds=0.0, path=paths[i], map_floor=self.map_floor, error=err,
                           domain_distance=dom, domain_limit=self.domain_limit)
            p.seconds = own[i] + seconds * k / total + (time.perf_counter() - t)
            out.append(p)
        return out

    def predict(self, image: Any) -> Prediction:
        """Inspect one image (path, PIL image or numpy array; grey/RGB/RGBA/16-bit; any size)."""
        path = str(image) if isinstance(image, (str, Path)) else None
        t = time.perf_counter()
        im = coerce_image(image)
        return self._predict_batch([im], [path], [time.perf_counter() - t])[0]

    def predict_many(self, items: Iterable[Any], batch_size: int = 8, on_error: str = "skip",
                     progress: Optional[Callable[[int, int], None]] = None,
                     cancel: Optional[Callable[[], bool]] = None) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Inspect many images in batches; unreadable files go to ``errors`` (as the detector's)."""
        items = list(items)
        results: list[Prediction] = []
        errors: list[tuple[str, str]] = []
        batch: list[np.ndarray] = []
        paths: list[Optional[str]] = []
        reads: list[float] = []
        for done, item in enumerate(items, 1):
            if cancel is not None and cancel():
                break
            got = decode_item(item, done - 1, on_error, errors, coerce_image, time.perf_counter)
            if got is not None:
                batch.append(got[0])
                reads.append(got[1])
                paths.append(got[2])
            if len(batch) >= batch_size:
                results.extend(self._predict_batch(batch, paths, reads))
                batch, paths, reads = [], [], []
            if progress is not None:
                progress(done, len(items))
        if batch:
            results.extend(self._predict_batch(batch, paths, reads))
        return results, errors


def is_export_folder(path: str | Path) -> bool:
    """True for a folder written by ``ccad export`` (it holds ``verdict.json``)."""
    return (Path(path) / VERDICT_FILE).is_file()


def load(path: str | Path, backend: Optional[str] = None, threads: Optional[int] = None,
         spinning: Optional[bool] = None) -> ExportedDetector:
    """Read an export folder: ``load(DIR).predict(image)`` (``backend``: ``onnxruntime`` or
    ``openvino``; default: the one the folder was exported for; ``threads`` / ``spinning``: the
    backend's threading, see :func:`thread_settings`: default ``$CCAD_RUNTIME_THREADS`` /
    ``$CCAD_RUNTIME_SPINNING``, else the backend's thread count and no busy-waiting)."""
    return ExportedDetector(path, backend=backend, threads=threads, spinning=spinning)
