"""The one object users call: :class:`AnomalyDetector`.

A detector is a method plug-in (:mod:`ccad.methods`: PatchCore, CCAD(V), ...) plus what every
method shares: the feature bank, the image score, the calibrated threshold, the files on disk
(written and read by :mod:`ccad.detector_folder`).
The detector never looks at the method's name; it asks the registry for the method class and
calls its hooks (``maps`` for a batch, ``save`` / ``load`` for its files).

``AnomalyDetector.from_pretrained(path_or_repo_id).predict(image_or_path)`` returns a
:class:`~ccad.prediction.Prediction` with the score, map, reconstruction, binary mask, verdict
and timing. Building and training detectors is :mod:`ccad.pipeline` (above this module).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin

from . import __version__
from .config import ConfigError
from .data.coerce import coerce_image, decode_item
from .data.convert import to_tensor, warn_aspect
from .detector_config import DetectorConfig
from .detector_folder import default_device, read_folder, save_folder, write_calibration, write_folder
from .errors import CheckpointError
from .methods import Method, get_method
from .methods.base import ABLATION_VIEW
from .prediction import Prediction
from .scoring.anomaly_map import image_score
from .scoring.threshold import Calibration

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------

class AnomalyDetector(
    ModelHubMixin,
    library_name="ccad",
    tags=["anomaly-detection", "ccad", "diffusion"],
    repo_url="https://github.com/ccad-project/ccad",
    paper_url="https://arxiv.org/abs/2512.21459",
):
    """A method plug-in + bank + image score + threshold behind one ``predict`` call.

    Args:
        config: the :class:`DetectorConfig` (its ``method`` section is the method's own config).
        bank: the Coarse Feature Bank (a :class:`ccad.features.FeatureBank`) or None for methods
            without one.
        method: the built or loaded :class:`ccad.methods.Method` instance.
        calibration / info: the threshold and plain facts (training count, metrics ...).
        fusion: the :class:`ccad.scoring.fusion.BankFusion` when ``config.scoring.fusion`` is
            ``"bank"`` (the method's map fused with a nearest-neighbour map), else None.
    """

    def __init__(
        self,
        config: DetectorConfig,
        bank: Any,
        method: Method,
        calibration: Optional[Calibration] = None,
        info: Optional[dict[str, Any]] = None,
        device: Optional[torch.device | str] = None,
        fusion: Any = None,
    ) -> None:
        self.config = config.validate()
        if not isinstance(method, get_method(config.variant)):
            raise ConfigError(f"a {config.variant} detector needs a {get_method(config.variant).__name__} "
                              f"method, got {type(method).__name__}")
        self.bank = bank
        self.method = method
        self.calibration = calibration
        self.info: dict[str, Any] = dict(info or {})
        self.source: Optional[Path] = None  # the folder load_folder read this detector from
        self.device = torch.device(device) if device is not None else default_device()
        if (config.scoring.fusion == "bank") != (fusion is not None):
            raise ConfigError("scoring.fusion is 'bank' but no fusion memory was given" if fusion is None
                              else "a fusion memory was given but scoring.fusion is 'none'")
        self.fusion = fusion.to(self.device) if fusion is not None else None
        ctx = method.ctx
        ctx.device, ctx.bank, ctx.scoring, ctx.bank_config = self.device, bank, config.scoring, config.bank
        method.config = config.method
        method.to(self.device)

    # ---- properties -------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def threshold(self) -> float:
        return float(self.calibration.threshold) if self.calibration is not None else float("nan")

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value}")
        if self.calibration is None:
            self.calibration = Calibration(threshold=value, method="manual")
        else:
            self.calibration.threshold = value
            self.calibration.method = "manual"
            self.calibration.source = None  # typed in: no longer the labelled point it may have been

    @property
    def input_size(self) -> int:
        """The square size images are read at: the model's, or the fusion memory's when larger
        (maps and reconstructions come back at this size)."""
        return max(self.image_size, self.fusion.image_size) if self.fusion is not None else self.image_size

    @property
    def resize(self) -> str:
        """How images become this model's input (``config.resize``, :mod:`ccad.data.framing`)."""
        return self.config.resize

    def layout(self, height: int, width: int) -> Any:
        """Where an ``height x width`` image's model inputs sit in it (:func:`ccad.data.framing.plan`)."""
        from .data.framing import plan

        return plan(height, width, self.input_size, self.config.resize, self.config.tile_stride)

    @property
    def views(self) -> tuple[str, ...]:
        """The maps this detector can give: ``fused`` / ``method`` / ``bank`` with fusion, else ``method``;
        plus ``ablation`` when its method declares one (:attr:`ccad.methods.base.Method.ablation`: the
        method's own map with its learned part replaced by the trivial one, from the same weights)."""
        from .scoring.fusion import VIEWS

        base = VIEWS if self.fusion is not None else ("method",)
        return base + (ABLATION_VIEW,) if self.method.ablation is not None else base

    @property
    def map_floor(self) -> float:
        return float(self.info.get("map_floor", 0.0))

    # ---- internals --------------------------------------------------------------------------
    @torch.no_grad()
    def map_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(method maps, bank maps or None, reconstructions or None)`` for a batch ``B x 3 x S' x S'``
        at :attr:`input_size`; the method sees the batch resized to its own size, and its maps
        and reconstructions come back at the batch's size."""
        return self._map_parts(x)[:3]

    @torch.no_grad()
    def _map_parts(self, x: torch.Tensor, out: Any = None) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                                                    Optional[torch.Tensor], Optional[torch.Tensor]]:
        """:meth:`map_parts` and the per-image domain distances ``B`` (:mod:`ccad.scoring.domain`;
        None when this detector has no memory of good patch features). ``out``: the method's
        :class:`~ccad.methods.base.MethodOutput` for this batch when already computed."""
        from .scoring.domain import patch_median

        x = x.to(self.device, torch.float32)
        size = tuple(x.shape[-2:])
        if out is None:
            out = self.method.maps(self._model_input(x))
        maps = out.maps.float()
        rec = None if out.reconstruction is None else out.reconstruction.float()
        if tuple(maps.shape[-2:]) != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        if rec is not None and tuple(rec.shape[-2:]) != size:
            rec = F.interpolate(rec, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
        bank, domain = None, getattr(out, "domain", None)
        if self.fusion is not None:  # the fusion memory (training patches) gives both the map and the distance
            raw = self.fusion.scorer.score_maps(x.float()).float()
            bank = self.fusion.maps_from_raw(raw, size)
            domain = patch_median(raw)
        elif domain is None:
            domain = self._bank_domain(x)
        return maps, bank, rec, None if domain is None else domain.float()

    @property
    def domain_source(self) -> Optional[str]:
        """Which memory of good patch features the domain distance is measured to, or None."""
        if self.fusion is not None:
            return "fusion memory (nearest-neighbour memory of the training patches)"
        if hasattr(getattr(self.method, "scorer", None), "score_maps"):
            return "PatchCore memory of the training patches"
        if self._bank_is_backbone():
            return "Coarse Feature Bank (coreset of the training patches)"
        return None

    def _bank_is_backbone(self) -> bool:
        meta = getattr(self.bank, "meta", None) or {}
        return (self.bank is not None and hasattr(self.bank, "features") and bool(meta.get("backbone"))
                and not str(meta.get("backbone")).startswith("latent:")
                and str(meta.get("backbone")) == str(self.config.bank.backbone))

    @torch.no_grad()
    def _bank_domain(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Domain distances to the Coarse Feature Bank (its backbone's patch features); None for a
        detector without a backbone bank (a latent bank, or no bank)."""
        if not self._bank_is_backbone():
            return None
        from .features.patchcore import nearest_distances
        from .scoring.fusion import bank_backbone
        from .scoring.domain import patch_median

        bb = getattr(self, "_domain_backbone", None)
        if bb is None:
            bb = self._domain_backbone = bank_backbone(self.config.bank, self.device).eval()
        s = int((self.bank.meta or {}).get("image_size") or self.image_size)
        xb = x if tuple(x.shape[-2:]) == (s, s) else F.interpolate(x, size=(s, s), mode="bilinear",
                                                                  align_corners=False, antialias=True)
        f = bb(xb)
        b, d = f.shape[:2]
        feats = self.bank.features.to(f.device)
        if d != feats.shape[1]:
            return None
        dist, _ = nearest_distances(f.permute(0, 2, 3, 1).reshape(-1, d), feats, group=f.shape[2] * f.shape[3])
        return patch_median(dist.view(b, -1))

    def _model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch at :attr:`input_size` resized to the method's own size."""
        size = tuple(x.shape[-2:])
        return x if size == (self.image_size, self.image_size) else F.interpolate(
            x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)

    def _check_ablation(self) -> None:
        if self.method.ablation is None:
            raise ValueError(f"view 'ablation': the method {self.variant!r} declares no ablation view")

    @staticmethod
    def _at(maps: torch.Tensor, size: tuple) -> torch.Tensor:
        maps = maps.float()
        return maps if tuple(maps.shape[-2:]) == tuple(size) else F.interpolate(
            maps, size=tuple(size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def ablation_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The ``ablation`` view's maps ``B x 1 x S' x S'`` for a batch at :attr:`input_size` (the
        method's :meth:`~ccad.methods.base.Method.ablation_maps`, resized as :meth:`map_parts` does)."""
        self._check_ablation()
        x = x.to(self.device, torch.float32)
        return self._at(self.method.ablation_maps(self._model_input(x)).maps, x.shape[-2:])

    @torch.no_grad()
    def map_parts_and_ablation(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                                               Optional[torch.Tensor], torch.Tensor]:
        """:meth:`map_parts` and :meth:`ablation_maps` of one batch from one call of the method's
        :meth:`~ccad.methods.base.Method.maps_and_ablation` (work both views share is done once)."""
        self._check_ablation()
        x = x.to(self.device, torch.float32)
        out, abl = self.method.maps_and_ablation(self._model_input(x))
        maps, bank, rec, _ = self._map_parts(x, out=out)
        return maps, bank, rec, self._at(abl.maps, x.shape[-2:])

    def combine(self, maps: torch.Tensor, bank: Optional[torch.Tensor], view: Optional[str] = None) -> torch.Tensor:
        """One view of :meth:`map_parts`: ``fused`` (the default with fusion), ``method`` or ``bank``."""
        if self.fusion is None:
            if view not in (None, "method"):
                raise ValueError(f"view {view!r}: this detector has no fusion (scoring.fusion is 'none'); "
                                 f"its only view is 'method'")
            return maps
        return self.fusion.combine(maps, bank, view or "fused")

    @torch.no_grad()
    def maps_for_batch(self, x: torch.Tensor, view: Optional[str] = None
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Anomaly maps ``B x 1 x S x S`` (and reconstructions) for a batch at :attr:`input_size`
        (the fused map when the detector fuses, unless ``view`` asks for one component)."""
        maps, bank, rec = self.map_parts(x)
        return self.combine(maps, bank, view), rec

    def _score(self, maps: torch.Tensor) -> torch.Tensor:
        sc = self.config.scoring
        return image_score(maps, sc.score, sc.topk_ratio, topk_count=sc.topk_count)

    def _predict_batch(self, images: list[np.ndarray], paths: list[Optional[str]],
                       read_seconds: Optional[Sequence[float]] = None) -> list[Prediction]:
        """Predictions for decoded images. ``Prediction.seconds`` is each image's own time: its
        read/decode (``read_seconds``, measured by the caller), its resize to the model's size and
        its post-processing (map and reconstruction interpolated back to its size), each timed per
        image, plus its share of the batched forward pass and image score (batch time / batch size)."""
        own = list(read_seconds) if read_seconds is not None else [0.0] * len(images)
        if self.config.resize != "square":
            return self._predict_framed(images, paths, own)
        tensors = []
        for i, im in enumerate(images):
            t = time.perf_counter()
            warn_aspect(im.shape, self.input_size, paths[i])
            tensors.append(to_tensor(im, self.input_size))
            own[i] += time.perf_counter() - t
        t0 = time.perf_counter()
        x = torch.stack(tensors)
        parts, bank_maps, x_hat, domain = self._map_parts(x)
        maps = self.combine(parts, bank_maps)
        scores = self._score(maps).cpu().numpy()
        domain = None if domain is None else domain.cpu().numpy()
        dstats = self.calibration.domain if self.calibration is not None else None
        finite = torch.isfinite(maps).flatten(1).all(1).cpu().numpy() & np.isfinite(scores)
        per = (time.perf_counter() - t0) / len(images)
        out = []
        for i, im in enumerate(images):
            t = time.perf_counter()
            h, w = im.shape[:2]
            m = F.interpolate(maps[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            rec = None
            if x_hat is not None:
                rec = F.interpolate(x_hat[i:i + 1].float(), size=(h, w), mode="bilinear", align_corners=False)
                rec = rec[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
            out.append(Prediction(image=im, reconstruction=rec, anomaly_map=m.cpu().numpy().astype(np.float32),
                                  score=float(scores[i]), threshold=self.threshold, seconds=per, path=paths[i],
                                  map_floor=self.map_floor,
                                  error=None if finite[i] else self._non_finite_message(float(scores[i])),
                                  domain_distance=None if domain is None else float(domain[i]),
                                  domain_limit=None if dstats is None else float(dstats.limit)))
            out[-1].seconds = own[i] + per + (time.perf_counter() - t)
        return out

    # ---- keep-aspect / tile (ccad.data.framing) ----------------------------------------------
    @torch.no_grad()
    def framed_parts(self, images: Sequence[np.ndarray], fn: Callable[[torch.Tensor], dict[str, Any]],
                     chunk: int = 8, own: Optional[list[float]] = None
                     ) -> tuple[list[Any], list[dict[str, Any]], float]:
        """Run ``fn`` on the model inputs of ``images`` (``H x W x 3`` floats) framed by this model's
        ``resize`` (every image's letterboxed input or all its tiles, ``chunk`` inputs a call). ``fn``
        maps a batch ``B x 3 x S x S`` to a dict of per-input tensors (or None). Returns the images'
        layouts, per image the dict of its inputs' tensors (on the CPU) and the seconds ``fn`` took.
        ``own[i]`` (when given) is charged image ``i``'s framing time."""
        from .data.framing import frame_tensor

        chunk = max(1, int(chunk))
        layouts: list[Any] = []
        pending: list[torch.Tensor] = []  # inputs not run yet: one image's tiles at most beyond a chunk
        got: dict[str, list] = {}
        seconds = 0.0

        def run(final: bool) -> None:
            nonlocal seconds, pending
            x = torch.cat(pending) if pending else None
            pending = []
            if x is None:
                return
            stop = len(x) if final else len(x) - len(x) % chunk
            t0 = time.perf_counter()
            for start in range(0, stop, chunk):
                for k, v in fn(x[start:start + chunk]).items():
                    got.setdefault(k, []).append(None if v is None else v.detach().float().cpu())
            seconds += time.perf_counter() - t0
            if stop < len(x):
                pending = [x[stop:]]

        for i, im in enumerate(images):
            t = time.perf_counter()
            lay = self.layout(*im.shape[:2])
            layouts.append(lay)
            pending.append(frame_tensor(im, lay))
            if own is not None:
                own[i] += time.perf_counter() - t
            if sum(len(p) for p in pending) >= chunk:
                run(final=False)
        run(final=True)
        cat = {k: (None if any(p is None for p in v) else torch.cat(v)) for k, v in got.items()}
        per: list[dict[str, Any]] = []
        at = 0
        for lay in layouts:
            per.append({k: (None if v is None else v[at:at + lay.n_inputs]) for k, v in cat.items()})
            at += lay.n_inputs
        return layouts, per, seconds

    def framed_map(self, maps: torch.Tensor, layout: Any) -> tuple[float, torch.Tensor]:
        """``(image score, map 1 x H x W at the image's size)`` from one image's input maps: the
        score by this model's rule (``scoring.score``) on :func:`ccad.data.framing.score_region`
        (keep-aspect: the image's region, no padding; tile: the stitched map)."""
        from .data.framing import score_region, unframe

        region = score_region(maps, layout)
        full = region if layout.mode == "tile" else unframe(maps, layout)
        return float(self._score(region[None])[0]), full

    @staticmethod
    def framed_domain(domain: Optional[torch.Tensor]) -> Optional[float]:
        """One image's domain distance from its inputs': the median over its tiles (one input: its own)."""
        return None if domain is None else float(domain.float().median())

    def _predict_framed(self, images: list[np.ndarray], paths: list[Optional[str]],
                        own: list[float]) -> list[Prediction]:
        """:meth:`_predict_batch` for ``resize`` = ``keep-aspect`` / ``tile``: each image's inputs
        are scored, its map (and reconstruction) put back at its size (:meth:`framed_map`); the
        forward time is shared by the number of inputs each image had."""
        def fn(x: torch.Tensor) -> dict[str, Any]:
            parts, bank, rec, dom = self._map_parts(x)
            return {"map": self.combine(parts, bank), "rec": rec, "domain": dom}

        from .data.framing import unframe

        layouts, per, seconds = self.framed_parts(images, fn, chunk=max(8, len(images)), own=own)
        total = sum(lay.n_inputs for lay in layouts)
        dstats = self.calibration.domain if self.calibration is not None else None
        out = []
        for i, (im, lay, got) in enumerate(zip(images, layouts, per)):
            t = time.perf_counter()
            score, m = self.framed_map(got["map"], lay)
            rec = None if got["rec"] is None else unframe(got["rec"], lay).clamp(0, 1).permute(1, 2, 0).numpy()
            finite = bool(torch.isfinite(m).all()) and math.isfinite(score)
            dom = self.framed_domain(got["domain"])
            pred = Prediction(image=im, reconstruction=rec, anomaly_map=m[0].numpy().astype(np.float32), score=score,
                              threshold=self.threshold, seconds=0.0, path=paths[i], map_floor=self.map_floor,
                              error=None if finite else self._non_finite_message(score), domain_distance=dom,
                              domain_limit=None if dstats is None else float(dstats.limit))
            pred.seconds = own[i] + seconds * lay.n_inputs / total + (time.perf_counter() - t)
            out.append(pred)
        return out

    def weight_files(self) -> list[str]:
        """The safetensors files this detector was loaded from (paths), or [] for one built in memory."""
        if self.source is None:
            return []
        return [str(f) for f in sorted(Path(self.source).rglob("*.safetensors"))]

    def _non_finite_message(self, score: float) -> str:
        what = f"anomaly score {score}" if not math.isfinite(score) else "anomaly map"
        files = self.weight_files()
        where = (f"its weight files ({', '.join(files)})" if files else "its weights (built in memory, not loaded "
                 "from a folder)")
        return (f"the model gave a non-finite {what} (NaN or inf): no verdict; the model is probably corrupt: "
                f"check {where}, re-download or re-train it")

    # ---- public API -------------------------------------------------------------------------
    def predict(self, image: Any) -> Prediction:
        """Inspect one image (path, PIL image or numpy array; grey/RGB/RGBA/16-bit; any size)."""
        path = str(image) if isinstance(image, (str, Path)) else None
        t = time.perf_counter()
        im = coerce_image(image)
        return self._predict_batch([im], [path], [time.perf_counter() - t])[0]

    def predict_many(
        self, items: Iterable[Any], batch_size: int = 8, on_error: str = "skip", progress: ProgressFn = None,
        cancel: CancelFn = None,
    ) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Inspect many images in batches. A bad file is reported in ``errors`` and skipped
        (``on_error="skip"``) or raises (``"raise"``); nothing already done is lost. Each
        prediction's ``seconds`` is that image's own time (see :meth:`_predict_batch`), its read
        and decode included."""
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive number of images, got {batch_size!r}")
        items = list(items)
        results: list[Prediction] = []
        errors: list[tuple[str, str]] = []
        batch: list[np.ndarray] = []
        paths: list[Optional[str]] = []
        reads: list[float] = []
        done = 0

        def flush() -> None:
            if batch:
                results.extend(self._predict_batch(batch, paths, reads))
                batch.clear()
                paths.clear()
                reads.clear()

        for item in items:
            if cancel is not None and cancel():
                break
            got = decode_item(item, done, on_error, errors, coerce_image, time.perf_counter)
            if got is not None:
                batch.append(got[0])
                reads.append(got[1])
                paths.append(got[2])
            done += 1
            if len(batch) >= batch_size:
                flush()
            if progress is not None:
                progress(done, len(items))
        flush()
        return results, errors

    def score_batches(self, batches: Iterable[dict], progress: ProgressFn = None, total: Optional[int] = None,
                      view: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ``N x S x S`` maps for batches from :func:`ccad.data.dataset.iter_batches`
        (read at :attr:`input_size`); ``view`` as :meth:`combine`."""
        scores, maps = [], []
        done = 0
        for b in batches:
            m, _ = self.maps_for_batch(b["image"], view)
            scores.append(self._score(m).cpu().numpy())
            maps.append(m[:, 0].cpu().numpy().astype(np.float32))
            done += len(b["image"])
            if progress is not None:
                progress(done, total or done)
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, self.input_size, self.input_size), np.float32)
        return np.concatenate(scores), np.concatenate(maps)

    def calibrate(self, good_items: Sequence[Any], method: Optional[str] = None, fpr: Optional[float] = None,
                  sigma: Optional[float] = None, batch_size: int = 8, selection: Optional[Sequence[Any]] = None,
                  miss: Optional[float] = None, chosen: Optional[Sequence[str]] = None) -> Calibration:
        """Calibrate on held-out good images only (paths, samples or arrays).

        ``good_items`` set the threshold; ``selection`` (other held-out good images) are where the
        fusion's normalisation and weight are fitted, so the threshold's promised false-alarm rate
        is measured on images nothing was tuned on. A fusing detector given no ``selection`` splits
        ``good_items`` itself (``scoring.selection_fraction``, refusing too few, naming the
        number). ``method``: the policy (``fpr`` / ``sigma`` / ``miss``; default
        ``scoring.calibration``); ``fpr`` / ``sigma`` / ``miss`` its targets. With
        ``scoring.miss_estimate`` the threshold images' synthetic-anomaly copies are scored too, so
        the calibration reports its estimated (proxy) miss rate beside its false-alarm rate.
        ``chosen``: what the method chose on ``selection`` (for the record)."""
        from .data.dataset import iter_batches
        from .data.sample import Sample
        from .scoring.threshold import check_held_out_split, split_held_out

        sc = self.config.scoring
        policy = method or sc.calibration
        samples = [s if isinstance(s, Sample) else Sample(str(s), None, 0) for s in good_items]
        sel = None if selection is None else [s if isinstance(s, Sample) else Sample(str(s), None, 0)
                                               for s in selection]
        chosen = list(chosen or [])
        if self.fusion is not None:
            what = ("the fusion's weight and normalisation" if sc.fusion_weight_fit == "synthetic"
                    else "the fusion's normalisation")
            if what not in chosen:
                chosen.append(what)
            if not sel:
                sel, samples = split_held_out(samples, float(sc.selection_fraction), 0)
            check_held_out_split(sel, samples, chosen, sc.min_selection_images, sc.min_threshold_images)
        errors: list[tuple[str, str]] = []
        if self.fusion is not None:  # normalisation and weight come from the selection part only
            self._fit_fusion(sel, batch_size, errors)
        parts: list[torch.Tensor] = []
        syn_scores: list[np.ndarray] = []
        gen = torch.Generator().manual_seed(1)
        domains: list[torch.Tensor] = []
        want_syn = bool(sc.miss_estimate) or policy == "miss"
        framed = self.config.resize != "square"
        if framed:  # keep-aspect / tile: each image scored as predict scores it (its own size, its own map)
            scores, maps, syn, domains = self._calibration_scores_framed(samples, batch_size, errors, want_syn)
        for b in ([] if framed else iter_batches(samples, self.input_size, batch_size, on_error="skip",
                                                 errors=errors)):
            m, bank, _, dom = self._map_parts(b["image"])
            parts.append(self.combine(m, bank).cpu())
            if dom is not None:
                domains.append(dom.cpu())
            if want_syn:  # copies of these good images with a synthetic anomaly each: the miss-rate proxy
                from .data.anomaly_synth import synthesize_batch

                x_a, _ = synthesize_batch(b["image"].float(), gen, ratio=1.0)
                m_a, bank_a, _ = self.map_parts(x_a)
                syn_scores.append(self._score(self.combine(m_a, bank_a)).cpu().numpy())
        if not parts and not (framed and len(scores)):
            raise ValueError("no readable good image to calibrate on" + (f" ({errors[0][0]}: {errors[0][1]})"
                                                                         if errors else ""))
        if not framed:
            fused = torch.cat(parts)
            scores = self._score(fused).numpy()
            maps = fused[:, 0].numpy()
            syn = np.concatenate(syn_scores) if syn_scores else np.zeros(0)
        if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(maps)) and np.all(np.isfinite(syn))):
            bad = int(np.sum(~np.isfinite(scores)) or np.sum(~np.isfinite(maps).reshape(len(maps), -1).all(1))
                      or np.sum(~np.isfinite(syn)))
            raise ValueError(f"calibration: {bad} of the {scores.size} good images gave a non-finite score or map "
                             f"(NaN or inf): no threshold can be set; {self._non_finite_message(float('nan'))}")
        self.calibration = Calibration.fit(scores, policy, fpr=sc.target_fpr if fpr is None else fpr,
                                           sigma=sc.sigma_k if sigma is None else sigma, synthetic=syn,
                                           miss=sc.target_miss if miss is None else miss)
        self.calibration.domain = self._fit_domain(domains)
        self.info["map_floor"] = float(np.median(maps))
        self.info["n_calibration_images"] = int(scores.size)
        bad_paths = {str(name) for name, _ in errors}
        self.info["calibration_split"] = {
            "selection": 0 if not sel else len([s for s in sel if s.image_path not in bad_paths]),
            "threshold": int(scores.size),
            "selection_fraction": float(sc.selection_fraction) if sel else None,
            "chosen_on_selection": chosen,
            "note": ("settings were chosen on the selection part; the threshold was set on the threshold part "
                     "(disjoint images)" if sel else "nothing was chosen on held-out images: every one of them "
                                                     "set the threshold"),
            "selection_images": [s.image_path for s in sel or [] if s.image_path not in bad_paths],
            "threshold_images": [s.image_path for s in samples if s.image_path not in bad_paths]}
        # the good files that could not be read: left out of the threshold, and said so
        self.info["calibration_skipped"] = [{"path": str(name), "reason": str(why)} for name, why in errors]
        if self.fusion is not None:
            self.info["fusion"] = self.fusion.card()
        return self.calibration

    def _calibration_scores_framed(self, samples: Sequence[Any], batch_size: int, errors: list[tuple[str, str]],
                                   want_syn: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[torch.Tensor]]:
        """:meth:`calibrate`'s scores, map values, synthetic-anomaly scores and domain distances for a
        ``keep-aspect`` / ``tile`` model: every held-out image (and its synthetic-anomaly copy, pasted
        at the image's own size) scored as :meth:`predict` scores it."""
        from .data.dataset import iter_native

        def fn(x: torch.Tensor) -> dict[str, Any]:
            parts, bank, _, dom = self._map_parts(x)
            return {"map": self.combine(parts, bank), "domain": dom}

        gen = torch.Generator().manual_seed(1)
        scores, values, syn, domains = [], [], [], []
        for b in iter_native(samples, batch_size, on_error="skip", errors=errors, masks=False):
            layouts, per, _ = self.framed_parts(b["image"], fn, chunk=max(8, batch_size))
            for lay, got in zip(layouts, per):
                sc, m = self.framed_map(got["map"], lay)
                scores.append(sc)
                values.append(m.flatten().numpy())
                if got["domain"] is not None:
                    domains.append(torch.tensor([self.framed_domain(got["domain"])]))
            if want_syn:
                from .data.anomaly_synth import synthesize_batch

                copies = []
                for im in b["image"]:
                    x_a, _ = synthesize_batch(torch.from_numpy(im).permute(2, 0, 1)[None].float(), gen, ratio=1.0)
                    copies.append(x_a[0].permute(1, 2, 0).clamp(0, 1).contiguous().numpy())
                layouts, per, _ = self.framed_parts(copies, fn, chunk=max(8, batch_size))
                syn.extend(self.framed_map(got["map"], lay)[0] for lay, got in zip(layouts, per))
        vals = np.concatenate(values) if values else np.zeros(0, np.float32)
        return (np.asarray(scores, np.float64), vals, np.asarray(syn, np.float64), domains)

    def _fit_fusion(self, selection: Sequence[Any], batch_size: int, errors: list[tuple[str, str]]) -> None:
        """The fusion's normalisation (and, with ``fusion_weight_fit = "synthetic"``, its weight and
        normalisation kind) from the selection part of the held-out good images only."""
        from .data.dataset import iter_batches

        sc = self.config.scoring
        fit_weight = sc.fusion_weight_fit == "synthetic"
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        synthetic: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        gen = torch.Generator().manual_seed(0)
        from .data.framing import frame_samples

        # keep-aspect / tile: the selection images as the model's inputs (letterboxed, or their tiles)
        inputs = frame_samples(list(selection), self.config.resize, self.input_size, self.config.tile_stride)
        for b in iter_batches(inputs, self.input_size, batch_size, on_error="skip", errors=errors):
            m, bank, _ = self.map_parts(b["image"])
            parts.append((m.cpu(), bank.cpu()))
            if fit_weight:  # copies of these good images with a synthetic anomaly each (good-only)
                from .data.anomaly_synth import synthesize_batch

                x_a, masks = synthesize_batch(b["image"].float(), gen, ratio=1.0)
                m_a, bank_a, _ = self.map_parts(x_a)
                synthetic.append((m_a.cpu(), bank_a.cpu(), masks.cpu()))
        if not parts:
            raise ValueError("no readable good image in the selection part to fit the fusion on"
                             + (f" ({errors[0][0]}: {errors[0][1]})" if errors else ""))
        good = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        self.fusion.fit_stats(*good)
        self.fusion.weight, self.fusion.norm, self.fusion.weight_fit = sc.fusion_weight, sc.fusion_norm, None
        if fit_weight:
            syn = [torch.cat([p[k] for p in synthetic]) for k in range(3)]
            norms = (sc.fusion_norm,) + tuple(n for n in ("std", "quantile") if n != sc.fusion_norm)
            self.fusion.fit_weight(good, (syn[0], syn[1]), syn[2], self._score, norms=norms)

    def _fit_domain(self, domains: list[torch.Tensor]) -> Any:
        from .scoring.domain import DomainStats

        if not domains:
            return None
        good = torch.cat(domains).numpy()
        if not np.all(np.isfinite(good)):
            raise ValueError(f"calibration: the domain distance of {int(np.sum(~np.isfinite(good)))} good image(s) "
                             f"is NaN or inf; {self._non_finite_message(float('nan'))}")
        return DomainStats.fit(good, source=self.domain_source or "")

    def calibrate_domain(self, good_items: Sequence[Any], batch_size: int = 8) -> Any:
        """Store only the out-of-domain statistic (:mod:`ccad.scoring.domain`) from held-out good
        images, leaving the threshold and every other calibrated value as they are (for a model
        calibrated by an older ccad). Needs a calibrated detector; returns the ``DomainStats``."""
        from .data.dataset import iter_batches
        from .data.sample import Sample

        if self.calibration is None:
            raise ValueError("calibrate_domain: the detector is not calibrated; run calibrate() on good images")
        samples = [s if isinstance(s, Sample) else Sample(str(s), None, 0) for s in good_items]
        if self.config.resize != "square":
            domains = self._calibration_scores_framed(samples, batch_size, [], False)[3]
        else:
            domains = [d.cpu() for b in iter_batches(samples, self.input_size, batch_size, on_error="skip")
                       if (d := self._map_parts(b["image"])[3]) is not None]
        if not domains:
            raise ValueError("calibrate_domain: no readable good image, or this detector has no memory of good "
                             "patch features to measure the domain distance to")
        self.calibration.domain = self._fit_domain(domains)
        return self.calibration.domain

    def card(self) -> dict[str, Any]:
        """Plain facts about this model for the UI and the model card."""
        bank_meta = dict(getattr(self.bank, "meta", {}) or {})
        cal = self.calibration
        mcls = type(self.method)
        facts = {
            "variant": self.variant,
            "title": mcls.title,
            "backbone": (self.bank.meta.get("backbone", self.config.bank.backbone) if self.bank is not None
                         else None),
            "layers": list(self.config.bank.layers) if self.bank is not None else None,
            "bank_size": int(self.bank.features.shape[0]) if self.bank is not None else None,
            "feature_dim": int(self.bank.features.shape[1]) if self.bank is not None else None,
            "image_size": self.image_size,
            "resize": self.config.resize,  # how images of any shape become its input (ccad.data.framing)
            "threshold": self.threshold,
            "calibration": None if cal is None else {"method": cal.method, "n_good": int(cal.good_scores.size),
                                                     "target_fpr": cal.target_fpr},
            "operating_point": None if cal is None else cal.report(),
            "held_out_split": None if not self.info.get("calibration_split") else {
                k: v for k, v in self.info["calibration_split"].items() if not k.endswith("_images")},
            "domain_limit": None if cal is None or cal.domain is None else round(float(cal.domain.limit), 6),
            "n_train_images": self.info.get("n_train_images", bank_meta.get("n_images")),
            "categories": self.info.get("categories"),
            "metrics": self.info.get("metrics"),
            "ablation": mcls.ablation,  # what the ablation view replaces the learned part with (None: no view)
            "view_metrics": self.info.get("view_metrics"),  # per view, from ``ccad evaluate --views --record``
            "created": self.info.get("created"),
        }
        method_facts = self.method.card()
        facts["denoiser_parameters"] = method_facts.pop("parameters", None)
        facts.update(method_facts)
        if self.fusion is not None:
            facts["fusion"] = self.fusion.card()
        facts["ccad_version"] = self.info.get("ccad_version", __version__)
        return facts

    # ---- persistence (huggingface_hub mixin) ------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        write_folder(self, save_directory)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Optional[str]:  # type: ignore[override]
        """Write config.json, bank, the method's files (safetensors), calibration and a model card.

        Checked first, written into a temporary sibling folder and swapped in whole
        (:func:`ccad.detector_folder.save_folder`): a refused or failed save leaves an existing
        folder as it was. ``push_to_hub=True`` (with ``repo_id``) then uploads it."""
        push = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None)
        save_folder(self, save_directory, write=lambda tmp: super(AnomalyDetector, self).save_pretrained(tmp))
        if push:
            kwargs.pop("config", None)
            return self.push_to_hub(repo_id or Path(save_directory).name, **kwargs)
        return None

    def set_threshold_and_save(self, save_directory: str | Path, threshold: float) -> None:
        """Change a saved model's threshold in place (only calibration.json is replaced, in one step)."""
        self.threshold = threshold
        write_calibration(save_directory, self.calibration)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, revision: Optional[str] = None,
                        cache_dir: Any = None, force_download: bool = False, local_files_only: bool = False,
                        token: Any = None, device: Any = None, **_: Any) -> "AnomalyDetector":  # type: ignore[override]
        """Load a detector from a local folder or a Hub repo id (:func:`ccad.hub.resolve_model_path`:
        a path that does not exist or a repo the Hub cannot serve is a clear CheckpointError)."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, device=device)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, device: Any = None, **_: Any) -> "AnomalyDetector":
        from .hub import resolve_model_path

        path = resolve_model_path(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                  local_files_only=local_files_only, token=token)
        return cls.load_folder(path, device=device)

    @classmethod
    def load_folder(cls, path: str | Path, device: Any = None) -> "AnomalyDetector":
        """Load a detector saved by :meth:`save_pretrained` from a local folder."""
        path = Path(path)
        parts = read_folder(path, device)
        try:
            det = cls(**parts)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        det.source = path
        return det
