"""Plain configuration dataclasses with a JSON round trip.

A detector's configuration is one :class:`DetectorConfig` saved as ``config.json`` beside its
safetensors weights (the diffusers convention). Every field is a plain value so the file is
readable and editable by hand; unknown keys are rejected with a message naming the field.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

T = TypeVar("T")

CONFIG_VERSION = 2


class ConfigError(ValueError):
    """A configuration file or field is invalid; the message names the field."""


def at_least(cfg: Any, minimum: int, *names: str, section: str = "method", optional: bool = False) -> None:
    """Each field ``names`` of ``cfg`` is >= ``minimum`` (``optional``: or None), else a
    :class:`ConfigError` naming ``section.field`` and its value."""
    for name in names:
        value = getattr(cfg, name)
        if optional and value is None:
            continue
        if float(value) < minimum:
            raise ConfigError(f"{section}.{name} must be >= {minimum}{' or null' if optional else ''}, got {value}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn a JSON value into the annotated field type (nested dataclasses, Optional, tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (sys.version_info >= (3, 10) and isinstance(tp, types.UnionType)):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return config_from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    return _check_scalar(tp, value, where)


_SCALAR_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_scalar(tp: Any, value: Any, where: str) -> Any:
    """Type-check a JSON scalar against an ``int``/``float``/``bool``/``str`` annotation.

    JSON ints are accepted for float fields and integral floats (``200.0``) for int fields;
    anything else is a :class:`ConfigError` naming the field, e.g.
    ``config.image_size: expected an integer, got 'big'``.
    """
    if tp not in _SCALAR_NAMES:
        return value
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: expected {_SCALAR_NAMES[tp]}, got {value!r}")
    return value


def _field_where(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def config_from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build the dataclass ``cls`` from a plain dict; unknown keys are an error naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected an object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown field(s) {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(hints.get(key, Any), value, _field_where(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)  # type: ignore[call-arg]
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where + ': ' if where else ''}{exc}") from exc


def _parse_value(tp: Any, text: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (sys.version_info >= (3, 10) and isinstance(tp, types.UnionType)):
        if text.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(inner[0], text, where) if len(inner) == 1 else text
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            number = float(text)
            if math.isfinite(number):
                return number
        if origin is tuple:
            inner = args[0] if args else str
            return tuple(_parse_value(inner, v, where) for v in text.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"{where}: cannot read {text!r} as {getattr(tp, '__name__', tp)}") from None
    if tp is float:  # nan / inf: no setting of ccad means "not a number"
        raise ConfigError(f"{where}: expected a finite number, got {text!r}")
    return text


def set_option(cfg: Any, key: str, value: Any, where: str = "option") -> None:
    """Set a (dotted) field of a config dataclass, parsing strings by the field's type.

    ``set_option(cfg, "diffusion.start_step", "200")``; an unknown field is a
    :class:`ConfigError` that lists the known ones.
    """
    obj = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{where} {key!r}: {'.'.join(parts[:i])} is not a section")
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise ConfigError(f"{where} {key!r}: unknown field {part!r}; known: {', '.join(names)}")
        if i == len(parts) - 1:
            tp = typing.get_type_hints(type(obj)).get(part, Any)
            if isinstance(value, str):
                value = _parse_value(tp, value, f"{where} {key}")
            setattr(obj, part, value)
        else:
            obj = getattr(obj, part)


def check_finite_fields(cfg: Any, where: str = "") -> None:
    """Refuse a NaN or infinite number anywhere in a config dataclass (nested sections included),
    naming the dotted field: every float setting of ccad is a finite number."""
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = _field_where(where, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if dataclasses.is_dataclass(v):
                check_finite_fields(v, name)
            elif isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}: expected a finite number, got {v}")


def option_help(cls: type, prefix: str = "") -> list[str]:
    """``name=default`` for every (nested) field of a config dataclass (for ``--help``)."""
    out = []
    inst = cls()
    for f in dataclasses.fields(cls):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            out.extend(option_help(type(v), f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}={v}")
    return out


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
        if self.strategy != "ddad":
            raise ConfigError(f"diffusion.strategy: only 'ddad' (CCAD eq. 12-14) is implemented, got {self.strategy!r}")
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
    ``score`` is ``max`` or ``topk`` (mean of the ``topk_ratio`` highest map values, or of the
    ``topk_count`` highest when that is set: a fixed count, e.g. GLAD's 250).
    ``calibration`` is the operating-point policy: ``fpr`` (threshold = the (1 - target_fpr)
    quantile of held-out good scores; ``target_fpr`` 0.05 by default, chosen by measurement, issue
    21 item 1: on MTD quick PatchCore's 1 % target, the largest of 76 held-out good scores, caught
    234 of 392 test defects with no false alarm in 190 good images, 5 % caught 340 with 9;
    ``python -m benchmarks operating_points``), ``sigma`` (good mean + ``sigma_k`` standard deviations) or
    ``miss`` (the highest threshold whose ESTIMATED miss rate on synthetic anomalies pasted into the
    held-out good images stays at or below ``target_miss``: a proxy, no real defect is seen).
    ``miss_estimate``: also score synthetic-anomaly copies of the threshold images, so every
    calibration reports its estimated miss rate beside its false-alarm rate.

    The held-out good images are split in two (:func:`ccad.pipeline.split_held_out`): a
    *selection* part (``selection_fraction`` of them, stratified by category) on which settings are
    chosen (feat-diff's search, GLAD's delta, D3AD's map normalisation, the fusion's weight and
    normalisation) and a *threshold* part the threshold is set on, so the false-alarm rate it
    promises is measured on images nothing was tuned on. The split happens only when something is
    chosen; it is refused with fewer than ``min_selection_images`` / ``min_threshold_images``.

    ``fusion = "bank"`` combines the method's map with a PatchCore nearest-neighbour map, each
    normalised by its distribution on the held-out good images (:mod:`ccad.scoring.fusion`):
    ``fusion_weight`` is the method map's share (``fusion_weight_fit = "synthetic"``, the default: chosen on
    synthetic anomalies pasted into the held-out good images, together with ``fusion_norm``:
    ``std`` = mean / standard deviation, ``quantile`` = median / 99.9th percentile of the good
    pixels), the memory holds ``fusion_ratio`` of the training
    patches at ``fusion_image_size`` px. ``feature_match`` is how the feature-cosine map of
    reconstruction methods pairs input and reconstruction features (:func:`feature_cosine_map`):
    ``same`` location (CCAD eq. 16), the best match in a ``(2 match_radius + 1)^2``
    ``neighbourhood``, or ``all`` locations (GLAD eq. 11-12); None: the method's own pairing.
    """

    backbone: Optional[str] = None  # None: the bank's backbone
    score_layers: tuple[int, ...] = (1, 2, 3)
    pixel_weight: float = 0.0
    sigma: float = 4.0
    score: str = "max"
    topk_ratio: float = 0.01
    topk_count: Optional[int] = None
    calibration: str = "fpr"
    target_fpr: float = 0.05
    sigma_k: float = 3.0
    target_miss: float = 0.05
    miss_estimate: bool = True
    selection_fraction: float = 0.5
    min_selection_images: int = 1
    min_threshold_images: int = 1
    fusion: str = "none"
    fusion_weight: float = 0.5
    fusion_weight_fit: str = "synthetic"
    fusion_norm: str = "std"
    fusion_image_size: int = 256
    fusion_ratio: float = 0.01
    feature_match: Optional[str] = None  # None: the method's own (GLAD: all; others: same)
    match_radius: int = 1

    def validate(self) -> None:
        if self.fusion not in ("none", "bank"):
            raise ConfigError(f"scoring.fusion must be 'none' or 'bank', got {self.fusion!r}")
        if self.fusion_weight_fit not in ("fixed", "synthetic"):
            raise ConfigError(f"scoring.fusion_weight_fit must be 'fixed' or 'synthetic', "
                              f"got {self.fusion_weight_fit!r}")
        if self.fusion_norm not in ("std", "quantile"):
            raise ConfigError(f"scoring.fusion_norm must be 'std' or 'quantile', got {self.fusion_norm!r}")
        if not 0.0 <= float(self.fusion_weight) <= 1.0:
            raise ConfigError(f"scoring.fusion_weight must be in [0, 1], got {self.fusion_weight}")
        if not 16 <= int(self.fusion_image_size) <= 2048:
            raise ConfigError(f"scoring.fusion_image_size must be in 16..2048, got {self.fusion_image_size}")
        if not 0.0 < float(self.fusion_ratio) <= 1.0:
            raise ConfigError(f"scoring.fusion_ratio must be in (0, 1], got {self.fusion_ratio}")
        if self.feature_match not in (None, "same", "neighbourhood", "all"):
            raise ConfigError(f"scoring.feature_match must be 'same', 'neighbourhood' or 'all', "
                              f"got {self.feature_match!r}")
        at_least(self, 1, "match_radius", section="scoring")
        if self.score not in ("max", "topk"):
            raise ConfigError(f"scoring.score must be 'max' or 'topk', got {self.score!r}")
        at_least(self, 1, "topk_count", section="scoring", optional=True)
        if self.calibration not in ("fpr", "sigma", "miss"):
            raise ConfigError(f"scoring.calibration must be 'fpr', 'sigma' or 'miss', got {self.calibration!r}")
        if not 0.0 <= float(self.target_fpr) < 1.0:
            raise ConfigError(f"scoring.target_fpr must be in [0, 1), got {self.target_fpr}")
        if not 0.0 <= float(self.target_miss) < 1.0:
            raise ConfigError(f"scoring.target_miss must be in [0, 1), got {self.target_miss}")
        if not 0.0 < float(self.selection_fraction) < 1.0:
            raise ConfigError(f"scoring.selection_fraction (the share of the held-out good images that choose "
                              f"settings; the rest set the threshold) must be in (0, 1), got {self.selection_fraction}")
        at_least(self, 1, "min_selection_images", "min_threshold_images", section="scoring")


