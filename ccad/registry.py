"""The variant registry: published variant names -> default :class:`DetectorConfig`.

The CLI, the app and ``from_pretrained`` all read this table. A detector is
features + denoiser + reconstruction strategy + scorer; a variant fixes each part's default.
Variants whose engine parts have not landed yet are listed with ``available=False`` so the
UI can show them greyed out and the CLI can say exactly why they cannot be used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import BankConfig, DetectorConfig, DiffusionConfig, PatchCoreConfig, ScoringConfig


class UnknownVariant(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    paper: str
    space: str  # "feature", "pixel" or "latent"
    available: bool
    defaults: Callable[..., DetectorConfig]
    note: str = ""


def _patchcore(image_size: int = 256, **_: object) -> DetectorConfig:
    return DetectorConfig(
        variant="patchcore", image_size=image_size, bank=BankConfig(), patchcore=PatchCoreConfig(),
        scoring=ScoringConfig(sigma=4.0, score="max"),
    )


def _ccad_v(image_size: int = 256, **_: object) -> DetectorConfig:
    # The denoiser's config is filled in by training: its bank_dim is the built bank's width.
    return DetectorConfig(
        variant="ccad-v", image_size=image_size, bank=BankConfig(), patchcore=None, denoiser=None,
        diffusion=DiffusionConfig(), scoring=ScoringConfig(score_layers=(1, 2, 3), pixel_weight=0.0),
    )


def _planned(name: str) -> Callable[..., DetectorConfig]:
    def make(**_: object) -> DetectorConfig:
        raise UnknownVariant(
            f"variant {name!r} is planned but not implemented in this ccad version; "
            f"available: {', '.join(available_variants())}"
        )

    return make


VARIANTS: dict[str, Variant] = {
    "patchcore": Variant("patchcore", "PatchCore (baseline, bank only)", "Roth et al. 2022", "feature",
                         True, _patchcore, "nearest-neighbour distance to a 1 % coreset memory bank"),
    "ccad-v": Variant("ccad-v", "CCAD(V): pixel-space, coarse bank", "CCAD sec. 3.3, Fig. 3a", "pixel",
                      True, _ccad_v, "DDAD-guided reconstruction conditioned on the coarse feature bank"),
    "ccad-c": Variant("ccad-c", "CCAD(C): latent-space, coarse bank", "CCAD sec. 3.3, Fig. 3b", "latent",
                      False, _planned("ccad-c")),
    "ccad-f": Variant("ccad-f", "CCAD(F): latent-space, FCM-refined bank", "CCAD eq. 7-8", "latent",
                      False, _planned("ccad-f")),
    "d3ad": Variant("d3ad", "D3AD: dynamic implicit conditioning", "D3AD sec. 4", "latent",
                    False, _planned("d3ad")),
    "deco-diff": Variant("deco-diff", "DeCo-Diff: deviation correction", "DeCo-Diff sec. 4", "latent",
                         False, _planned("deco-diff")),
    "glad": Variant("glad", "GLAD: global and local adaptive diffusion", "GLAD sec. 3", "pixel",
                    False, _planned("glad")),
}


def available_variants() -> list[str]:
    return [name for name, v in VARIANTS.items() if v.available]


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownVariant(
            f"unknown variant {name!r}; known: {', '.join(VARIANTS)}"
        ) from None


def default_config(name: str, **kwargs: object) -> DetectorConfig:
    """The default configuration of a variant (keyword arguments: image_size, preset)."""
    return get_variant(name).defaults(**kwargs).validate()
