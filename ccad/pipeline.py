"""The one object users call: :class:`AnomalyDetector`.

A detector is a method plug-in (:mod:`ccad.methods`: PatchCore, CCAD(V), ...) plus what every
method shares: the feature bank, the image score, the calibrated threshold, the files on disk.
The detector never looks at the method's name; it asks the registry for the method class and
calls its hooks (``maps`` for a batch, ``save`` / ``load`` for its files).

``AnomalyDetector.from_pretrained(path_or_repo_id).predict(image_or_path)`` returns a
:class:`Prediction` with the score, map, reconstruction, binary mask, verdict and timing. The
same object backs the CLI, the app and the benchmarks. :func:`fit_detector` builds a detector
whose method needs no training; :func:`train_detector` builds and trains any method.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin

from . import __version__
from .config import ConfigError, set_option
from .data.io import ImageReadError, coerce_image, to_tensor
from .detector_config import DetectorConfig
from .errors import CheckpointError  # noqa: F401  (re-exported: ccad.pipeline.CheckpointError)
from .methods import Context, Method, get_method
from .scoring.anomaly_map import image_score
from .scoring.heatmap import render_heatmap
from .scoring.threshold import Calibration

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------

STATUSES = ("good", "anomalous", "uncalibrated", "error")


def status_of(score: float, threshold: float, error: Optional[str] = None) -> str:
    """The verdict of one image score (:attr:`Prediction.status`): ``"error"`` for an error or a
    NaN / inf score, ``"uncalibrated"`` without a finite threshold, else ``"anomalous"`` above the
    threshold and ``"good"`` at or below it."""
    if error is not None or not math.isfinite(float(score)):
        return "error"
    if not math.isfinite(float(threshold)):
        return "uncalibrated"
    return "anomalous" if float(score) > float(threshold) else "good"


@dataclass
class Prediction:
    """The result of one inspection. Images are at the input's original size.

    :attr:`status` is the one verdict every summary counts (CLI, app, ``predict_many`` callers):
    ``"good"`` only for a finite score at or below a finite (calibrated) threshold; ``"anomalous"``
    above it; ``"uncalibrated"`` when the model has no threshold; ``"error"`` when the score or map
    is NaN / inf (:attr:`error` says why and names the model's files). Nothing but ``"good"`` is
    good. :attr:`out_of_domain` says when the image is unlike the model's good training images
    (its :attr:`domain_distance` above :attr:`domain_limit`, see :mod:`ccad.scoring.domain`); None
    when the model stores no such statistic (older models, methods without a memory)."""

    image: np.ndarray  # H x W x 3 float32 in [0, 1]
    reconstruction: Optional[np.ndarray]  # H x W x 3 float32, None for feature-only detectors
    anomaly_map: np.ndarray  # H x W float32
    score: float
    threshold: float
    seconds: float
    path: Optional[str] = None
    map_floor: float = 0.0  # map value of a typical good pixel (for display scaling)
    error: Optional[str] = None  # why this result is not a verdict (non-finite score or map)
    domain_distance: Optional[float] = None  # median patch distance to the good memory (ccad.scoring.domain)
    domain_limit: Optional[float] = None  # the good-only limit above which the image is out of domain

    @property
    def status(self) -> str:
        """``"good"``, ``"anomalous"``, ``"uncalibrated"`` or ``"error"`` (see the class docstring)."""
        return status_of(self.score, self.threshold, self.error)

    @property
    def is_anomalous(self) -> bool:
        """True only for the status ``"anomalous"`` (an error or an uncalibrated model is neither)."""
        return self.status == "anomalous"

    @property
    def is_good(self) -> bool:
        """True only for the status ``"good"``: a finite score at or below a calibrated threshold."""
        return self.status == "good"

    @property
    def verdict(self) -> str:
        """The same as :attr:`status`."""
        return self.status

    @property
    def out_of_domain(self) -> Optional[bool]:
        """True when the image's :attr:`domain_distance` exceeds :attr:`domain_limit` (it is unlike
        the good images the model was calibrated on); None when either is unknown."""
        if self.domain_distance is None or self.domain_limit is None:
            return None
        if not math.isfinite(float(self.domain_distance)):
            return True
        return bool(self.domain_distance > self.domain_limit)

    @property
    def mask(self) -> np.ndarray:
        """Pixels whose map value exceeds the threshold (H x W bool); empty unless the status is a verdict."""
        if self.status not in ("good", "anomalous"):
            return np.zeros(self.anomaly_map.shape, bool)
        return self.anomaly_map > self.threshold

    def with_threshold(self, threshold: float) -> "Prediction":
        """The same result re-labelled at another threshold, without re-running the model."""
        return replace(self, threshold=float(threshold))

    def normalized_map(self) -> np.ndarray:
        """Map scaled so a typical good pixel is 0 and the threshold is 1 (comparable across images)."""
        amap = np.nan_to_num(self.anomaly_map, nan=0.0, posinf=0.0, neginf=0.0)
        hi = self.threshold if np.isfinite(self.threshold) else float(amap.max())
        lo = min(self.map_floor, hi - 1e-6)
        return np.clip((amap - lo) / max(hi - lo, 1e-6), 0.0, 1.0)

    def heatmap(self) -> np.ndarray:
        """H x W x 3 uint8 colour-mapped anomaly map (red at or above the threshold)."""
        return render_heatmap(self.normalized_map(), vmin=0.0, vmax=1.0)

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """H x W x 3 uint8: the heatmap blended over the image, the mask outlined in white."""
        import cv2

        base = (np.clip(self.image, 0, 1) * 255).astype(np.float32)
        out = (1 - alpha) * base + alpha * self.heatmap().astype(np.float32)
        out = np.clip(out, 0, 255).astype(np.uint8)
        m = self.mask.astype(np.uint8)
        if m.any():
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, round(min(m.shape) / 200)))
        return out

    def to_record(self) -> dict[str, Any]:
        """One row: path, score, threshold, status (also as ``verdict``), error, out_of_domain,
        domain_distance, domain_limit, seconds."""
        return {"path": self.path, "score": self.score, "threshold": self.threshold, "status": self.status,
                "verdict": self.verdict, "error": self.error, "out_of_domain": self.out_of_domain,
                "domain_distance": self.domain_distance, "domain_limit": self.domain_limit,
                "seconds": self.seconds}


def count_statuses(predictions: Iterable[Prediction], errors: Sequence[Any] = ()) -> dict[str, int]:
    """How many predictions have each :attr:`Prediction.status` (``good`` / ``anomalous`` /
    ``uncalibrated`` / ``error``), plus ``unreadable`` (``len(errors)``, the files
    :meth:`AnomalyDetector.predict_many` could not read), ``out_of_domain`` (flagged, whatever the
    status) and ``total``. The one count every summary (CLI, app) should print: an uncalibrated or
    failed image is never counted as good."""
    counts = dict.fromkeys(STATUSES, 0)
    ood = n = 0
    for p in predictions:
        counts[p.status] += 1
        ood += bool(p.out_of_domain)
        n += 1
    counts["unreadable"] = len(errors)
    counts["out_of_domain"] = ood
    counts["total"] = n + len(errors)
    return counts


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------

FILES = {
    "config": "config.json",
    "calibration": "calibration.json",
    "info": "info.json",
}


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

    @property
    def input_size(self) -> int:
        """The square size images are read at: the model's, or the fusion memory's when larger
        (maps and reconstructions come back at this size)."""
        return max(self.image_size, self.fusion.image_size) if self.fusion is not None else self.image_size

    @property
    def views(self) -> tuple[str, ...]:
        """The maps this detector can give: ``fused`` / ``method`` / ``bank`` with fusion, else ``method``."""
        from .scoring.fusion import VIEWS

        return VIEWS if self.fusion is not None else ("method",)

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
    def _map_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                                                   Optional[torch.Tensor]]:
        """:meth:`map_parts` and the per-image domain distances ``B`` (:mod:`ccad.scoring.domain`;
        None when this detector has no memory of good patch features)."""
        from .scoring.domain import patch_median

        x = x.to(self.device, torch.float32)
        size = tuple(x.shape[-2:])
        xm = x if size == (self.image_size, self.image_size) else F.interpolate(
            x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        out = self.method.maps(xm)
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
        dist, _ = nearest_distances(f.permute(0, 2, 3, 1).reshape(-1, d), feats)
        return patch_median(dist.view(b, -1))

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
        tensors = []
        for i, im in enumerate(images):
            t = time.perf_counter()
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
            name = str(item) if isinstance(item, (str, Path)) else f"item {done}"
            try:
                t = time.perf_counter()
                batch.append(coerce_image(item))
                reads.append(time.perf_counter() - t)
                paths.append(str(item) if isinstance(item, (str, Path)) else None)
            except (ImageReadError, ValueError, TypeError) as exc:
                if on_error == "raise":
                    raise
                errors.append((name, str(exc)))
            done += 1
            if len(batch) >= batch_size:
                flush()
            if progress is not None:
                progress(done, len(items))
        flush()
        return results, errors

    def score_batches(self, batches: Iterable[dict], progress: ProgressFn = None, total: Optional[int] = None,
                      view: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ``N x S x S`` maps for batches from :func:`ccad.data.datasets.iter_batches`
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
                  sigma: Optional[float] = None, batch_size: int = 8) -> Calibration:
        """Calibrate the threshold on held-out good images only (paths, samples or arrays)."""
        from .data.datasets import iter_batches
        from .data.sample import Sample

        sc = self.config.scoring
        samples = [s if isinstance(s, Sample) else Sample(str(s), None, 0) for s in good_items]
        errors: list[tuple[str, str]] = []
        parts: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        fit_weight = self.fusion is not None and sc.fusion_weight_fit == "synthetic"
        synthetic: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        gen = torch.Generator().manual_seed(0)
        domains: list[torch.Tensor] = []
        for b in iter_batches(samples, self.input_size, batch_size, on_error="skip", errors=errors):
            m, bank, _, dom = self._map_parts(b["image"])
            parts.append((m.cpu(), None if bank is None else bank.cpu()))
            if dom is not None:
                domains.append(dom.cpu())
            if fit_weight:  # copies of these good images with a synthetic anomaly each (good-only)
                from .data.anomaly_synth import synthesize_batch

                x_a, masks = synthesize_batch(b["image"].float(), gen, ratio=1.0)
                m_a, bank_a, _ = self.map_parts(x_a)
                synthetic.append((m_a.cpu(), bank_a.cpu(), masks.cpu()))
        if not parts:
            raise ValueError("no readable good image to calibrate on" + (f" ({errors[0][0]}: {errors[0][1]})"
                                                                         if errors else ""))
        if self.fusion is not None:  # the normalisation of both maps comes from these good images only
            good = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            self.fusion.fit_stats(*good)
            self.fusion.weight, self.fusion.norm, self.fusion.weight_fit = sc.fusion_weight, sc.fusion_norm, None
            if fit_weight:
                syn = [torch.cat([p[k] for p in synthetic]) for k in range(3)]
                norms = (sc.fusion_norm,) + tuple(n for n in ("std", "quantile") if n != sc.fusion_norm)
                self.fusion.fit_weight(good, (syn[0], syn[1]), syn[2], self._score, norms=norms)
        fused = torch.cat([self.combine(m, bank) for m, bank in parts])
        scores = self._score(fused).numpy()
        maps = fused[:, 0].numpy()
        if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(maps))):
            bad = int(np.sum(~np.isfinite(scores)) or np.sum(~np.isfinite(maps).reshape(len(maps), -1).all(1)))
            raise ValueError(f"calibration: {bad} of the {scores.size} good images gave a non-finite score or map "
                             f"(NaN or inf): no threshold can be set; {self._non_finite_message(float('nan'))}")
        self.calibration = Calibration.fit(scores, method or sc.calibration,
                                           fpr=sc.target_fpr if fpr is None else fpr,
                                           sigma=sc.sigma_k if sigma is None else sigma)
        self.calibration.domain = self._fit_domain(domains)
        self.info["map_floor"] = float(np.median(maps))
        self.info["n_calibration_images"] = int(scores.size)
        # the good files that could not be read: left out of the threshold, and said so
        self.info["calibration_skipped"] = [{"path": str(name), "reason": str(why)} for name, why in errors]
        if self.fusion is not None:
            self.info["fusion"] = self.fusion.card()
        return self.calibration

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
        from .data.datasets import iter_batches
        from .data.sample import Sample

        if self.calibration is None:
            raise ValueError("calibrate_domain: the detector is not calibrated; run calibrate() on good images")
        samples = [s if isinstance(s, Sample) else Sample(str(s), None, 0) for s in good_items]
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
            "threshold": self.threshold,
            "calibration": None if cal is None else {"method": cal.method, "n_good": int(cal.good_scores.size),
                                                     "target_fpr": cal.target_fpr},
            "domain_limit": None if cal is None or cal.domain is None else round(float(cal.domain.limit), 6),
            "n_train_images": self.info.get("n_train_images", bank_meta.get("n_images")),
            "categories": self.info.get("categories"),
            "metrics": self.info.get("metrics"),
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
        save_directory = Path(save_directory)
        if self.calibration is not None:
            try:
                self.calibration.check_finite()
            except ValueError as exc:  # nothing is written: a NaN threshold would read every image as good
                raise ValueError(f"{save_directory}: not saved: the calibration is not usable ({exc}); "
                                 f"re-calibrate on readable good images") from None
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.save(save_directory / FILES["config"])
        if self.bank is not None:
            self.bank.save(save_directory)
        self.method.save(save_directory)
        if self.fusion is not None:
            self.fusion.save(save_directory)
        if self.calibration is not None:
            (save_directory / FILES["calibration"]).write_text(json.dumps(self.calibration.to_dict(), indent=1))
        elif (save_directory / FILES["calibration"]).is_file():  # never leave another model's threshold behind
            (save_directory / FILES["calibration"]).unlink()
        info = dict(self.info)
        info.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        info["ccad_version"] = __version__
        (save_directory / FILES["info"]).write_text(json.dumps(info, indent=2, default=float))
        (save_directory / "README.md").write_text(model_card_text(self.card()))

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Optional[str]:  # type: ignore[override]
        """Write config.json, bank, the method's files (safetensors), calibration and a model card."""
        return super().save_pretrained(save_directory, **kwargs)

    def set_threshold_and_save(self, save_directory: str | Path, threshold: float) -> None:
        """Change a saved model's threshold in place (only calibration.json is rewritten)."""
        self.threshold = threshold
        Path(save_directory, FILES["calibration"]).write_text(json.dumps(self.calibration.to_dict(), indent=1))

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
        from safetensors import SafetensorError

        from .features import FeatureBank

        path = Path(path)
        if not (path / FILES["config"]).is_file():
            raise CheckpointError(f"{path}: not a ccad model folder (no {FILES['config']})")
        try:
            config = DetectorConfig.load(path / FILES["config"])
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        mcls = get_method(config.variant)
        check_weight_files(path)  # a truncated or corrupted safetensors file is named before anything is built
        bank = None
        if (path / "bank.safetensors").is_file():
            try:
                bank = FeatureBank.load(path)
            except Exception as exc:  # noqa: BLE001 - any reader error is a checkpoint problem
                raise CheckpointError(f"{path}: cannot read the feature bank ({exc})") from None
        elif mcls.uses_bank:
            raise CheckpointError(f"{path}: a {config.variant} detector needs its feature bank (bank.safetensors)")
        dev = torch.device(device) if device is not None else default_device()
        ctx = Context(image_size=config.image_size, device=dev, bank_config=config.bank, scoring=config.scoring,
                      bank=bank)
        try:
            method = mcls.load(path, config.method, ctx)
        except (SafetensorError, RuntimeError, OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: cannot read the {config.variant} weights ({exc})") from None
        calibration = None
        if (path / FILES["calibration"]).is_file():
            try:
                calibration = Calibration.from_dict(json.loads((path / FILES["calibration"]).read_text()))
                calibration.check_finite()
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
                raise CheckpointError(f"{path / FILES['calibration']}: {exc}; re-calibrate the model "
                                      f"(ccad calibrate MODEL --good FOLDER)") from None
        fusion = None
        if config.scoring.fusion == "bank":
            from .scoring.fusion import BankFusion, bank_backbone

            try:
                fusion = BankFusion.load(path, bank_backbone(config.bank, dev))
            except (FileNotFoundError, OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path}: cannot read the fusion memory ({exc})") from None
        info = {}
        if (path / FILES["info"]).is_file():
            try:
                info = json.loads((path / FILES["info"]).read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path / FILES['info']}: {exc}") from None
        try:
            det = cls(config, bank, method, calibration=calibration, info=info, device=dev, fusion=fusion)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        det.source = path
        return det


def check_weight_files(folder: str | Path) -> None:
    """Read every ``*.safetensors`` file under a model folder and refuse a truncated or corrupt one,
    or one holding NaN / inf weights, with a :class:`CheckpointError` naming the file (and tensor)."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    t = fh.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad = int((~torch.isfinite(t)).sum())
                        raise CheckpointError(f"{f}: tensor {key!r} holds {bad} NaN/inf value(s) of {t.numel()}: "
                                              f"the file is corrupt; re-download or re-train the model")
        except CheckpointError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{f}: cannot read the weights: not a readable safetensors file (truncated or "
                                  f"corrupt: {exc}); "
                                  f"re-download or re-train the model") from None


def model_card_text(card: dict[str, Any]) -> str:
    """A Hub model card (YAML metadata + a table of the detector's facts)."""
    rows = "\n".join(f"| {k} | {json.dumps(v, default=str)} |" for k, v in card.items())
    return (
        "---\nlibrary_name: ccad\ntags:\n- anomaly-detection\n- ccad\n- diffusion\nlicense: apache-2.0\n---\n\n"
        f"# ccad detector: {card['title']}\n\n"
        "Load it with `AnomalyDetector.from_pretrained(path_or_repo_id)` from the `ccad` package.\n\n"
        f"| field | value |\n|---|---|\n{rows}\n"
    )


# --------------------------------------------------------------------------------------------
# Building and training
# --------------------------------------------------------------------------------------------

def _as_samples(data: Any, split: str = "train") -> list:
    """Good samples from a dataset path, several dataset paths (one category each), or items."""
    from .data.datasets import load_dataset
    from .data.sample import Sample

    if isinstance(data, (str, Path)):
        samples = load_dataset(data, split=split)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, Path)) and Path(d).is_dir()
                                                         for d in data):
        samples = []
        for d in data:  # several folders: each is one category (named by the folder unless the layout says)
            for s in load_dataset(d, split=split):
                samples.append(s if s.category else replace(s, category=Path(d).name))
    else:
        samples = [s if isinstance(s, Sample) else Sample(str(s), None, 0) for s in data]
    good = [s for s in samples if s.label == 0]
    if not good:
        raise ValueError(f"{data if isinstance(data, (str, Path)) else 'the given samples'}: no good images found")
    return good