# Training (the ``train`` section of a detector's config; the loop is ccad.training)
_MP_CHOICES = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Training hyper-parameters (DDAD/CCAD(V) defaults: lr 3e-4, batch 32, Table 19).

    ``mixed_precision``: ``auto`` = bf16 (or fp16 without bf16 support) on CUDA, ``no`` on CPU.
    ``checkpoint_every``: steps between checkpoints (0 = only at the end / on stop).
    ``preview_every``: steps between EMA reconstructions of one training image (0 = never;
    the method's own preview settings apply).
    ``show_progress``: the tqdm bar (loss, lr, ETA) on the main process.
    ``ema_decay`` is warmed up by diffusers' ``EMAModel`` as ``min(ema_decay, (1 + n) / (10 + n))``
    (n = updates so far) so short runs still give a usable EMA model.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    hflip: bool = False
    num_workers: int = 0
    preview_every: int = 0
    show_progress: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name} {rule}, got {getattr(self, name)!r}")

        need(int(self.steps) >= 1, "steps", "must be >= 1")
        need(int(self.batch_size) >= 1, "batch_size", "must be >= 1")
        need(float(self.lr) > 0, "lr", "must be > 0")
        need(float(self.weight_decay) >= 0, "weight_decay", "must be >= 0")
        need(int(self.warmup_steps) >= 0, "warmup_steps", "must be >= 0")
        need(0.0 <= float(self.ema_decay) < 1.0, "ema_decay", "must be in [0, 1)")
        need(float(self.grad_clip) >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        need(self.mixed_precision in _MP_CHOICES, "mixed_precision", f"must be one of {_MP_CHOICES}")
        need(int(self.checkpoint_every) >= 0, "checkpoint_every", "must be >= 0")
        need(int(self.keep_checkpoints) >= 1, "keep_checkpoints", "must be >= 1")
        need(int(self.num_workers) >= 0, "num_workers", "must be >= 0")
        need(int(self.preview_every) >= 0, "preview_every", "must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)
