"""The whole detector's config: a method's name and its typed section (``ccad.methods``) with the
shared bank / scoring / training sections (:mod:`ccad.config`).

It sits above the methods (it looks a method's ``Config`` up in the registry), the sections it
composes sit below them: ``ccad.config`` never imports ``ccad.methods``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import (CONFIG_VERSION, BankConfig, ConfigError, ScoringConfig, TrainConfig, check_finite_fields,
                     config_from_dict)
from .data.framing import check_resize
from .methods import UnknownVariant, get_method


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector: the method's name and its typed config section,
    the shared bank and scoring settings, and the training settings it was trained with.

    ``method`` is the method's own ``Config`` dataclass (``ccad.methods``); ``train`` a
    :class:`ccad.training.TrainConfig` for trained methods. Version 1 files (``patchcore`` /
    ``denoiser`` / ``diffusion`` sections) are migrated on load.

    ``resize`` is how an image of any shape becomes the model's square input
    (:mod:`ccad.data.framing`): ``square`` (resized to ``S x S``, its aspect ratio changed; the
    default, and what a config without the field means), ``keep-aspect`` (resized without
    distortion, padded to ``S x S`` with its mean colour; the padding is cropped off the map and never scored)
    or ``tile`` (overlapping ``S x S`` tiles at native resolution, ``tile_stride`` pixels apart,
    default ``S // 2``; maps stitched by averaging overlaps). The model is built from its good
    images the same way, and every scorer of the saved model (predict, evaluate, the app, serve)
    reads it from here. ``S`` is :attr:`input_side`.
    """

    variant: str = "patchcore"
    image_size: int = 256
    bank: BankConfig = field(default_factory=BankConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    method: Any = None
    train: Any = None
    resize: str = "square"
    tile_stride: Optional[int] = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = get_method(self.variant).default_config()

    @property
    def input_side(self) -> int:
        """The square side images are framed at: ``image_size``, or the fusion memory's size when
        it fuses at a larger one (the detector's ``input_size``)."""
        if self.scoring.fusion == "bank":
            return max(int(self.image_size), int(self.scoring.fusion_image_size))
        return int(self.image_size)

    def validate(self) -> "DetectorConfig":
        if not 16 <= int(self.image_size) <= 2048:
            raise ConfigError(f"image_size must be in 16..2048, got {self.image_size}")
        try:
            check_resize(self.resize, "resize")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.tile_stride is not None and not 1 <= int(self.tile_stride) <= self.input_side:
            raise ConfigError(f"tile_stride must be in 1..{self.input_side} (the tile side: the model's input size) "
                              f"or null (half the tile), got {self.tile_stride}")
        for name in ("bank", "scoring", "method", "train"):  # no NaN / inf setting anywhere
            check_finite_fields(getattr(self, name), name)
        self.bank.validate()
        self.scoring.validate()
        cls = get_method(self.variant)
        if not isinstance(self.method, cls.Config):
            raise ConfigError(f"method: a {self.variant} detector needs a {cls.Config.__name__}, "
                              f"got {type(self.method).__name__}")
        cls.validate_config(self.method)
        if self.resize not in cls.resize_modes:
            raise ConfigError(f"resize: the method {self.variant!r} cannot score with resize={self.resize!r} "
                              f"({cls.resize_refusal or 'not supported'}); it supports "
                              f"{', '.join(cls.resize_modes)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.train is not None and not isinstance(d["train"], dict):
            d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectorConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.get("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {version} is newer than this ccad understands ({CONFIG_VERSION}); upgrade ccad"
            )
        if version < 2:
            data = _migrate_v1(data)
        variant = data.get("variant", "patchcore")
        try:
            mcls = get_method(variant)
        except UnknownVariant as exc:
            raise ConfigError(f"variant: {exc}") from None
        for key, klass in {"bank": BankConfig, "scoring": ScoringConfig}.items():
            if data.get(key) is not None:
                data[key] = config_from_dict(klass, data[key], key)
        data["method"] = mcls.config_from_dict(data.get("method") or {})
        if data.get("train") is not None:
            data["train"] = config_from_dict(TrainConfig, data["train"], "train")
        return config_from_dict(cls, data, "").validate()

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


def _migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (one field per part: ``patchcore``, ``denoiser``, ``diffusion``) -> version 2."""
    data = dict(data)
    old = {k: data.pop(k, None) for k in ("patchcore", "denoiser", "diffusion")}
    try:
        data["method"] = get_method(data.get("variant", "patchcore")).migrate_v1(old)
    except UnknownVariant as exc:
        raise ConfigError(f"variant: {exc}") from None
    train = data.get("train")
    if isinstance(train, dict):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        data["train"] = {k: v for k, v in train.items() if k in known}
    data["version"] = CONFIG_VERSION
    return data