def split_good(samples: list, calibration_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministically hold out a slice of the good images for threshold calibration
    (stratified by category, so every category of a multi-class model is calibrated on)."""
    if not 0.0 <= calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_cat.setdefault(getattr(s, "category", "") or "", []).append(i)
    cal_idx: list[int] = []
    rng = np.random.default_rng(seed)
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        order = rng.permutation(len(idx))
        n_cal = int(round(len(idx) * calibration_fraction))
        if calibration_fraction > 0 and len(idx) >= 2:
            n_cal = min(max(n_cal, 1), len(idx) - 1)
        cal_idx.extend(idx[j] for j in order[:n_cal])
    cal_set = set(cal_idx)
    cal = [samples[i] for i in sorted(cal_set)]
    train = [samples[i] for i in range(len(samples)) if i not in cal_set]
    return train, cal


MIN_GOOD_PER_CATEGORY = 2  # one to train on, one held out to calibrate the threshold on


def check_calibration_split(samples: list, calibration_fraction: float, where: Any = None) -> None:
    """Refuse, before anything is built or trained, good images too few to hold out a calibration
    slice: with ``calibration_fraction > 0`` every category needs :data:`MIN_GOOD_PER_CATEGORY`
    good images (one to train on, one to calibrate the threshold on), else the model would be saved
    with a NaN threshold and no calibration. ``calibration_fraction = 0`` asks for an uncalibrated
    model explicitly (its verdicts are "uncalibrated", never "good")."""
    if calibration_fraction <= 0:
        return
    by_cat: dict[str, int] = {}
    for s in samples:
        key = getattr(s, "category", "") or ""
        by_cat[key] = by_cat.get(key, 0) + 1
    short = {c: n for c, n in sorted(by_cat.items()) if n < MIN_GOOD_PER_CATEGORY}
    if not short:
        return
    src = "" if where is None or not isinstance(where, (str, Path)) else f"{where}: "
    what = "; ".join(f"{n} good image{'s' if n != 1 else ''}" + (f" of category {c!r}" if c else "")
                     for c, n in short.items())
    raise ValueError(f"{src}{what}: too few to hold out a calibration slice; at least {MIN_GOOD_PER_CATEGORY} "
                     f"good images{' per category' if len(by_cat) > 1 or any(by_cat) else ''} are needed (1 to "
                     f"train on, 1 to calibrate the threshold on; more give a better threshold)")


class RunFolderExistsError(ValueError):
    """The output folder already holds a run or a model that this call would overwrite."""


def existing_outputs(folder: str | Path) -> list[str]:
    """What a training run or ``ccad bank`` would destroy in ``folder``: its ``checkpoint-*``
    folders, a saved model (``model/`` or the folder itself), its bank (names relative to ``folder``)."""
    from .training import list_checkpoints

    d = Path(folder)
    if not d.is_dir():
        return []
    found = [c.name for c in list_checkpoints(d)]
    for name in ("model/config.json", "config.json", "bank.safetensors"):
        if (d / name).is_file():
            found.append(name.split("/")[0] + ("/" if "/" in name else ""))
    return found


def refuse_to_overwrite(folder: str | Path, flag_resume: Optional[str] = "resume=True",
                        flag_overwrite: str = "overwrite=True") -> None:
    """Raise :class:`RunFolderExistsError` when ``folder`` holds something :func:`existing_outputs` lists."""
    found = existing_outputs(folder)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        how = (f"pass {flag_resume} to continue it, or {flag_overwrite} to replace it" if flag_resume
               else f"pass {flag_overwrite} to replace it")
        raise RunFolderExistsError(f"{folder}: already holds {shown}; nothing was changed: {how} "
                                   f"(or choose another folder)")


def _detector_config(variant: str, image_size: Optional[int], method: Any, bank_config: Any, scoring: Any,
                     backbone: Optional[str], layers: Optional[Sequence[int]], bank_size: Optional[int],
                     weights: Optional[str], batch_size: Optional[int], preset: Optional[str]) -> DetectorConfig:
    from .config import BankConfig

    mcls = get_method(variant)
    mcfg = method if method is not None else mcls.default_config(preset)
    if method is not None and preset is not None:
        set_option(mcfg, "preset", preset, "preset")
    bc = bank_config if bank_config is not None else BankConfig()
    for key, value in (("backbone", backbone), ("layers", None if layers is None else tuple(layers)),
                       ("size", bank_size), ("weights", weights), ("batch_size", batch_size)):
        if value is not None:
            setattr(bc, key, value)
    return DetectorConfig(variant=variant, image_size=int(image_size or mcls.default_image_size), bank=bc,
                          scoring=scoring if scoring is not None else mcls.default_scoring(), method=mcfg).validate()


def _prepare(data: Any, config: DetectorConfig, bank: Any, calibration_fraction: float, seed: int, device: Any,
             progress: ProgressFn, cancel: CancelFn, run_dir: Optional[Path],
             phase: Optional[Callable[[str], None]] = None) -> tuple[Method, Any, list, list]:
    """Samples -> train / calibration split -> the method with its bank and modules built
    (``phase(text)`` is told when the bank and the modules are built)."""
    from .data.datasets import SampleList, collect_skipped

    with collect_skipped() as unsupported:  # files left out for their extension (info.json "skipped")
        good = _as_samples(data)
    check_calibration_split(good, calibration_fraction, data)
    train, cal = split_good(good, calibration_fraction, seed)
    train = SampleList(train, unsupported)
    dev = torch.device(device) if device is not None else default_device()
    mcls = get_method(config.variant)
    ctx = Context(image_size=config.image_size, device=dev, bank_config=config.bank, scoring=config.scoring,
                  run_dir=run_dir, progress=progress, cancel=cancel, seed=seed, held_out=list(cal))
    method = mcls(config.method, ctx)
    if bank is None:
        if phase is not None and mcls.uses_bank:
            phase("building the feature bank")
        bank = method.build_bank(train)
    elif mcls.uses_bank:
        meta = getattr(bank, "meta", {}) or {}
        config.bank.backbone = meta.get("backbone", config.bank.backbone)
        config.bank.layers = tuple(meta.get("layers", config.bank.layers))
        config.bank.size = int(bank.features.shape[0])
    ctx.bank = bank
    if phase is not None:
        phase(method.build_phase)
    with torch.random.fork_rng(devices=[]):  # a fresh init is a function of the seed, not of the global RNG
        torch.manual_seed(seed)
        method.build(train)
    config.validate()
    return method, bank, train, cal


def _build_fusion(config: DetectorConfig, train: list, cal: list, device: torch.device, memory: Any,
                  progress: ProgressFn, cancel: CancelFn, seed: int) -> Any:
    """The fusion memory (:mod:`ccad.scoring.fusion`) when ``scoring.fusion`` is ``"bank"``: fitted on
    the training images, or ``memory`` (an already fitted ``PatchCoreScorer`` of the same images)."""
    sc = config.scoring
    if sc.fusion != "bank":
        if memory is not None:
            raise ConfigError("fusion_memory was given but scoring.fusion is 'none'")
        return None
    if not cal:
        raise ConfigError("scoring.fusion='bank' normalises both maps on held-out good images: "
                          "calibration_fraction must be > 0")
    from .scoring.fusion import BankFusion, bank_backbone

    if memory is not None:
        return BankFusion(scorer=memory, weight=float(sc.fusion_weight), norm=sc.fusion_norm)
    return BankFusion.fit(train, bank_backbone(config.bank, device), image_size=int(sc.fusion_image_size),
                          ratio=float(sc.fusion_ratio), weight=float(sc.fusion_weight), norm=sc.fusion_norm,
                          batch_size=config.bank.batch_size, seed=seed, progress=progress, cancel=cancel)


def _info(train: list, bank: Any) -> dict[str, Any]:
    cats = sorted({getattr(s, "category", "") or "" for s in train} - {""})
    from .data.datasets import unsupported_reason

    skipped = list((getattr(bank, "meta", {}) or {}).get("skipped", []) if bank is not None else [])
    skipped += [{"path": str(p), "reason": unsupported_reason(p)} for p in getattr(train, "skipped", [])]
    return {"n_train_images": len(train), "skipped": skipped, "categories": cats or None}


def fit_detector(
    data: Any,
    variant: str = "patchcore",
    backbone: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    bank_size: Optional[int] = None,
    image_size: int = 256,
    method: Any = None,
    calibration_fraction: float = 0.2,
    batch_size: int = 8,
    weights: Optional[str] = None,
    bank_config: Any = None,
    scoring: Any = None,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    device: Any = None,
    seed: int = 0,
    fusion_memory: Any = None,
) -> AnomalyDetector:
    """Build a detector whose method needs no training (e.g. PatchCore) from good images: a working
    detector within seconds, calibrated on a held-out good slice. ``method`` is the method's own
    config (e.g. ``get_method("patchcore").Config(ratio=0.05)``); the bank settings default to
    :class:`ccad.config.BankConfig`. With ``scoring.fusion = "bank"`` the method's map is fused
    with a nearest-neighbour map (:mod:`ccad.scoring.fusion`; ``fusion_memory`` reuses a fitted
    ``PatchCoreScorer`` of the same training images)."""
    if get_method(variant).trainable:
        raise ValueError(f"{variant!r} is trained: use train_detector (ccad train --variant {variant})")
    config = _detector_config(variant, image_size, method, bank_config, scoring, backbone, layers, bank_size,
                              weights, batch_size, None)
    m, bank, train, cal = _prepare(data, config, None, calibration_fraction, seed, device, progress, cancel, None)
    fusion = _build_fusion(config, train, cal, m.ctx.device, fusion_memory, progress, cancel, seed)
    det = AnomalyDetector(config, bank, m, info=_info(train, bank), device=m.ctx.device, fusion=fusion)
    if cal:
        det.calibrate(cal, batch_size=batch_size)
    return det


def train_detector(
    data: Any,
    out_dir: str | Path,
    variant: str = "ccad-v",
    method: Any = None,
    train: Any = None,
    bank: Any = None,
    preset: Optional[str] = None,
    image_size: Optional[int] = None,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    backbone: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    bank_size: Optional[int] = None,
    bank_config: Any = None,
    scoring: Any = None,
    calibration_fraction: float = 0.2,
    callbacks: Sequence[Callable] = (),
    resume: bool | str = False,
    cancel: CancelFn = None,
    progress: ProgressFn = None,
    device: Any = None,
    seed: int = 0,
    fusion_memory: Any = None,
    overwrite: bool = False,
    phase: Optional[Callable[[str], None]] = None,
) -> AnomalyDetector:
    """Build and train a detector of any registered method on good images; save ``out_dir/model``.

    ``method`` is the method's typed config (default: its defaults, with ``preset``); ``train`` a
    :class:`ccad.training.TrainConfig` (``steps`` / ``batch_size`` / ``lr`` override its fields).
    The bank is built first unless given (and, when resuming, reloaded from ``out_dir``). Training
    runs :class:`ccad.training.Trainer` on the method's loss (accelerate; AMP, EMA, checkpoints in
    ``out_dir``; ``resume=True`` continues from the latest). A callback returning True stops
    training with a resumable checkpoint; the detector is still assembled (from the EMA weights
    so far), calibrated and saved. Methods without training are fitted (as :func:`fit_detector`).
    ``scoring.fusion = "bank"`` fuses the method's map with a nearest-neighbour map, normalised on
    the calibration slice (:mod:`ccad.scoring.fusion`; ``fusion_memory``: a fitted
    ``PatchCoreScorer`` of the same training images to reuse).

    An ``out_dir`` that already holds a run (``checkpoint-*``, ``model/``, ``bank.safetensors``) is
    refused with :class:`RunFolderExistsError` before anything is read or written, unless
    ``resume`` (continue it) or ``overwrite=True`` (replace it: its checkpoints are removed when
    training starts, its model when the new one is saved). Too few good images to hold out a
    calibration slice is a ``ValueError`` before anything is built (:func:`check_calibration_split`).
    ``phase(text)`` is told what runs now, as it starts ("building the feature bank" only for a
    method that builds one, the method's own text for preparing its training data, "training",
    "calibrating ...", "saving ..."); ``progress(done, total)`` counts within a phase.
    """
    from .features import FeatureBank
    from .training import TrainConfig, Trainer

    def say(text: str) -> None:
        if phase is not None:
            phase(text)

    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in out_dir, "
                         "overwrite replaces it")
    if not resume and not overwrite:
        refuse_to_overwrite(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _detector_config(variant, image_size, method, bank_config, scoring, backbone, layers, bank_size,
                              None, None, preset)
    mcls = get_method(variant)
    tcfg = train if train is not None else TrainConfig(seed=seed)
    for key, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            setattr(tcfg, key, value)
    tcfg.validate()
    if bank is None and resume and (out_dir / "bank.safetensors").is_file():
        bank = FeatureBank.load(out_dir)  # the bank this run was trained with
    m, bank, train_s, cal = _prepare(data, config, bank, calibration_fraction, seed, device, progress, cancel,
                                     out_dir, phase=say)
    if bank is not None:
        bank.save(out_dir)
    info = _info(train_s, bank)
    t0 = time.perf_counter()
    if mcls.trainable:
        config.train = tcfg
        cbs = list(callbacks)
        if cancel is not None:
            cbs.append(lambda state: bool(cancel()))
        say(m.training_data_phase)
        dataset = m.training_dataset(train_s)
        preview_image = _preview_image(train_s, m.ctx.image_size) if tcfg.preview_every else None
        say("training")
        trainer = Trainer(m.trainable_modules(), m.training_loss, dataset, tcfg, out_dir, callbacks=cbs,
                          preview=m.preview, preview_image=preview_image)
        result = trainer.train(resume=resume, overwrite=bool(overwrite))
        m.use_trained(result.model)
        m.after_training(train_s)  # e.g. domain adaptation of the scoring extractor (D3AD eq. 10)
        info.update({"train_steps": int(result.step), "stopped_early": bool(result.stopped)})
    info["train_seconds"] = round(time.perf_counter() - t0, 1)
    if config.scoring.fusion == "bank":
        say("fitting the bank map it is fused with")
    fusion = _build_fusion(config, train_s, cal, m.ctx.device, fusion_memory, progress, cancel, seed)
    det = AnomalyDetector(config, bank, m, device=m.ctx.device, info=info, fusion=fusion)
    if cal:
        say("calibrating the threshold on held-out good images")
        det.calibrate(cal, batch_size=tcfg.batch_size)
    say("saving the model")
    state = _launch_state()
    if state is None or state.is_main_process:  # several processes (accelerate launch): one writes the model
        if overwrite and (out_dir / "model").is_dir():  # replaced as a whole: no stale file of the old model
            from .training import _remove_dir

            _remove_dir(out_dir / "model")
        det.save_pretrained(out_dir / "model")
    if state is not None:
        state.wait_for_everyone()
    return det


def _preview_image(train: Sequence[Any], image_size: int) -> Optional[torch.Tensor]:
    """The first readable training image (``3 x S x S`` in [0, 1]) the live preview reconstructs."""
    from .data.datasets import ImageDataset

    ds = ImageDataset(list(train)[:8], image_size, on_error="skip")
    try:
        return ds[0]["image"] if len(ds) else None
    except Exception:  # noqa: BLE001 - no readable image among the first: no preview, training goes on
        return None


def _launch_state() -> Any:
    """accelerate's shared state when a launcher started several processes, else None."""
    from .distributed import launched_world_size

    if launched_world_size() <= 1:
        return None
    from accelerate import PartialState

    return PartialState()
