"""Plain configuration dataclasses with a JSON round trip.

A detector's configuration is one :class:`DetectorConfig` saved as ``config.json`` beside its
safetensors weights (the diffusers convention). Every field is a plain value so the file is
readable and editable by hand; unknown keys are rejected with a message naming the field.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Type, TypeVar

T = TypeVar("T")

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A configuration file or field is invalid; the message names the field."""


def _from_dict(cls: Type[T], data: dict[str, Any], where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list) and key in ("layers", "score_layers"):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)  # type: ignore[call-arg]
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{where}: {exc}") from exc


@dataclass
class BankConfig:
    """Global feature space D and its Coarse Feature Bank B_c (CCAD sec. 3.2, eq. 4-5).

    ``size`` is the coreset size xi (the paper: <= 1000, 100-200 suffice, Table 5 / Fig. 5).
    """

    backbone: str = "tf_efficientnet_lite0"
    layers: tuple[int, ...] = (2, 3)
    size: int = 200
    local_avg: int = 3
    batch_size: int = 8
    weights: Optional[str] = None

    def validate(self) -> None:
        if not 1 <= int(self.size) <= 1000:
            raise ConfigError(f"bank.size (xi) must be in 1..1000, got {self.size}")
        if not self.layers:
            raise ConfigError("bank.layers must name at least one backbone layer")


@dataclass
class PatchCoreConfig:
    """PatchCore memory bank (Roth et al. 2022): coreset ratio of all patches, k nearest neighbours."""

    ratio: float = 0.01
    k: int = 1

    def validate(self) -> None:
        if not 0.0 < float(self.ratio) <= 1.0:
            raise ConfigError(f"patchcore.ratio must be in (0, 1], got {self.ratio}")


@dataclass
class DiffusionConfig:
    """Noise schedule and the DDAD-conditioned reconstruction (CCAD eq. 12-14, DDAD defaults)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    strategy: str = "ddad"
    start_step: int = 250
    steps: int = 10
    guidance: float = 2.0
    eta: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.start_step < self.num_train_timesteps:
            raise ConfigError(
                f"diffusion.start_step must be in 1..{self.num_train_timesteps - 1}, got {self.start_step}"
            )
        if not 1 <= self.steps <= self.start_step:
            raise ConfigError(f"diffusion.steps must be in 1..start_step, got {self.steps}")


@dataclass
class ScoringConfig:
    """Anomaly map (CCAD eq. 16 / DDAD): feature cosine + optional pixel term, Gaussian sigma.

    ``score_layers`` are the scoring backbone's layers; ``pixel_weight`` is DDAD's v;
    ``score`` is ``max`` or ``topk`` (mean of the ``topk_ratio`` highest map values).
    ``calibration`` is ``fpr`` (threshold = the (1 - target_fpr) quantile of held-out good
    scores) or ``sigma`` (good mean + ``sigma_k`` standard deviations).
    """

    backbone: Optional[str] = None  # None: the bank's backbone
    score_layers: tuple[int, ...] = (1, 2, 3)
    pixel_weight: float = 0.0
    sigma: float = 4.0
    score: str = "max"
    topk_ratio: float = 0.01
    calibration: str = "fpr"
    target_fpr: float = 0.01
    sigma_k: float = 3.0

    def validate(self) -> None:
        if self.score not in ("max", "topk"):
            raise ConfigError(f"scoring.score must be 'max' or 'topk', got {self.score!r}")
        if self.calibration not in ("fpr", "sigma"):
            raise ConfigError(f"scoring.calibration must be 'fpr' or 'sigma', got {self.calibration!r}")


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector: features + denoiser + reconstruction + scorer."""

    variant: str = "patchcore"
    image_size: int = 256
    bank: BankConfig = field(default_factory=BankConfig)
    patchcore: Optional[PatchCoreConfig] = None
    denoiser: Optional[dict[str, Any]] = None  # a ccad.models.DenoiserConfig as a dict
    diffusion: Optional[DiffusionConfig] = None
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    train: Optional[dict[str, Any]] = None  # a ccad.training.TrainConfig as a dict
    version: int = CONFIG_VERSION

    def validate(self) -> "DetectorConfig":
        if not 16 <= int(self.image_size) <= 2048:
            raise ConfigError(f"image_size must be in 16..2048, got {self.image_size}")
        self.bank.validate()
        self.scoring.validate()
        if self.patchcore is not None:
            self.patchcore.validate()
        if self.diffusion is not None:
            self.diffusion.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectorConfig":
        data = dict(data)
        version = data.get("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {version} is newer than this ccad understands ({CONFIG_VERSION}); upgrade ccad"
            )
        sub = {"bank": BankConfig, "patchcore": PatchCoreConfig, "diffusion": DiffusionConfig,
               "scoring": ScoringConfig}
        for key, klass in sub.items():
            if data.get(key) is not None:
                data[key] = _from_dict(klass, data[key], key)
        return _from_dict(cls, data, "config").validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "DetectorConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
