"""The one object users call: :class:`AnomalyDetector`.

A detector is features + denoiser + reconstruction strategy + scorer, fixed by a
:class:`~ccad.config.DetectorConfig` from the variant registry:

- ``patchcore``: the coarse bank's backbone features scored by nearest-neighbour distance to a
  1 % coreset memory bank (the baseline every seed paper compares with);
- ``ccad-v``: the pixel-space denoiser conditioned on the Coarse Feature Bank (CCAD sec. 3.3),
  DDAD-guided reconstruction (eq. 12-14) and the feature-cosine anomaly map (eq. 16).

``AnomalyDetector.from_pretrained(path_or_repo_id).predict(image_or_path)`` returns a
:class:`Prediction` with the score, map, reconstruction, binary mask, verdict and timing. The
same object backs the CLI, the app and the benchmarks.
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
from .config import ConfigError, DetectorConfig
from .data.io import ImageReadError, coerce_image, to_tensor
from .registry import default_config, get_variant
from .scoring.anomaly_map import anomaly_map, gaussian_blur, image_score, scaled_sigma
from .scoring.threshold import Calibration

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


class CheckpointError(ValueError):
    """A saved detector folder is missing files, corrupt, or from an incompatible version."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------

def _colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to an RGB uint8 'jet'-like colour map (OpenCV's JET)."""
    import cv2

    v = np.clip(values, 0.0, 1.0)
    bgr = cv2.applyColorMap((v * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class Prediction:
    """The result of one inspection. Images are at the input's original size."""

    image: np.ndarray  # H x W x 3 float32 in [0, 1]
    reconstruction: Optional[np.ndarray]  # H x W x 3 float32, None for feature-only detectors
    anomaly_map: np.ndarray  # H x W float32
    score: float
    threshold: float
    seconds: float
    path: Optional[str] = None
    map_floor: float = 0.0  # map value of a typical good pixel (for display scaling)

    @property
    def is_anomalous(self) -> bool:
        return bool(np.isfinite(self.threshold) and self.score > self.threshold)

    @property
    def verdict(self) -> str:
        if not np.isfinite(self.threshold):
            return "uncalibrated"
        return "anomalous" if self.is_anomalous else "good"

    @property
    def mask(self) -> np.ndarray:
        """Pixels whose map value exceeds the threshold (H x W bool)."""
        if not np.isfinite(self.threshold):
            return np.zeros(self.anomaly_map.shape, bool)
        return self.anomaly_map > self.threshold

    def with_threshold(self, threshold: float) -> "Prediction":
        """The same result re-labelled at another threshold, without re-running the model."""
        return replace(self, threshold=float(threshold))

    def normalized_map(self) -> np.ndarray:
        """Map scaled so a typical good pixel is 0 and the threshold is 1 (comparable across images)."""
        hi = self.threshold if np.isfinite(self.threshold) else float(self.anomaly_map.max())
        lo = min(self.map_floor, hi - 1e-6)
        return np.clip((self.anomaly_map - lo) / max(hi - lo, 1e-6), 0.0, 1.0)

    def heatmap(self) -> np.ndarray:
        """H x W x 3 uint8 colour-mapped anomaly map (red at or above the threshold)."""
        return _colormap(self.normalized_map())

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
        return {"path": self.path, "score": self.score, "threshold": self.threshold,
                "verdict": self.verdict, "seconds": self.seconds}


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------

FILES = {
    "config": "config.json",
    "calibration": "calibration.json",
    "info": "info.json",
    "patchcore": "patchcore.safetensors",
    "denoiser": "denoiser.safetensors",
}


class AnomalyDetector(
    ModelHubMixin,
    library_name="ccad",
    tags=["anomaly-detection", "ccad", "diffusion"],
    repo_url="https://github.com/ccad-project/ccad",
    paper_url="https://arxiv.org/abs/2512.21459",
):
    """Features + (optional) denoiser + reconstruction + scorer behind one ``predict`` call."""

    def __init__(
        self,
        config: DetectorConfig,
        bank: Any,
        patchcore: Any = None,
        denoiser: Optional[torch.nn.Module] = None,
        calibration: Optional[Calibration] = None,
        info: Optional[dict[str, Any]] = None,
        device: Optional[torch.device | str] = None,
    ) -> None:
        self.config = config.validate()
        self.bank = bank
        self.patchcore = patchcore
        self.denoiser = denoiser
        self.calibration = calibration
        self.info: dict[str, Any] = dict(info or {})
        self.device = torch.device(device) if device is not None else default_device()
        self._score_backbone = None
        self._scheduler = None
        get_variant(config.variant)  # unknown variants fail here, with the known names
        if self.variant == "patchcore" and patchcore is None:
            raise ConfigError("a patchcore detector needs its PatchCore memory bank (patchcore=...)")
        if self.variant == "ccad-v" and denoiser is None:
            raise ConfigError("a ccad-v detector needs its trained denoiser (denoiser=...)")
        if self.denoiser is not None:
            self.denoiser.to(self.device).eval()
            if self.device.type == "cuda":
                self.denoiser.to(memory_format=torch.channels_last)
        if self.patchcore is not None and hasattr(self.patchcore, "to"):
            self.patchcore.to(self.device)

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
    def map_floor(self) -> float:
        return float(self.info.get("map_floor", 0.0))

    # ---- internals --------------------------------------------------------------------------
    def _scoring_backbone(self):
        if self._score_backbone is None:
            from .features import get_backbone

            sc = self.config.scoring
            name = sc.backbone or self.config.bank.backbone
            weights = self.config.bank.weights if name == self.config.bank.backbone else None
            self._score_backbone = get_backbone(name, layers=tuple(sc.score_layers), weights=weights).to(self.device)
        return self._score_backbone

    def _diffusion_scheduler(self):
        if self._scheduler is None:
            from .diffusion import make_scheduler

            d = self.config.diffusion
            self._scheduler = make_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
        return self._scheduler

    @torch.no_grad()
    def _reconstruct(self, x: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        """Reconstruct ``x`` (B x 3 x S x S in [0, 1]) with the configured strategy (eq. 12-14)."""
        from .diffusion import RECONSTRUCTORS

        d = self.config.diffusion
        strategy = RECONSTRUCTORS[d.strategy]
        gen = torch.Generator(device=x.device).manual_seed(d.seed if seed is None else seed)
        bank = self.bank.features.to(x.device)
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            x_hat = strategy(self.denoiser, x * 2 - 1, bank, self._diffusion_scheduler(), start_step=d.start_step,
                             steps=d.steps, guidance=d.guidance, eta=d.eta, generator=gen)
        return ((x_hat.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def maps_for_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Anomaly maps ``B x 1 x S x S`` (and reconstructions) for a batch at the model's size."""
        x = x.to(self.device, torch.float32)
        sc = self.config.scoring
        if self.variant == "patchcore":
            raw = self.patchcore.score_maps(x).float()
            maps = F.interpolate(raw, size=x.shape[-2:], mode="bilinear", align_corners=False)
            return gaussian_blur(maps, scaled_sigma(sc.sigma, x.shape[-1])), None
        x_hat = self._reconstruct(x)
        maps = anomaly_map(x, x_hat, self._scoring_backbone(), pixel_weight=sc.pixel_weight, sigma=sc.sigma)
        return maps, x_hat

    def _score(self, maps: torch.Tensor) -> torch.Tensor:
        sc = self.config.scoring
        return image_score(maps, sc.score, sc.topk_ratio)

    def _predict_batch(self, images: list[np.ndarray], paths: list[Optional[str]]) -> list[Prediction]:
        t0 = time.perf_counter()
        x = torch.stack([to_tensor(im, self.image_size) for im in images])
        maps, x_hat = self.maps_for_batch(x)
        scores = self._score(maps).cpu().numpy()
        per = (time.perf_counter() - t0) / len(images)
        out = []
        for i, im in enumerate(images):
            h, w = im.shape[:2]
            m = F.interpolate(maps[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            rec = None
            if x_hat is not None:
                rec = F.interpolate(x_hat[i:i + 1].float(), size=(h, w), mode="bilinear", align_corners=False)
                rec = rec[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
            out.append(Prediction(image=im, reconstruction=rec, anomaly_map=m.cpu().numpy().astype(np.float32),
                                  score=float(scores[i]), threshold=self.threshold, seconds=per, path=paths[i],
                                  map_floor=self.map_floor))
        return out

    # ---- public API -------------------------------------------------------------------------
    def predict(self, image: Any) -> Prediction:
        """Inspect one image (path, PIL image or numpy array; grey/RGB/RGBA/16-bit; any size)."""
        path = str(image) if isinstance(image, (str, Path)) else None
        return self._predict_batch([coerce_image(image)], [path])[0]

    def predict_many(
        self, items: Iterable[Any], batch_size: int = 8, on_error: str = "skip", progress: ProgressFn = None,
        cancel: CancelFn = None,
    ) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Inspect many images in batches. A bad file is reported in ``errors`` and skipped
        (``on_error="skip"``) or raises (``"raise"``); nothing already done is lost."""
        items = list(items)
        results: list[Prediction] = []
        errors: list[tuple[str, str]] = []
        batch: list[np.ndarray] = []
        paths: list[Optional[str]] = []
        done = 0

        def flush() -> None:
            if batch:
                results.extend(self._predict_batch(batch, paths))
                batch.clear()
                paths.clear()

        for item in items:
            if cancel is not None and cancel():
                break
            name = str(item) if isinstance(item, (str, Path)) else f"item {done}"
            try:
                batch.append(coerce_image(item))
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

    def score_batches(self, batches: Iterable[dict], progress: ProgressFn = None, total: Optional[int] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ``N x S x S`` maps for batches from :func:`ccad.data.datasets.iter_batches`."""
        scores, maps = [], []
        done = 0
        for b in batches:
            m, _ = self.maps_for_batch(b["image"])
            scores.append(self._score(m).cpu().numpy())
            maps.append(m[:, 0].cpu().numpy().astype(np.float32))
            done += len(b["image"])
            if progress is not None:
                progress(done, total or done)
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, self.image_size, self.image_size), np.float32)
        return np.concatenate(scores), np.concatenate(maps)

    def calibrate(self, good_items: Sequence[Any], method: Optional[str] = None, fpr: Optional[float] = None,
                  sigma: Optional[float] = None, batch_size: int = 8) -> Calibration:
        """Calibrate the threshold on held-out good images only (paths, samples or arrays)."""
        from .data.datasets import iter_batches
        from .data.sample import Sample

        sc = self.config.scoring
        samples = [s if isinstance(s, Sample) else Sample(str(s), None, 0) for s in good_items]
        errors: list[tuple[str, str]] = []
        scores, maps = self.score_batches(iter_batches(samples, self.image_size, batch_size, on_error="skip",
                                                        errors=errors))
        if scores.size == 0:
            raise ValueError("no readable good image to calibrate on" + (f" ({errors[0][0]}: {errors[0][1]})"
                                                                         if errors else ""))
        self.calibration = Calibration.fit(scores, method or sc.calibration,
                                           fpr=sc.target_fpr if fpr is None else fpr,
                                           sigma=sc.sigma_k if sigma is None else sigma)
        self.info["map_floor"] = float(np.median(maps))
        self.info["n_calibration_images"] = int(scores.size)
        return self.calibration

    def card(self) -> dict[str, Any]:
        """Plain facts about this model for the UI and the model card."""
        bank_meta = dict(getattr(self.bank, "meta", {}) or {})
        cal = self.calibration
        return {
            "variant": self.variant,
            "title": get_variant(self.variant).title,
            "backbone": self.config.bank.backbone,
            "layers": list(self.config.bank.layers),
            "bank_size": int(self.bank.features.shape[0]) if self.bank is not None else None,
            "feature_dim": int(self.bank.features.shape[1]) if self.bank is not None else None,
            "image_size": self.image_size,
            "threshold": self.threshold,
            "calibration": None if cal is None else {"method": cal.method, "n_good": int(cal.good_scores.size),
                                                     "target_fpr": cal.target_fpr},
            "n_train_images": self.info.get("n_train_images", bank_meta.get("n_images")),
            "metrics": self.info.get("metrics"),
            "created": self.info.get("created"),
            "denoiser_parameters": (sum(p.numel() for p in self.denoiser.parameters())
                                    if self.denoiser is not None else None),
            "reconstruction": (None if self.config.diffusion is None else
                               {"strategy": self.config.diffusion.strategy,
                                "start_step": self.config.diffusion.start_step,
                                "steps": self.config.diffusion.steps,
                                "guidance": self.config.diffusion.guidance}),
            "ccad_version": self.info.get("ccad_version", __version__),
        }

    # ---- persistence (huggingface_hub mixin) ------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        self.config.save(save_directory / FILES["config"])
        self.bank.save(save_directory)
        if self.patchcore is not None:
            save_file({k: v.contiguous().cpu() for k, v in self.patchcore.to_tensors().items()},
                      str(save_directory / FILES["patchcore"]))
        if self.denoiser is not None:
            save_file({k: v.contiguous().cpu() for k, v in self.denoiser.state_dict().items()},
                      str(save_directory / FILES["denoiser"]))
        if self.calibration is not None:
            (save_directory / FILES["calibration"]).write_text(json.dumps(self.calibration.to_dict(), indent=1))
        info = dict(self.info)
        info.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        info["ccad_version"] = __version__
        (save_directory / FILES["info"]).write_text(json.dumps(info, indent=2, default=float))
        (save_directory / "README.md").write_text(model_card_text(self.card()))

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Optional[str]:  # type: ignore[override]
        """Write config.json, bank, weights (safetensors), calibration and a model card to a folder."""
        return super().save_pretrained(save_directory, **kwargs)

    def set_threshold_and_save(self, save_directory: str | Path, threshold: float) -> None:
        """Change a saved model's threshold in place (only calibration.json is rewritten)."""
        self.threshold = threshold
        Path(save_directory, FILES["calibration"]).write_text(json.dumps(self.calibration.to_dict(), indent=1))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, device: Any = None, **_: Any) -> "AnomalyDetector":
        path = Path(model_id)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                          force_download=force_download, local_files_only=local_files_only,
                                          token=token))
        return cls.load_folder(path, device=device)

    @classmethod
    def load_folder(cls, path: str | Path, device: Any = None) -> "AnomalyDetector":
        """Load a detector saved by :meth:`save_pretrained` from a local folder."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .features import FeatureBank, PatchCoreScorer, get_backbone

        path = Path(path)
        if not (path / FILES["config"]).is_file():
            raise CheckpointError(f"{path}: not a ccad model folder (no {FILES['config']})")
        try:
            config = DetectorConfig.load(path / FILES["config"])
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        if not get_variant(config.variant).available:
            raise CheckpointError(f"{path}: variant {config.variant!r} is not available in ccad {__version__}")
        try:
            bank = FeatureBank.load(path)
        except Exception as exc:  # noqa: BLE001 - any reader error is a checkpoint problem
            raise CheckpointError(f"{path}: cannot read the feature bank ({exc})") from None
        patchcore = denoiser = None
        try:
            if (path / FILES["patchcore"]).is_file():
                backbone = get_backbone(config.bank.backbone, layers=tuple(config.bank.layers),
                                        weights=config.bank.weights)
                patchcore = PatchCoreScorer.from_tensors(load_file(str(path / FILES["patchcore"])), backbone)
            if config.denoiser is not None:
                from .models import BankConditionedUNet, DenoiserConfig

                f = path / FILES["denoiser"]
                if not f.is_file():
                    raise CheckpointError(f"{path}: config names a denoiser but {FILES['denoiser']} is missing")
                denoiser = BankConditionedUNet(DenoiserConfig.from_dict(config.denoiser))
                state = load_file(str(f))
                missing, unexpected = denoiser.load_state_dict(state, strict=False)
                if missing or unexpected:
                    raise CheckpointError(f"{f}: weights do not match the config (missing {missing[:3]}, "
                                          f"unexpected {unexpected[:3]})")
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
        calibration = None
        if (path / FILES["calibration"]).is_file():
            try:
                calibration = Calibration.from_dict(json.loads((path / FILES["calibration"]).read_text()))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path / FILES['calibration']}: {exc}") from None
        info = {}
        if (path / FILES["info"]).is_file():
            try:
                info = json.loads((path / FILES["info"]).read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path / FILES['info']}: {exc}") from None
        try:
            return cls(config, bank, patchcore=patchcore, denoiser=denoiser, calibration=calibration, info=info,
                       device=device)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from None


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
    from .data.datasets import load_dataset
    from .data.sample import Sample

    if isinstance(data, (str, Path)):
        samples = load_dataset(data, split=split)
    else:
        samples = [s if isinstance(s, Sample) else Sample(str(s), None, 0) for s in data]
    good = [s for s in samples if s.label == 0]
    if not good:
        raise ValueError(f"{data if isinstance(data, (str, Path)) else 'the given samples'}: no good images found")
    return good


def split_good(samples: list, calibration_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministically hold out a slice of the good images for threshold calibration."""
    if not 0.0 <= calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
    order = np.random.default_rng(seed).permutation(len(samples))
    n_cal = int(round(len(samples) * calibration_fraction))
    if calibration_fraction > 0 and len(samples) >= 2:
        n_cal = min(max(n_cal, 1), len(samples) - 1)
    cal = [samples[i] for i in sorted(order[:n_cal])]
    train = [samples[i] for i in sorted(order[n_cal:])]
    return train, cal


def bank_from_memory(pc: Any, samples: list, bank_size: int, image_size: int, batch_size: int = 8,
                     seed: int = 0) -> Any:
    """The Coarse Feature Bank (eq. 5-6) as a greedy k-center coreset of the PatchCore memory.

    The memory is itself a greedy coreset of every training patch, and k-center coresets
    compose (a point is within the memory's covering radius of a memory row, which is within
    the bank's radius of a bank row), so this needs no second pass over the images.
    """
    from .features import FeatureBank
    from .features.bank import ImageStream
    from .features.coreset import greedy_coreset, validate_bank_size

    xi = validate_bank_size(bank_size)
    memory = pc.memory_bank
    idx = greedy_coreset(memory, xi, seed=seed)
    feats = memory[idx].float().cpu()
    bb = pc.backbone
    meta = {
        "backbone": getattr(bb, "name", type(bb).__name__), "layers": list(getattr(bb, "layers", [])),
        "image_size": int(image_size), "xi": int(feats.shape[0]), "xi_requested": xi,
        "feature_dim": int(feats.shape[1]), "n_images": int(pc.n_images), "n_patches": int(pc.n_patches),
        "grid": list(pc.grid) if pc.grid else None,
        "source_hash": ImageStream(samples, image_size, batch_size).source_hash(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ccad_version": __version__,
        "skipped": list(pc.skipped),
        "coreset": {"method": "greedy k-center of the PatchCore memory (itself a streaming greedy coreset)",
                    "memory_rows": int(memory.shape[0]), "seed": seed},
    }
    return FeatureBank(feats, meta)


def fit_detector(
    data: Any,
    variant: str = "patchcore",
    backbone: str = "tf_efficientnet_lite0",
    layers: Sequence[int] = (2, 3),
    bank_size: int = 200,
    image_size: int = 256,
    patchcore_ratio: float = 0.01,
    calibration_fraction: float = 0.2,
    batch_size: int = 8,
    weights: Optional[str] = None,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    device: Any = None,
    seed: int = 0,
) -> AnomalyDetector:
    """Build the Coarse Feature Bank and the PatchCore memory from good images: a working
    (PatchCore) detector within seconds, calibrated on a held-out good slice."""
    from .features import FeatureBank, PatchCoreScorer, get_backbone

    if variant != "patchcore":
        raise ValueError(f"fit_detector builds bank-only detectors ('patchcore'); use train_detector for {variant!r}")
    good = _as_samples(data)
    train, cal = split_good(good, calibration_fraction, seed)
    config = default_config("patchcore", image_size=image_size)
    config.bank.backbone, config.bank.layers, config.bank.size = backbone, tuple(layers), int(bank_size)
    config.bank.weights, config.bank.batch_size = weights, batch_size
    config.patchcore.ratio = float(patchcore_ratio)
    config.validate()
    dev = torch.device(device) if device is not None else default_device()
    bb = get_backbone(backbone, layers=tuple(layers), weights=weights).to(dev)
    pc = PatchCoreScorer(bb, ratio=patchcore_ratio, image_size=image_size, batch_size=batch_size, seed=seed)
    pc.fit(train, progress=progress, cancel=cancel)
    if pc.memory_bank.shape[0] >= 4 * bank_size:
        bank = bank_from_memory(pc, train, bank_size, image_size, batch_size, seed)
    else:  # too few patches in the memory to draw xi well-spread rows from: one more (small) pass
        bank = FeatureBank.build(train, bb, size=bank_size, image_size=image_size, batch_size=batch_size,
                                 progress=progress, cancel=cancel, seed=seed)
    det = AnomalyDetector(config, bank, patchcore=pc,
                          info={"n_train_images": len(train), "skipped": bank.meta.get("skipped", [])}, device=dev)
    if cal:
        det.calibrate(cal, batch_size=batch_size)
    return det


def train_detector(
    data: Any,
    out_dir: str | Path,
    bank: Any = None,
    variant: str = "ccad-v",
    preset: str = "small",
    image_size: int = 128,
    steps: int = 2000,
    batch_size: int = 8,
    lr: float = 3e-4,
    backbone: str = "tf_efficientnet_lite0",
    layers: Sequence[int] = (2, 3),
    bank_size: int = 200,
    calibration_fraction: float = 0.2,
    diffusion: Optional[dict[str, Any]] = None,
    scoring: Optional[dict[str, Any]] = None,
    train_options: Optional[dict[str, Any]] = None,
    callbacks: Sequence[Callable] = (),
    resume: bool | str = False,
    cancel: CancelFn = None,
    progress: ProgressFn = None,
    device: Any = None,
    seed: int = 0,
) -> AnomalyDetector:
    """Train a CCAD(V) detector on good images (eq. 15) and save it to ``out_dir/model``.

    The coarse bank is built first unless given. Training runs :class:`ccad.training.Trainer`
    (accelerate; AMP, EMA, checkpoints in ``out_dir``; ``resume=True`` continues from the
    latest). A callback returning True stops training with a resumable checkpoint; the detector
    is still assembled (from the EMA weights so far), calibrated and saved.
    """
    from .data.datasets import ImageDataset
    from .features import FeatureBank, get_backbone
    from .models import BankConditionedUNet, DenoiserConfig
    from .training import TrainConfig, Trainer

    if variant != "ccad-v":
        raise ValueError(f"train_detector trains 'ccad-v' in this version, not {variant!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    good = _as_samples(data)
    train, cal = split_good(good, calibration_fraction, seed)
    dev = torch.device(device) if device is not None else default_device()
    config = default_config("ccad-v", image_size=image_size)
    if bank is None:
        config.bank.backbone, config.bank.layers, config.bank.size = backbone, tuple(layers), int(bank_size)
        bb = get_backbone(backbone, layers=tuple(layers)).to(dev)
        bank = FeatureBank.build(train, bb, size=bank_size, image_size=image_size, progress=progress, cancel=cancel)
        bank.save(out_dir)
    else:
        meta = bank.meta
        config.bank.backbone = meta.get("backbone", backbone)
        config.bank.layers = tuple(meta.get("layers", layers))
        config.bank.size = int(bank.features.shape[0])
    dcfg = DenoiserConfig.preset(preset, sample_size=image_size, bank_dim=int(bank.features.shape[1]))
    config.denoiser = dcfg.to_dict()
    config.patchcore = None
    if diffusion:
        config.diffusion = replace(config.diffusion, **diffusion)
    if scoring:
        config.scoring = replace(config.scoring, **scoring)
    tcfg = TrainConfig(**{"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, **(train_options or {})})
    config.train = tcfg.__dict__.copy()
    config.validate()
    model = BankConditionedUNet(dcfg)
    dataset = ImageDataset(train, image_size, on_error="skip")
    cbs = list(callbacks)
    if cancel is not None:
        cbs.append(lambda state: bool(cancel()))
    trainer = Trainer(model, bank.features, dataset, tcfg, out_dir, callbacks=cbs)
    t0 = time.perf_counter()
    result = trainer.train(resume=resume)
    det = AnomalyDetector(config, bank, denoiser=result.model, device=dev,
                          info={"n_train_images": len(train), "train_steps": int(result.step),
                                "train_seconds": round(time.perf_counter() - t0, 1),
                                "stopped_early": bool(result.stopped)})
    if cal:
        det.calibrate(cal, batch_size=batch_size)
    det.save_pretrained(out_dir / "model")
    return det
