"""The method seam: what a detection method owns, and the registry every layer reads.

A method (PatchCore, CCAD(V), CCAD(C), ...) is one class in one module of ``ccad.methods`` that
registers itself with :func:`register_method`. It owns:

- its typed config section (``Config``: a dataclass; it is ``config.json``'s ``"method"``);
- how it builds its modules from the bank and the data (:meth:`Method.build_bank`,
  :meth:`Method.build`);
- its training objective (:meth:`Method.training_loss`, the function the Trainer calls per batch)
  and its training data (:meth:`Method.training_dataset`);
- its inference (:meth:`Method.maps`: anomaly maps and reconstructions for a batch);
- the files it saves (:meth:`Method.save` / :meth:`Method.load`; networks are diffusers
  ``ModelMixin, ConfigMixin`` saved into one subfolder each, like ``DiffusionPipeline``).

The detector (:class:`ccad.pipeline.AnomalyDetector`), the Trainer, the CLI and the app ask the
registry and call these hooks; they never compare method names.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import BankConfig, ConfigError, ScoringConfig, config_from_dict
from ..models.presets import PRESET_NAMES

ProgressFn = Optional[Callable[[int, int], None]]
ABLATION_VIEW = "ablation"  # the view name of a method's ablation (evaluate --views, the benchmarks, the card)
CancelFn = Optional[Callable[[], bool]]


class UnknownVariant(KeyError):
    """A method name that is not registered (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def check_preset(preset: str) -> None:
    """The network presets every trained method offers: tiny (tests), small (CPU), base (GPU)
    (the rows of :data:`ccad.models.presets.UNET_PRESETS`)."""
    if preset not in PRESET_NAMES:
        raise ConfigError(f"method.preset must be tiny, small or base, got {preset!r}")


@dataclass
class Context:
    """What a method sees of the detector around it: size, device, bank, scoring settings.

    ``run_dir`` is the training run folder (caches and checkpoints go there); ``progress`` and
    ``cancel`` report and stop long steps (bank builds, latent caching). ``held_out``: the
    *selection* part of the good images held out of training while a detector is being built,
    for settings a method fits on good images it was not trained on (the threshold is set on the
    other part, :func:`ccad.pipeline.split_held_out`; empty once loaded).
    """

    image_size: int
    device: torch.device
    bank_config: BankConfig = field(default_factory=BankConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    bank: Any = None
    run_dir: Optional[Path] = None
    progress: ProgressFn = None
    cancel: CancelFn = None
    seed: int = 0
    held_out: list = field(default_factory=list, repr=False)
    _score_backbone: Any = field(default=None, repr=False)

    def scoring_backbone(self) -> Any:
        """The frozen ImageNet extractor psi of the feature-cosine map (CCAD eq. 16), built once."""
        if self._score_backbone is None:
            from ..features import get_backbone

            sc, bc = self.scoring, self.bank_config
            name = sc.backbone or bc.backbone
            weights = bc.weights if name == bc.backbone else None
            self._score_backbone = get_backbone(name, layers=tuple(sc.score_layers), weights=weights).to(self.device)
        return self._score_backbone

    def bank_tensor(self) -> torch.Tensor:
        if self.bank is None:
            raise ConfigError("this method needs a feature bank, and none was built or given")
        return self.bank.features.to(self.device)


@dataclass
class MethodOutput:
    """Anomaly maps ``B x 1 x S x S`` (higher = more anomalous) and, for reconstruction methods,
    the reconstructions ``B x 3 x S x S`` in [0, 1].

    Everything one call decided is returned here, never stored on the method: :meth:`Method.maps`
    runs from several threads at once (the app), so it must not write shared state."""

    maps: torch.Tensor
    reconstruction: Optional[torch.Tensor] = None
    # per-image domain distance ``B`` (ccad.scoring.domain.patch_median of the method's own
    # nearest-neighbour patch distances), for methods that compute them anyway (PatchCore)
    domain: Optional[torch.Tensor] = None
    # per-image step the reconstruction started from (``B`` long), for methods that choose it per
    # image: D3AD's / the dynamic policy's T_hat (Algorithm 2), GLAD's adaptive step
    start_steps: Optional[torch.Tensor] = None
    # a method's own per-call record (e.g. GLAD's :class:`ccad.diffusion.glad.GLADTrace`)
    trace: Any = None


class Method:
    """Base class of a detection method plug-in (see the module docstring).

    Subclasses set the class attributes and override the hooks they need. ``components`` maps a
    module name to its class (a diffusers ``ModelMixin``); :meth:`save` writes each into
    ``<folder>/<name>/`` with ``save_pretrained`` and :meth:`load` reads it back with
    ``from_pretrained``, so every network is loadable alone.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line, shown by ``ccad train --help`` and in the app
    paper: ClassVar[str] = ""
    space: ClassVar[str] = "pixel"  # "feature", "pixel" or "latent"
    Config: ClassVar[type] = type(None)
    trainable: ClassVar[bool] = True  # False: fit only (no Trainer), e.g. PatchCore
    uses_bank: ClassVar[bool] = True  # the backbone Coarse Feature Bank is built before build()
    multi_class: ClassVar[bool] = False  # one model may cover several categories
    components: ClassVar[dict[str, type]] = {}
    default_image_size: ClassVar[int] = 256
    # what the app / train_detector's ``phase`` say while build() and training_dataset() run
    build_phase: ClassVar[str] = "building the model"
    training_data_phase: ClassVar[str] = "reading the training images"
    # The ablation view (DESIGN.md "Every claim carries its ablation"): one line naming the trivial
    # replacement of the method's learned part (e.g. "identity denoiser"), or None (no ablation
    # view). A method that names one checks ``self.ablate`` at the top of its inference and
    # computes the ablated map from the same saved model while it is True (:meth:`ablation_maps`).
    ablation: ClassVar[Optional[str]] = None
    # the resize modes (ccad.data.framing) this method can be built and scored with; the mechanism is
    # generic (the data layer frames every image it reads), so every mode unless a method says why not
    resize_modes: ClassVar[tuple[str, ...]] = ("square", "keep-aspect", "tile")
    resize_refusal: ClassVar[str] = ""  # why a mode is missing from resize_modes (shown when refused)

    def __init__(self, config: Any, ctx: Context) -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name}: config must be a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.ctx = ctx
        self.modules: nn.ModuleDict = nn.ModuleDict()

    # ---- configuration ----------------------------------------------------------------------
    @classmethod
    def default_config(cls, preset: Optional[str] = None) -> Any:
        """The method's default config section; ``preset`` sets a ``preset`` field when it has one."""
        cfg = cls.Config()
        if preset is not None:
            if not any(f.name == "preset" for f in dataclasses.fields(cfg)):
                raise ConfigError(f"{cls.name} has no presets")
            cfg.preset = preset
        return cfg

    @classmethod
    def migrate_v1(cls, old: dict[str, Any]) -> Optional[dict[str, Any]]:
        """This method's config section from a version-1 ``config.json`` (whose parts were the
        top-level ``patchcore`` / ``denoiser`` / ``diffusion`` fields); None = the defaults."""
        return None

    @classmethod
    def default_scoring(cls) -> ScoringConfig:
        """The image-score / calibration / map settings this method is scored with by default."""
        return ScoringConfig()

    @classmethod
    def config_from_dict(cls, data: dict[str, Any]) -> Any:
        return config_from_dict(cls.Config, data, "method")

    @classmethod
    def validate_config(cls, config: Any) -> None:
        """Check the config section (raise :class:`ConfigError` naming the field)."""
        check = getattr(config, "validate", None)
        if check is not None:
            check()

    # ---- building ---------------------------------------------------------------------------
    def build_bank(self, train: Sequence[Any]) -> Any:
        """The Coarse Feature Bank from good training samples (CCAD eq. 4-6), or None.

        Default: the greedy k-center coreset of the bank backbone's patch features when
        ``uses_bank``; methods with their own bank (PatchCore's memory, CCAD(F)'s latent bank)
        override this.
        """
        if not self.uses_bank:
            return None
        from ..features import FeatureBank, get_backbone

        bc = self.ctx.bank_config
        bb = get_backbone(bc.backbone, layers=tuple(bc.layers), weights=bc.weights).to(self.ctx.device)
        return FeatureBank.build(list(train), bb, size=bc.size, image_size=self.ctx.image_size,
                                 batch_size=bc.batch_size, progress=self.ctx.progress, cancel=self.ctx.cancel,
                                 seed=self.ctx.seed)

    def build(self, train: Sequence[Any]) -> None:
        """Create the method's modules (fresh or pretrained init) once the bank exists.

        Non-trainable methods fit here. Any config value that depends on the data (e.g. the
        bank's width) is written back into ``self.config`` so the saved config rebuilds it.
        """

    # ---- training ---------------------------------------------------------------------------
    def training_dataset(self, train: Sequence[Any]) -> torch.utils.data.Dataset:
        """The dataset the Trainer iterates (default: images ``3 x S x S`` in [0, 1] as ``"image"``)."""
        from ..data.dataset import ImageDataset

        return ImageDataset(list(train), self.ctx.image_size, on_error="skip")

    def trainable_modules(self) -> nn.ModuleDict:
        """The modules the Trainer optimises (EMA-tracked and checkpointed); frozen parts stay out."""
        return nn.ModuleDict({k: m for k, m in self.modules.items()
                              if any(p.requires_grad for p in m.parameters())})

    def training_loss(self, modules: nn.ModuleDict, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The loss of one batch (a 0-d fp32 tensor). ``modules`` are the (wrapped) trainable
        modules; every random draw must come from ``generator`` (a pure function of seed and step)."""
        raise NotImplementedError(f"{self.name} is not trainable")

    def preview(self, modules: nn.ModuleDict, image: torch.Tensor) -> Optional[np.ndarray]:
        """A reconstruction of one training image (``1 x 3 x S x S``) for the live preview, or None."""
        return None

    def use_trained(self, modules: nn.ModuleDict) -> None:
        """Install trained (EMA) weights into this method's modules."""
        for name, m in modules.items():
            self.modules[name].load_state_dict(m.state_dict())

    def after_training_phase(self) -> Optional[str]:
        """What :meth:`after_training` does, with its counts, for the phase line (``ccad train``, the
        app's job status); None when it does nothing. Methods that override ``after_training``
        override this too, so no stretch of a run is silent (issue 24 item 1)."""
        epochs = int(getattr(self.config, "domain_adapt_epochs", 0) or 0)
        if epochs > 0:
            n = int(getattr(self.config, "domain_adapt_images", 32))
            return f"adapting the scoring extractor to the domain ({epochs} epoch(s) on up to {n} good images)"
        return None

    def after_training(self, train: Sequence[Any]) -> None:
        """Called by the pipeline once the trained weights are installed, before calibration.

        Default: nothing, unless the config has ``domain_adapt_epochs > 0``: then the scoring
        extractor is fine-tuned on (x, x_hat) pairs of good images (D3AD eq. 10, see
        :mod:`ccad.methods.adaptation`) and saved / loaded with the detector.
        """
        epochs = int(getattr(self.config, "domain_adapt_epochs", 0) or 0)
        if epochs > 0:
            from .adaptation import adapt_scoring_backbone

            c = self.config
            adapt_scoring_backbone(self, train, epochs, n_images=int(getattr(c, "domain_adapt_images", 32)),
                                   lr=float(getattr(c, "domain_adapt_lr", 1e-4)))

    # ---- inference --------------------------------------------------------------------------
    def maps(self, x: torch.Tensor) -> MethodOutput:
        """Anomaly maps (and reconstructions) for a batch ``B x 3 x S x S`` in [0, 1] at the model size."""
        raise NotImplementedError

    @property
    def ablate(self) -> bool:
        """True inside :meth:`ablated` (in this thread only: a prediction served from another thread
        at the same time keeps the model's own map)."""
        local = self.__dict__.get("_ablation_local")
        return bool(getattr(local, "on", False)) if local is not None else False

    @contextmanager
    def ablated(self) -> Iterator["Method"]:
        """While inside, :meth:`maps` gives the ablation view (the learned part replaced by the
        trivial one named by :attr:`ablation`); restored on exit, errors included."""
        import threading

        if self.ablation is None:
            raise ValueError(f"{self.name} declares no ablation view (its class attribute `ablation` is None)")
        local = self.__dict__.setdefault("_ablation_local", threading.local())
        before = getattr(local, "on", False)
        local.on = True
        try:
            yield self
        finally:
            local.on = before

    def ablation_maps(self, x: torch.Tensor) -> MethodOutput:
        """:meth:`maps` of the ablation view for a batch (same weights, learned part bypassed)."""
        with self.ablated():
            return self.maps(x)

    def maps_and_ablation(self, x: torch.Tensor) -> tuple[MethodOutput, MethodOutput]:
        """``(maps(x), ablation_maps(x))`` of one batch. Default: two calls; a method whose two views
        share work (feat-diff: the backbone features and the nearest memory rows) overrides this."""
        return self.maps(x), self.ablation_maps(x)

    def to(self, device: torch.device) -> "Method":
        self.modules.to(device).eval()
        return self

    def selects_on_held_out(self) -> list[str]:
        """What this method chooses on held-out good images after training (``ctx.held_out``, the
        selection part of the held-out slice), in words; [] when nothing (then the whole held-out
        slice sets the threshold)."""
        return []

    def card(self) -> dict[str, Any]:
        """Facts for the model card and the app (parameters, reconstruction settings ...)."""
        n = sum(p.numel() for p in self.modules.parameters())
        facts: dict[str, Any] = {"parameters": int(n) if n else None}
        if getattr(self, "adapted", None):
            facts["domain_adaptation"] = dict(self.adapted)
        return facts

    # ---- persistence ------------------------------------------------------------------------
    def component_classes(self) -> dict[str, type]:
        """The saved networks of this instance (default: the class's ``components``; a method whose
        parts depend on its config, e.g. an optional ControlNet, overrides this)."""
        return dict(self.components)

    def save(self, directory: Path) -> None:
        """Write every component into ``directory/<name>/`` (diffusers ``save_pretrained``)."""
        for name in self.component_classes():
            self.modules[name].save_pretrained(str(Path(directory) / name), safe_serialization=True)
        from .adaptation import save_adapted

        save_adapted(self, Path(directory))

    @classmethod
    def load(cls, directory: Path, config: Any, ctx: Context) -> "Method":
        """Rebuild from :meth:`save`'s folder; a missing component is a clear ``FileNotFoundError``."""
        method = cls(config, ctx)
        for name, klass in method.component_classes().items():
            sub = saved_part(directory, name, f"its {name} network ({cls.name})", folder=True)
            method.modules[name] = klass.from_pretrained(str(sub))
        from .adaptation import load_adapted

        load_adapted(method, Path(directory))
        return method


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

def saved_part(directory: str | Path, name: str, holds: str, folder: bool = False) -> Path:
    """``directory/name`` of a saved detector, or a ``FileNotFoundError`` naming the missing file
    (or subfolder) and what it ``holds``, e.g. "its memory bank"."""
    p = Path(directory) / name
    if not (p.is_dir() if folder else p.is_file()):
        kind = "subfolder" if folder else "file"
        raise FileNotFoundError(f"{p}: missing; a saved detector keeps {holds} in the {kind} {name}")
    return p


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by ``cls.name`` to the API, the CLI and the app."""
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__}: a method needs a non-empty `name`")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass, got {cls.Config!r}")
    _METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def _load_builtin() -> Any:
    from . import _builtin  # (imports every built-in method module)

    return _builtin


def method_names() -> list[str]:
    """Names of the available methods: the built-in ones in the order ``_builtin`` imports their
    modules (the baseline first, whichever module was imported first), then plug-ins in
    registration order. A built-in method is its module plus one import line in ``_builtin``."""
    import types

    modules = [m.__name__ for m in vars(_load_builtin()).values() if isinstance(m, types.ModuleType)]
    rank = {name: i for i, name in enumerate(modules)}
    order = {n: i for i, n in enumerate(_METHODS)}
    return sorted(_METHODS, key=lambda n: (rank.get(_METHODS[n].__module__, len(rank)), order[n]))


def get_method(name: str) -> type[Method]:
    _load_builtin()
    if name in _METHODS:
        return _METHODS[name]
    raise UnknownVariant(f"unknown variant {name!r}; available: {', '.join(method_names())}")


def describe_methods() -> list[tuple[str, str]]:
    """``(name, one-line description)`` for every available method (for ``--help`` and the app)."""
    return [(n, f"{m.title}: {m.description}" if m.description else m.title) for n, m in
            ((n, get_method(n)) for n in method_names())]

