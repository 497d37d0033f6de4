"""Feature-space diffusion (``feat-diff``): denoise the bank's own feature map, not pixels.

The frozen backbone the bank is built from (``bank.backbone`` / ``bank.layers``; by default
``tf_efficientnet_lite0`` layers 2 + 3, PatchCore-style 3x3 local averaging, a 32 x 32 grid of
C = 120 channels at 256 px: :class:`ccad.features.Backbone`) maps every image to ``f = phi(x)``.
The method diffuses ``f`` itself. Anchors:

- LafitE (Yin et al., arXiv 2307.08059: latent diffusion in a pretrained feature space, multi-class;
  "feature editing" of the diffusion input with a memory of normal features; hyper-parameters
  chosen on a pseudo-validation set of synthetic anomalies).
- DPDiff-AD (Feng et al., arXiv 2605.24402: diffusion reconstruction conditioned on prototypes of
  normal features through attention; its *local prototypes* are nearest-prototype aggregates).
- CCAD (papers/ccad.md sec. 3.3, Fig. 3b, eq. 11): the denoiser's cross-attention context is the
  Coarse Feature Bank B_c (the GCB of CCAD(C)/(V): LN + SelfAttn -> LN + CrossAttn(bank) -> LN + FF).

What is implemented (equation numbers are CCAD's / METHOD.md's notation unless named):

1. Features, cached once per run (:func:`ccad.data.latent_cache.build_latent_cache` with the
   backbone as the "encoder", :class:`FeatureEncoder`): ``z = (phi(x) - mu) * s`` with mu, s the
   mean and 1 / std of every cached value of the good training images (unit variance, as the
   latent methods' TAEF2 latents). Written to ``<run>/features`` as a float16 memmap; an epoch
   costs only the denoiser.
2. Coarse bank B_c (CCAD eq. 5-6): the greedy k-center coreset (PatchCore Alg. 1) of
   ``patches_per_image`` random cells of every cached map, selected by merge-and-reduce
   (:class:`ccad.features.coreset.StreamingCoreset`, the default "fast" projection) in one pass
   over the on-disk cache that also selects the edit memory (:func:`select_cells`): memory stays
   bounded however many images. The bank is stored in the backbone's raw units, like
   every other method's bank; the denoiser sees it standardised and projected (``BankProjector``).
3. Training (CCAD eq. 11 in feature space, DDPM eq. 2): ``z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``
   and ``|| eps - eps_theta(z_t, t; B_c) ||^2``; ``eps_theta`` is
   :class:`ccad.models.feat_denoiser.FeatDenoiser` (diffusers ``ResnetBlock2D`` +
   ``BasicTransformerBlock`` on the 32 x 32 grid, ``preset``) whose cross-attention context is the
   projected bank. The Trainer keeps a diffusers ``EMAModel``.
4. Feature editing (LafitE sec. 3, "feature editing"; our reading, as a convex step toward the
   memory): with ``m(z)`` the nearest row of the edit memory M (a k-center coreset of
   ``memory_size`` normal cells, DPDiff-AD's nearest local prototype),
   ``z_e = (1 - lambda) z + lambda m(z)`` per location, ``lambda = edit`` in [0, 1]. An anomalous
   cell is pulled toward normal before noising, so the denoiser cannot copy it back (the
   "identity shortcut" LafitE names); a normal cell moves little (its neighbour is close).
5. Reconstruction (DDIM, eq. 18, diffusers ``DDIMScheduler``, eta = 0, on the package's one
   sampler :func:`ccad.diffusion.sampling.partial_ddim`): noise ``z_e`` to ``t' = noise_level``
   with one fixed noise field (seeded, the same for every image, so a prediction never depends on
   the batch it is in), then ``steps`` DDIM steps of stride ``noise_level / steps``; ``z_hat`` is
   the last step's x0-prediction (the update to abar = 1).
6. Map: per location ``1 - cos(z, z_hat)`` (``distance = "cosine"``) or ``||z - z_hat||_2``
   (``"l2"``), bilinearly upsampled to the image and Gaussian-smoothed with ``scoring.sigma``
   (scaled to the size) exactly as the bank's PatchCore map; the image score is the map's max
   (``scoring.score``).
7. Hyper-parameters (LafitE's pseudo-validation set): after training, every ``(noise_level,
   steps)`` of ``search_noise x search_steps`` (pairs whose DDIM stride divides T) and every
   ``edit`` of ``search_edit`` is scored on up to ``search_images`` *held-out* good images (the
   calibration slice, never training images, never a test label) and on copies of them given
   synthetic anomalies (:mod:`ccad.data.anomaly_synth`, the fusion fit's recipe). The objective
   is the mean of image AUROC, pixel AUROC and pixel AUPRO; ties go to fewer UNet evaluations,
   then smaller noise. Only the values the user left unset (None) are searched: a value set in
   the config is the search grid's only value for that setting (the user's value wins). The
   chosen values are fitted state, saved as ``feat_diff_fitted.json`` in the model folder and
   never written back into the config (diffusers keeps a model's config as given); the card says
   which value came from where (``reconstruction.sources``) and holds the whole table (``search``).
   Unset values with the search off are the defaults (noise 100, 2 steps, edit 0.9).
   A model saved by an older ccad (the chosen values written into its config) still loads.
8. The identity arm (issue 23; DESIGN.md "Every claim carries its ablation"): the search also
   scores ``z_hat = z_e`` (the denoiser replaced by the identity; for ``l2`` the map is then
   ``lambda * ||z - m(z)||``, a nearest-neighbour distance to the edit memory) for every
   ``edit > 0`` of the edit grid. It costs no UNet evaluation, so it wins ties. When it wins,
   the fitted state says ``identity``: inference skips the denoiser (cost) and the card says the
   denoiser added nothing on the selection images (``identity = true`` in the config forces it).
   The same map is the method's ablation view (``ablation``, with ``edit`` 1 when the model's
   own edit is 0, where the identity would give a flat map).
9. Training levers (issue 23 item 2: can the denoiser beat its identity?), each a config option,
   defaults = items 1 and 3 unchanged: ``standardize = "channel"`` adds a per-channel step on top of
   item 1's global one, ``z_c = (z_c - m_c) * s_c`` with ``m_c`` / ``1 / s_c`` each channel's mean /
   std over the cached training features (so high-variance channels no longer dominate the L2 map
   and the loss); the bank, the memory, the context and every map use it. ``train_max_timestep``:
   t ~ U{0..t_max} in item 3 instead of U{0..T-1} (train only where the reconstruction runs; the
   config refuses a t_max below a noise level the search or the config may use).
   ``prediction_type``: ``epsilon`` (eq. 11), ``sample`` (x0-prediction, loss ``||z - f(z_t)||^2``) or
   ``v_prediction`` (Salimans & Ho 2022, ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z``); it is the
   DDPM / DDIM schedulers' ``prediction_type``, so item 5's DDIM step reads the output accordingly.

One model covers every category of its training data (multi-class, like the latent methods).
"""
from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, at_least
from ..models.feat_denoiser import FeatDenoiser
from ..models.latent_denoiser import BankProjector
from ..scoring.anomaly_map import gaussian_blur, image_score, scaled_sigma
from .base import Context, Method, MethodOutput, check_preset, register_method, saved_part

MEMORY_FILE = "feat_diff_memory.safetensors"
FITTED_FILE = "feat_diff_fitted.json"  # the search's chosen values (fitted state, not the user's config)
SEARCHED = ("noise_level", "steps", "edit")
DEFAULTS = {"noise_level": 100, "steps": 2, "edit": 0.9}  # an unset value when the search is off (or ran on nothing)
FEATURES_FOLDER = "features"
DISTANCES = ("cosine", "l2")
STANDARDIZE = ("global", "channel")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
def denoiser_share(search: Any) -> Optional[dict[str, Any]]:
    """What the trained denoiser added on the selection images, from the settings search's own
    grid (issue 23 item 2: the card states the measured share): the best trained arm's objective,
    the best identity arm's, their difference, and one sentence. ``None`` when the grid has no
    identity arm (a model saved before the identity arm existed)."""
    grid = (search or {}).get("grid") if isinstance(search, dict) else None
    if not grid:
        return None
    best = {kind: max((float(r["objective"]) for r in grid if r.get("denoiser") == kind), default=None)
            for kind in ("trained", "identity")}
    if best["identity"] is None or best["trained"] is None:
        return None
    margin = best["trained"] - best["identity"]
    if margin <= 0:
        says = "the identity (a nearest-neighbour distance) scored at least as well: the denoiser added nothing"
    elif margin < 0.005:
        says = (f"the trained denoiser beat the identity by {margin:.5f} on the search objective: within the "
                "noise of a few selection images; treat this map as a nearest-neighbour distance")
    else:
        says = f"the trained denoiser beat the identity by {margin:.4f} on the search objective"
    return {"objective_trained": round(best["trained"], 5), "objective_identity": round(best["identity"], 5),
            "margin": round(margin, 5),
            "note": f"on the selection images (held-out good + synthetic anomalies), {says}"}


IDENTITY_NOTE = ("this model's map is a nearest-neighbour distance; the denoiser added nothing on its selection "
                 "images")


@dataclass
class FeatDiffConfig:
    """Feature-space diffusion settings (see the module docstring for the equations).

    ``preset``: the denoiser size (tiny: tests, small: CPU, base: a GPU); ``num_train_timesteps`` /
    ``beta_schedule``: the DDPM table (linear 1e-4 ... 0.02, T = 1000); ``noise_level`` t' and
    ``steps``: the DDIM reconstruction (stride ``noise_level / steps`` must divide T); ``edit``:
    LafitE's editing strength lambda (each None = chosen by the search, or :data:`DEFAULTS` with
    the search off; a value set here is used as given, never replaced by the search);
    ``distance``: ``cosine`` or ``l2``; ``memory_size``: rows of
    the edit memory; ``patches_per_image``: random cells per image drawn for the bank / memory
    coresets (0 = all); ``search``: pick noise_level / steps / edit on synthetic anomalies of the
    held-out good slice after training, over ``search_noise`` x ``search_steps`` and
    ``search_edit``, with ``search_images`` good images; ``seed``: the fixed noise field;
    ``identity``: skip the denoiser (``z_hat = z_e``), set by the search when its identity arm wins.
    Training levers (issue 23 item 2; module docstring item 9): ``standardize``: ``global`` (one
    mean / std for every value) or ``channel`` (one per channel, on top of the global one);
    ``train_max_timestep``: draw training t from U{0..train_max_timestep} instead of U{0..T-1}
    (None = all; must cover every noise level the reconstruction may use); ``prediction_type``:
    what the denoiser predicts, ``epsilon``, ``sample`` (x0) or ``v_prediction`` (diffusers'
    scheduler ``prediction_type``; the loss target follows it).
    Filled in at build time: ``feature_channels``, ``feature_scale``, ``feature_shift``,
    ``feature_channel_shift`` / ``feature_channel_scale`` (``channel`` only), ``bank_dim``,
    ``cross_attention_dim``."""

    preset: str = "small"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    noise_level: Optional[int] = None
    steps: Optional[int] = None
    edit: Optional[float] = None
    distance: str = "l2"
    memory_size: int = 2048
    patches_per_image: int = 256
    search: bool = True
    search_noise: tuple[int, ...] = (50, 100, 200, 400)
    search_steps: tuple[int, ...] = (1, 2)
    search_edit: tuple[float, ...] = (0.0, 0.5, 1.0)
    search_images: int = 16
    seed: int = 0
    identity: bool = False
    standardize: str = "global"
    train_max_timestep: Optional[int] = None
    prediction_type: str = "epsilon"
    feature_channels: Optional[int] = None
    feature_scale: Optional[float] = None
    feature_shift: Optional[float] = None
    feature_channel_shift: Optional[tuple[float, ...]] = None
    feature_channel_scale: Optional[tuple[float, ...]] = None
    bank_dim: Optional[int] = None
    cross_attention_dim: Optional[int] = None

    def validate(self) -> None:
        check_preset(self.preset)
        T = int(self.num_train_timesteps)
        if self.edit is not None and not 0.0 <= float(self.edit) <= 1.0:
            raise ConfigError(f"method.edit (the editing strength lambda) must be in [0, 1], got {self.edit}")
        if self.noise_level is not None and not 1 <= int(self.noise_level) < T:
            raise ConfigError(f"method.noise_level must be in 1..{T - 1} (T={T}), got {self.noise_level}")
        at_least(self, 1, "steps", optional=True)
        searched = self.searched()
        if not searched or not ({"noise_level", "steps"} & set(searched)):
            nl = DEFAULTS["noise_level"] if self.noise_level is None else int(self.noise_level)
            st = DEFAULTS["steps"] if self.steps is None else int(self.steps)
            check_schedule(T, nl, st, "method.noise_level / method.steps")
        if self.distance not in DISTANCES:
            raise ConfigError(f"method.distance must be 'cosine' or 'l2', got {self.distance!r}")
        if self.standardize not in STANDARDIZE:
            raise ConfigError(f"method.standardize must be one of {STANDARDIZE}, got {self.standardize!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"method.prediction_type must be one of {PREDICTION_TYPES}, got "
                              f"{self.prediction_type!r}")
        if (self.feature_channel_shift is None) != (self.feature_channel_scale is None) or (
                self.feature_channel_shift is not None
                and len(self.feature_channel_shift) != len(self.feature_channel_scale)):
            raise ConfigError("method.feature_channel_shift / feature_channel_scale: both or neither, one entry per "
                              "channel each")
        if self.train_max_timestep is not None:
            tmax = int(self.train_max_timestep)
            if not 1 <= tmax < T:
                raise ConfigError(f"method.train_max_timestep must be in 1..{T - 1} (T={T}), got {tmax}")
            used = max(self.search_grid()[0]) if self.search and "noise_level" in self.searched() else (
                DEFAULTS["noise_level"] if self.noise_level is None else int(self.noise_level))
            if used > tmax:
                raise ConfigError(f"method.train_max_timestep={tmax} is below a noise level the reconstruction may "
                                  f"use ({used}): the denoiser would run at timesteps it never saw in training")
        at_least(self, 1, "memory_size", "search_images")
        at_least(self, 0, "patches_per_image")
        if any(not 0.0 <= float(e) <= 1.0 for e in self.search_edit) or not self.search_edit:
            raise ConfigError(f"method.search_edit must list values in [0, 1], got {self.search_edit}")
        noises, steps = self.search_grid()[:2]
        if searched and not search_pairs(T, noises, steps):
            raise ConfigError(f"method.noise_level / method.steps {self.noise_level} / {self.steps} with the search "
                              f"grid (method.search_noise {self.search_noise} x method.search_steps "
                              f"{self.search_steps}): no pair whose DDIM stride (noise / steps) divides T={T}")

    def searched(self) -> list[str]:
        """The settings the search chooses: those left unset (None), when ``search`` is on."""
        return [k for k in SEARCHED if getattr(self, k) is None] if self.search else []

    def search_grid(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
        """``(noises, steps, edits)`` the search tries: a value the user set is its only entry."""
        return ((int(self.noise_level),) if self.noise_level is not None else tuple(self.search_noise),
                (int(self.steps),) if self.steps is not None else tuple(self.search_steps),
                (float(self.edit),) if self.edit is not None else tuple(self.search_edit))


def check_schedule(T: int, noise_level: int, steps: int, where: str) -> None:
    """``1 <= steps <= noise_level < T`` and the DDIM stride ``noise_level / steps`` divides T."""
    if not 1 <= steps <= noise_level < T:
        raise ConfigError(f"{where}: need 1 <= steps <= noise_level < T={T}, got noise_level={noise_level}, "
                          f"steps={steps}")
    if noise_level % steps or T % (noise_level // steps):
        raise ConfigError(f"{where}: the DDIM stride noise_level / steps = {noise_level}/{steps} must be a whole "
                          f"number dividing T={T}")


@functools.lru_cache(maxsize=16)
def _seeded_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``N(0, I)`` of ``shape`` from a generator seeded with ``seed`` (CPU; callers copy it)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def search_pairs(T: int, noises: Sequence[int], steps: Sequence[int]) -> list[tuple[int, int]]:
    """The valid ``(noise_level, steps)`` pairs of the grid (stride a whole divisor of T)."""
    out = []
    for t in noises:
        for k in steps:
            t, k = int(t), int(k)
            if 1 <= k <= t < T and t % k == 0 and T % (t // k) == 0:
                out.append((t, k))
    return out


class FeatureEncoder:
    """The bank backbone seen as an "encoder" for :func:`ccad.data.latent_cache.build_latent_cache`:
    ``encode_raw(x)`` = the locally averaged patch features ``B x C x h x w`` (PatchCore eq. 1-2),
    ``scale_latents`` standardises them with ``(f - shift) * scale``."""

    kind = "backbone"

    def __init__(self, backbone: Any, image_size: int, scale: Optional[float] = None,
                 shift: Optional[float] = None) -> None:
        self.backbone = backbone
        self.spec = f"{backbone.name}:{list(backbone.layers)}"
        self.latent_channels = int(backbone.feature_dim)
        grid = backbone.grid(int(image_size))[0]
        self.downscale = int(image_size) // int(grid)
        self.scale = 1.0 if scale is None else float(scale)
        self.shift = 0.0 if shift is None else float(shift)
        self.fitted = scale is not None

    def fingerprint(self) -> str:
        h = hashlib.sha256(str(getattr(self.backbone, "weights_source", "")).encode())
        for p in list(self.backbone.parameters())[:4]:
            h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
        return h.hexdigest()

    @torch.no_grad()
    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.backbone.parameters()).device
        return self.backbone(x.to(dev)).float()

    def scale_latents(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift) * self.scale

    def set_scaling(self, scale: float, shift: float, fitted: bool = True) -> None:
        self.scale, self.shift, self.fitted = float(scale), float(shift), bool(fitted)


def _draw_cells(z: torch.Tensor, per_image: int, g: torch.Generator) -> torch.Tensor:
    """``per_image`` random cells of every map of ``z`` (``B x C x h x w``; 0 or more than ``h * w``:
    all cells): ``B * n x C`` rows, each image's ``n`` rows consecutive."""
    b, c, h, w = z.shape
    cells = z.permute(0, 2, 3, 1).reshape(b, h * w, c)
    if per_image and h * w > per_image:
        idx = torch.stack([torch.randperm(h * w, generator=g)[:per_image] for _ in range(b)])
        cells = torch.gather(cells, 1, idx[..., None].expand(-1, -1, c))
    return cells.reshape(-1, c)


#: Below this many bytes of drawn cells (float32) the coresets are selected one-shot in RAM (the
#: exact greedy of the fast mode, seconds); above it they stream in bounded memory (minutes: about a
#: third of the cells become greedy picks). 512 MB = 880 000 cells of lite0's 152 channels.
ONE_SHOT_BYTES = 512 * 2 ** 20


class _OneShot:
    """A finished one-shot coreset with :class:`StreamingCoreset`'s read side (``result()``, ``seen``)."""

    def __init__(self, rows: torch.Tensor, seen: int) -> None:
        self.rows, self.seen = rows, int(seen)

    def result(self) -> torch.Tensor:
        return self.rows


def select_cells(cache: Any, per_image: int, picks: Sequence[tuple[int, int]], cancel: Any = None,
                 chunk: int = 64, transform: Any = None, one_shot_bytes: int = ONE_SHOT_BYTES) -> list[Any]:
    """Greedy k-center coresets (PatchCore Alg. 1, CCAD eq. 6) of the cached feature cells in
    bounded memory: one pass over the on-disk cache, ``chunk`` maps at a time, feeding one
    :class:`ccad.features.coreset.StreamingCoreset` per ``(k, seed)`` of ``picks`` (the bank and
    the edit memory), each with its own ``per_image`` random cells per map drawn from a generator
    seeded with its ``seed``. The reductions run in the default ("fast") mode's random projection
    psi (:data:`ccad.features.coreset.CORESET_MODES`: 32 dims) and keep a quarter of the buffer
    (``5 k`` rows, many more than k: the composition bound of :class:`StreamingCoreset` stays tight,
    at a third of the picks of halving). PatchCore's per-image pre-reduction is not used: a random
    draw of cells has no spatial redundancy for it to remove, and on clustered cells it dropped
    whole clusters (tests/test_feat_diff.py). Memory: ``chunk`` maps plus each coreset's buffer
    (``max(20 k, 1000)`` rows), whatever the number of images. When all drawn cells of one pick fit
    in ``one_shot_bytes`` (float32), that pick is selected one-shot instead (the same cells and
    :func:`ccad.features.coreset.greedy_coreset` call as before streaming existed, so those models
    are unchanged): streaming costs about a
    third of the cells as greedy picks, one-shot costs ``k``; the memory bound only matters above
    the budget. ``transform`` maps each drawn ``rows x C`` block before selection (feat-diff's
    per-channel standardisation). Returns the coresets (``.result()``: the rows; ``.seen``: cells
    drawn)."""
    from ..errors import Cancelled
    from ..features.coreset import DEFAULT_CORESET, StreamingCoreset, coreset_mode, greedy_coreset

    mode = coreset_mode(DEFAULT_CORESET)
    n = len(cache)
    if n == 0:
        raise ValueError("feat-diff: no cached feature maps to select the bank / edit memory from")
    _, c, h, w = (int(v) for v in np.asarray(cache.latents[0:1]).shape)
    per = h * w if not per_image or per_image >= h * w else int(per_image)
    one_shot = n * per * c * 4 <= int(one_shot_bytes)
    gens = [torch.Generator().manual_seed(int(seed)) for _, seed in picks]
    cores: list[Any] = []
    drawn: list[list[torch.Tensor]] = [[] for _ in picks]
    for start in range(0, n, int(chunk)):
        if cancel is not None and cancel():
            raise Cancelled("feat-diff's bank / edit memory selection cancelled")
        z = torch.from_numpy(np.asarray(cache.latents[start:start + int(chunk)], dtype=np.float32))
        for i, ((k, seed), g) in enumerate(zip(picks, gens)):
            rows = _draw_cells(z, per_image, g)
            if transform is not None:
                rows = transform(rows)
            if one_shot:
                drawn[i].append(rows)
                continue
            if i == len(cores):
                buffer = max(20 * int(k), 1000)
                cores.append(StreamingCoreset(int(k), buffer=buffer, reduce_to=buffer // 4, proj_dim=mode["proj_dim"],
                                              seed=int(seed), exact_budget=mode["exact_budget"]))
            cores[i].update(rows)
    if one_shot:
        for (k, seed), parts in zip(picks, drawn):
            cells = torch.cat(parts)
            idx = greedy_coreset(cells, int(k), seed=int(seed))  # the pre-streaming selection, exactly
            cores.append(_OneShot(cells[idx], cells.shape[0]))
    return cores


def prediction_target(scheduler: Any, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """The training target for ``prediction_type`` (diffusers' names): ``epsilon`` -> eps (DDPM eq. 14 /
    CCAD eq. 11); ``sample`` -> z0 (x0-prediction); ``v_prediction`` -> ``v = sqrt(abar_t) eps -
    sqrt(1 - abar_t) z0`` (Salimans & Ho 2022, "Progressive distillation", sec. 4; diffusers'
    ``get_velocity``, computed here without writing to the scheduler)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return z0
    if prediction_type == "v_prediction":
        abar = torch.as_tensor(scheduler.alphas_cumprod).to(device=z0.device, dtype=torch.float32)[t.long()]
        abar = abar.view(-1, *([1] * (z0.dim() - 1)))
        return abar.sqrt() * noise.float() - (1.0 - abar).sqrt() * z0.float()
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def distance_map(z: torch.Tensor, z_hat: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-location ``1 - cos(z, z_hat)`` or ``||z - z_hat||_2`` over channels, ``B x 1 x h x w``."""
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(z, z_hat, dim=1, eps=1e-6).unsqueeze(1)
    if distance == "l2":
        return (z - z_hat).pow(2).sum(1, keepdim=True).sqrt()
    raise ValueError(f"distance must be 'cosine' or 'l2', got {distance!r}")


def edit_features(z: torch.Tensor, memory: torch.Tensor, strength: float,
                  nearest: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LafitE feature editing (module docstring item 4): ``z_e = (1 - lambda) z + lambda m(z)``,
    ``m(z)`` the nearest memory row of each location (L2). Returns ``(z_e, m(z))`` (``B x C x h x w``);
    ``nearest`` reuses an earlier ``m(z)``."""
    from ..features.patchcore import nearest_distances

    lam = float(strength)
    if nearest is None and lam == 0.0:
        return z, None
    if nearest is None:
        b, c, h, w = z.shape
        q = z.permute(0, 2, 3, 1).reshape(-1, c)
        _, idx = nearest_distances(q, memory.to(q.device), 1, group=h * w)
        nearest = memory.to(q.device)[idx[:, 0]].view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
    return (1.0 - lam) * z + lam * nearest, nearest


@register_method
class FeatDiff(Method):
    name = "feat-diff"
    title = "Feature-space diffusion (bank features, LafitE-style editing)"
    description = ("small UNet denoising the bank backbone's feature map, cross-attending to the coarse bank; "
                   "input edited toward nearest normal features; multi-class")
    paper = "LafitE (arXiv 2307.08059) + DPDiff-AD (arXiv 2605.24402) + CCAD eq. 11 in feature space"
    space = "feature"
    training_data_phase = "caching the backbone features of the training images (once; in the run folder)"
    Config = FeatDiffConfig
    multi_class = True
    components = {"denoiser": FeatDenoiser, "bank_proj": BankProjector}
    default_image_size = 256
    ablation = "identity denoiser (z_hat = z_e: the edit-memory nearest-neighbour distance)"

    def __init__(self, config: FeatDiffConfig, ctx: Context) -> None:
        from ..diffusion import make_scheduler

        from diffusers import DDPMScheduler

        super().__init__(config, ctx)
        # item 9: what the denoiser predicts is the scheduler's prediction_type (the shared sampler's
        # DDIM step reads it from this scheduler's config)
        self.scheduler = DDPMScheduler.from_config(
            make_scheduler(int(config.num_train_timesteps), config.beta_schedule).config,
            prediction_type=str(config.prediction_type))
        self.memory: Optional[torch.Tensor] = None  # edit memory, standardised units
        self._memory: Optional[torch.Tensor] = None  # the edit memory build_bank selected in its pass
        self.search_table: Optional[dict[str, Any]] = None
        self.fitted: dict[str, Any] = {}  # the search's chosen values (fitted state, FITTED_FILE)
        self._cache: Any = None
        self._encoder: Optional[FeatureEncoder] = None

    # ---- features ---------------------------------------------------------------------------
    def encoder(self) -> FeatureEncoder:
        if self._encoder is None:
            from ..features import get_backbone

            bc, c = self.ctx.bank_config, self.config
            bb = get_backbone(bc.backbone, layers=tuple(bc.layers), weights=bc.weights).to(self.ctx.device)
            self._encoder = FeatureEncoder(bb, self.ctx.image_size, c.feature_scale, c.feature_shift)
            c.feature_channels = int(self._encoder.latent_channels)
        return self._encoder

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised bank features ``z`` of a batch ``B x 3 x S x S`` in [0, 1]: ``B x C x h x w``."""
        enc = self.encoder()
        return self.per_channel(enc.scale_latents(enc.encode_raw(x.to(self.ctx.device))))

    def _channel_stats(self, like: torch.Tensor, dim: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        if c.standardize != "channel":
            return None
        if c.feature_channel_shift is None:
            raise RuntimeError("feat-diff: standardize = 'channel' but the per-channel statistics are not fitted yet")
        shape = [1] * like.dim()
        shape[dim] = -1
        kw = dict(dtype=torch.float32, device=like.device)
        return (torch.tensor(c.feature_channel_shift, **kw).view(shape),
                torch.tensor(c.feature_channel_scale, **kw).view(shape))

    def per_channel(self, z: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Item 9, ``standardize = "channel"``: ``(z - m_c) * s_c`` on globally standardised ``z`` (channels
        along ``dim``), ``m_c`` / ``1 / s_c`` each channel's mean / std over the cached training features;
        the identity for ``global``."""
        stats = self._channel_stats(z, dim)
        return z if stats is None else (z.float() - stats[0]) * stats[1]

    def un_per_channel(self, z: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The inverse of :meth:`per_channel` (back to the globally standardised units)."""
        stats = self._channel_stats(z, dim)
        return z if stats is None else z.float() / stats[1] + stats[0]

    def _fit_channel_stats(self, cache: Any) -> None:
        """Per-channel mean / std of every cached (globally standardised) value: one entry per channel."""
        total, sq, n = None, None, 0
        for start in range(0, len(cache), 64):
            z = torch.from_numpy(np.asarray(cache.latents[start:start + 64], dtype=np.float64))
            s1, s2 = z.sum((0, 2, 3)), (z * z).sum((0, 2, 3))
            total, sq = (s1, s2) if total is None else (total + s1, sq + s2)
            n += z.shape[0] * z.shape[2] * z.shape[3]
        mean = total / n
        std = (sq / n - mean * mean).clamp_min(0.0).sqrt().clamp_min(1e-6)
        self.config.feature_channel_shift = tuple(float(v) for v in mean)
        self.config.feature_channel_scale = tuple(float(v) for v in 1.0 / std)

    def feature_cache(self, train: Sequence[Any]) -> Any:
        """Extract the training features once into ``<run>/features`` (or reuse a matching cache)
        and fit the standardisation on them (module docstring item 1)."""
        from ..data.latent_cache import build_latent_cache

        if self._cache is not None:
            return self._cache
        enc = self.encoder()
        run_dir = self.ctx.run_dir or Path(tempfile.mkdtemp(prefix="ccad-features-"))
        cache = build_latent_cache(list(train), enc, self.ctx.image_size, Path(run_dir) / FEATURES_FOLDER,
                                   batch_size=self.ctx.bank_config.batch_size, progress=self.ctx.progress,
                                   cancel=self.ctx.cancel, fit_scaling=self.config.feature_scale is None)
        self.config.feature_scale, self.config.feature_shift = float(enc.scale), float(enc.shift)
        if self.config.standardize == "channel" and self.config.feature_channel_shift is None:
            self._fit_channel_stats(cache)
        self._cache = cache
        return cache

    def build_bank(self, train: Sequence[Any]) -> Any:
        """B_c as a greedy k-center coreset of the cached features (one pass over the images)."""
        from datetime import datetime, timezone

        from .. import __version__
        from ..features import FeatureBank
        from ..features.coreset import validate_bank_size

        bc, c = self.ctx.bank_config, self.config
        xi = validate_bank_size(bc.size)
        cache = self.feature_cache(train)
        picks = [(xi, int(self.ctx.seed)), (int(c.memory_size), int(self.ctx.seed) + 1)]
        bank_core, memory_core = select_cells(cache, int(c.patches_per_image), picks, self.ctx.cancel,
                                              transform=lambda r: self.per_channel(r, dim=-1))
        self._memory = memory_core.result().float().contiguous()  # build() takes it (the same pass)
        rows = bank_core.result()
        raw = self.un_per_channel(rows, dim=-1) / float(c.feature_scale) + float(c.feature_shift)
        bb = self.encoder().backbone
        meta = {"backbone": bb.name, "layers": list(bb.layers), "image_size": int(self.ctx.image_size),
                "xi": int(raw.shape[0]), "xi_requested": xi, "feature_dim": int(raw.shape[1]),
                "n_images": len(cache), "n_patches": int(bank_core.seen), "skipped": [list(e) for e in cache.errors],
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ccad_version": __version__,
                "coreset": {"method": "streaming greedy k-center of the cached feature cells", "per_image":
                            int(c.patches_per_image), "seed": self.ctx.seed, "mode": "fast"}}
        return FeatureBank(raw.float(), meta)

    # ---- building and training ----------------------------------------------------------------
    def build(self, train: Sequence[Any]) -> None:
        from ..models.feat_denoiser import build_feat_denoiser

        c = self.config
        cache = self.feature_cache(train)
        net = build_feat_denoiser(c.preset, int(c.feature_channels))
        c.cross_attention_dim = int(net.config.cross_attention_dim)
        c.bank_dim = int(self.ctx.bank.features.shape[1])
        if c.bank_dim != int(c.feature_channels):
            raise ConfigError(f"the bank has {c.bank_dim}-dim rows but the backbone gives {c.feature_channels} "
                              f"channels: build the bank with the same bank.backbone / bank.layers")
        self.modules["denoiser"] = net
        self.modules["bank_proj"] = BankProjector(c.bank_dim, c.cross_attention_dim)
        memory, self._memory = self._memory, None
        if memory is None:  # the bank came from elsewhere: select the edit memory alone
            pick = [(int(c.memory_size), int(self.ctx.seed) + 1)]
            memory = select_cells(cache, int(c.patches_per_image), pick, self.ctx.cancel,
                                  transform=lambda r: self.per_channel(r, dim=-1))[0].result().float()
        self.memory = memory.contiguous()

    def training_dataset(self, train: Sequence[Any]) -> Any:
        return self.feature_cache(train)

    def _context_bank(self, device: torch.device) -> torch.Tensor:
        c = self.config
        bank = (self.ctx.bank_tensor() - float(c.feature_shift)) * float(c.feature_scale)
        return self.per_channel(bank, dim=-1).to(device)

    def _eps_fn(self, modules: nn.ModuleDict, device: torch.device) -> Any:
        bank = self._context_bank(device)

        def eps_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return modules["denoiser"](z_t, t, modules["bank_proj"](bank, batch=z_t.shape[0]))

        return eps_fn

    def training_loss(self, modules: nn.ModuleDict, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Item 3 with the item-9 levers: t ~ U{0..train_max_timestep} (default U{0..T-1}), the cached
        features standardised per channel when asked, and the target the ``prediction_type`` names
        (:func:`prediction_target`). With the defaults this is exactly eq. 11's epsilon loss."""
        from ..diffusion.objectives import training_draws

        c = self.config
        z = self.per_channel(batch["latent"])
        t = None
        if c.train_max_timestep is not None:
            gdev = generator.device if generator is not None else "cpu"
            t = torch.randint(0, int(c.train_max_timestep) + 1, (z.shape[0],), generator=generator, device=gdev)
        t, noise = training_draws(z, self.scheduler, generator, timesteps=t)
        noise = noise.to(z.device, z.dtype)
        z_t = self.scheduler.add_noise(z, noise, t)
        out = self._eps_fn(modules, z.device)(z_t, t)
        return F.mse_loss(out.float(), prediction_target(self.scheduler, z, noise, t, c.prediction_type).float())

    # ---- reconstruction and maps ----------------------------------------------------------------
    def _noise_field(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """The fixed noise field of item 5 (``C x h x w``, seeded with ``seed``): a pure function of
        (seed, shape), kept in a module-level cache (never on the method, which inference must not
        write) and returned as a copy. While ``ccad export`` traces the graph it is drawn outside
        the trace, so the graph holds it as a constant (a traced ``torch.Generator`` cannot be
        exported)."""
        key = (int(self.config.seed), tuple(int(s) for s in shape))
        if torch.jit.is_tracing():
            state = torch._C._get_tracing_state()
            torch._C._set_tracing_state(None)
            try:
                field = _seeded_noise(*key).clone()
            finally:
                torch._C._set_tracing_state(state)
            return field.to(device)
        return _seeded_noise(*key).to(device).clone()

    @torch.no_grad()
    def denoise(self, z_e: torch.Tensor, noise_level: int, steps: int,
                modules: Optional[nn.ModuleDict] = None) -> torch.Tensor:
        """Module docstring item 5: noise ``z_e`` to ``noise_level`` and run ``steps`` DDIM steps
        (eta 0) on the package's one sampler, :func:`ccad.diffusion.sampling.partial_ddim`; returns
        the last step's x0 estimate ``z_hat``.

        The start noise is the fixed field :meth:`_noise_field` for every image: the draw a
        per-image generator seeded with ``seed`` gives (:func:`ccad.diffusion.objectives.
        image_generators`), kept in a cache and drawn outside an export trace. The sampler builds
        its own respaced ``DDIMScheduler`` per call, so calls from several threads (the app) never
        share a grid."""
        from ..diffusion.sampling import partial_ddim

        check_schedule(int(self.config.num_train_timesteps), int(noise_level), int(steps), "denoise")
        modules = self.modules if modules is None else modules
        noise = self._noise_field(z_e.shape[1:], z_e.device)
        return partial_ddim(self._eps_fn(modules, z_e.device), z_e, self.scheduler, int(noise_level), int(steps),
                            noise=noise).float()

    def _smooth(self, raw: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        maps = F.interpolate(raw, size=tuple(size), mode="bilinear", align_corners=False)
        return gaussian_blur(maps, scaled_sigma(self.ctx.scoring.sigma, int(size[-1])))

    @torch.no_grad()
    def raw_maps(self, z: torch.Tensor, noise_level: int, steps: int, edit: float,
                 nearest: Optional[torch.Tensor] = None, identity: bool = False) -> torch.Tensor:
        """The grid-level map (item 6) of standardised features ``z`` with given settings;
        ``identity``: ``z_hat = z_e``, the denoiser is never called (item 8)."""
        z_e, _ = edit_features(z, self.memory, edit, nearest)
        z_hat = z_e if identity else self.denoise(z_e, noise_level, steps)
        return distance_map(z, z_hat, self.config.distance)

    def setting(self, name: str) -> Any:
        """The value of ``noise_level`` / ``steps`` / ``edit`` that runs: the user's (config), else the
        search's (fitted state), else the default."""
        value = getattr(self.config, name)
        if value is None:
            value = self.fitted.get(name, DEFAULTS[name])
        return float(value) if name == "edit" else int(value)

    def setting_sources(self) -> dict[str, str]:
        """Where each of ``noise_level`` / ``steps`` / ``edit`` came from, in words (for the card)."""
        out = {}
        chosen = (self.search_table or {}).get("chosen") or {}
        for k in SEARCHED:
            if getattr(self.config, k) is None:
                out[k] = "search (fitted state)" if k in self.fitted else "default (not searched)"
            elif self.fitted.get("legacy") and k in chosen and (
                    chosen[k] == getattr(self.config, k)
                    # the identity won: its row says noise 0 / steps 0, the config got the best trained arm's
                    or (chosen.get("denoiser") == "identity" and k != "edit")):
                out[k] = "search (written into config.json by an older ccad)"
            else:
                out[k] = "config (as given)"
        return out

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> MethodOutput:
        identity = bool(self.ablate or self.uses_identity())  # the ablation view, or the identity chosen
        edit = self.setting("edit")
        if self.ablate and edit == 0.0:
            edit = 1.0
        z = self.features(x)
        return MethodOutput(self._smooth(self.raw_maps(z, self.setting("noise_level"), self.setting("steps"), edit,
                                                       identity=identity), x.shape[-2:]))

    def uses_identity(self) -> bool:
        """Whether the model's own map skips the denoiser (item 8): set in the config, or chosen by
        the search (fitted state)."""
        return bool(self.config.identity or self.fitted.get("identity"))

    @torch.no_grad()
    def maps_and_ablation(self, x: torch.Tensor) -> tuple[MethodOutput, MethodOutput]:
        """The model's own map and the identity view's (item 8) from one feature pass and one
        nearest-memory search: the same values as :meth:`maps` and :meth:`ablation_maps`."""
        c = self.config
        size = x.shape[-2:]
        z = self.features(x)
        edit = self.setting("edit")
        abl_edit = edit if edit > 0.0 else 1.0
        z_e, nearest = edit_features(z, self.memory, abl_edit)
        ablated = self._smooth(distance_map(z, z_e, c.distance), size)
        own = self._smooth(self.raw_maps(z, self.setting("noise_level"), self.setting("steps"), edit, nearest,
                                         identity=self.uses_identity()), size)
        return MethodOutput(own), MethodOutput(ablated)

    # ---- hyper-parameters on synthetic anomalies of held-out good images ------------------------
    def after_training_phase(self) -> Optional[str]:
        c = self.config
        if not c.search:
            return super().after_training_phase()
        n = min(len(list(self.ctx.held_out)), int(c.search_images))
        k = len(search_pairs(int(c.num_train_timesteps), c.search_noise, c.search_steps)) * len(c.search_edit)
        return (f"choosing noise level, steps and edit strength: {k} settings scored on {n} held-out good "
                f"images and {n} synthetic anomalies")

    def after_training(self, train: Sequence[Any]) -> None:
        super().after_training(train)
        if self.config.search:
            self.search_hyperparameters(list(self.ctx.held_out))

    def selects_on_held_out(self) -> list[str]:
        searched = self.config.searched()
        return [f"feat-diff's {', '.join(searched)} (search on synthetic anomalies)"] if searched else []

    @torch.no_grad()
    def search_hyperparameters(self, good: Sequence[Any]) -> Optional[dict[str, Any]]:
        """Module docstring item 7 (LafitE's pseudo-validation set). ``good`` are held-out good
        images (the calibration slice); without any, the configured values stay and the card says so."""
        from ..data.anomaly_synth import synthesize_batch
        from ..data.dataset import iter_batches
        from ..metrics import aupro, auroc, pixel_auroc

        c, sc = self.config, self.ctx.scoring
        items = list(good)[: int(c.search_images)]
        self.fitted = {}
        if not c.searched():
            self.search_table = {"source": "none: noise_level, steps and edit were all set in the config (used as "
                                           "given)"}
            return None
        if not items:
            self.search_table = {"source": "none: no held-out good images; configured or default values kept"}
            return None
        self.to(self.ctx.device)
        gen = torch.Generator().manual_seed(int(self.ctx.seed) + 7)
        zs, masks = [], []
        size = None
        for b in iter_batches(items, self.ctx.image_size, batch_size=self.ctx.bank_config.batch_size,
                              on_error="skip"):
            x = b["image"].float()
            x_a, m = synthesize_batch(x, gen, ratio=1.0)
            zs.append(torch.cat([self.features(x), self.features(x_a)]).cpu())
            masks.append(torch.cat([torch.zeros_like(m), m]).cpu())
            size = x.shape[-2:]
        if not zs:
            self.search_table = {"source": "none: no readable held-out good image; configured values kept"}
            return None
        n_good = sum(len(z) // 2 for z in zs)
        labels = np.concatenate([np.r_[np.zeros(len(z) // 2), np.ones(len(z) // 2)] for z in zs])
        mask = torch.cat(masks)[:, 0].numpy() > 0.5
        nearest = [edit_features(z.to(self.ctx.device), self.memory, 1.0)[1] for z in zs]
        table = []
        noises, steps, edits = c.search_grid()
        for t, k in search_pairs(int(c.num_train_timesteps), noises, steps):
            for lam in edits:
                maps = torch.cat([self._smooth(self.raw_maps(z.to(self.ctx.device), t, k, float(lam), nn_), size).cpu()
                                  for z, nn_ in zip(zs, nearest)])
                scores = image_score(maps, sc.score, sc.topk_ratio, topk_count=sc.topk_count).numpy()
                img = float(auroc(labels, scores))
                pix = float(pixel_auroc(mask, maps[:, 0].numpy()))
                pro = float(aupro(mask, maps[:, 0].numpy(), labels=labels))
                table.append({"denoiser": "trained", "noise_level": t, "steps": k, "edit": float(lam),
                              "image_auroc": round(img, 5), "pixel_auroc": round(pix, 5), "pixel_aupro": round(pro, 5),
                              "objective": round((img + pix + pro) / 3, 5)})
        for lam in sorted({float(e) for e in edits if float(e) > 0.0}) or [1.0]:  # item 8: the identity arm
            maps = torch.cat([self._smooth(self.raw_maps(z.to(self.ctx.device), 0, 0, lam, nn_, identity=True),
                                           size).cpu() for z, nn_ in zip(zs, nearest)])
            scores = image_score(maps, sc.score, sc.topk_ratio, topk_count=sc.topk_count).numpy()
            img, pix = float(auroc(labels, scores)), float(pixel_auroc(mask, maps[:, 0].numpy()))
            pro = float(aupro(mask, maps[:, 0].numpy(), labels=labels))
            table.append({"denoiser": "identity", "noise_level": 0, "steps": 0, "edit": lam,
                          "image_auroc": round(img, 5), "pixel_auroc": round(pix, 5), "pixel_aupro": round(pro, 5),
                          "objective": round((img + pix + pro) / 3, 5)})

        def key(r: dict[str, Any]) -> tuple:  # ties: fewer UNet evaluations (the identity has none), less noise
            return r["objective"], -r["steps"], -r["noise_level"]

        best = max(table, key=key)
        trained = max((r for r in table if r["denoiser"] == "trained"), key=key)
        # fitted state only: the config keeps what the user gave (None = searched); with the identity
        # chosen, noise_level / steps are the best trained arm's (unused while the identity is on)
        self.fitted = {k: (float(best[k]) if k == "edit" else int(trained[k])) for k in c.searched()}
        if best["denoiser"] == "identity":
            self.fitted["identity"] = True
        self.search_table = {"source": "synthetic anomalies on held-out good images (the selection part)",
                             "n_good": int(n_good), "n_synthetic": int(n_good), "searched": c.searched(),
                             "chosen": dict(best), "grid": table}
        return self.search_table

    # ---- device, card, files --------------------------------------------------------------------
    def to(self, device: torch.device) -> "FeatDiff":
        super().to(device)
        if self._encoder is not None:
            self._encoder.backbone.to(device)
        if self.memory is not None:
            self.memory = self.memory.to(device)
        return self

    def card(self) -> dict[str, Any]:
        c = self.config
        facts = {**super().card(), "reconstruction": {
            "strategy": "feature editing (LafitE) + DDIM from the noised features",
            **{k: self.setting(k) for k in SEARCHED}, "sources": self.setting_sources(), "distance": c.distance,
            "memory_rows": None if self.memory is None else int(self.memory.shape[0])}}
        if self.uses_identity():  # module docstring item 8
            facts["reconstruction"].update(strategy="identity (z_hat = z_e; the denoiser is skipped at inference)",
                                           noise_level=None, steps=0)
            facts["note"] = IDENTITY_NOTE
        if self.search_table is not None:
            facts["search"] = self.search_table
            share = denoiser_share(self.search_table)
            if share is not None:
                facts["denoiser_share"] = share
                if share["margin"] < 0.005 and "note" not in facts:  # the app's model line shows the note
                    facts["note"] = share["note"]
        return facts

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        super().save(directory)
        meta = {"search": json.dumps(self.search_table)} if self.search_table is not None else None
        save_file({"memory": self.memory.detach().float().cpu().contiguous()}, str(Path(directory) / MEMORY_FILE),
                  metadata=meta)
        fitted = {k: v for k, v in self.fitted.items() if k in SEARCHED or k == "identity"}
        f = Path(directory) / FITTED_FILE
        if fitted:
            f.write_text(json.dumps({**fitted, "source": "search on synthetic anomalies of held-out good images"},
                                    indent=1))
        elif f.is_file():  # never leave another model's fitted values behind
            f.unlink()

    @classmethod
    def load(cls, directory: Path, config: FeatDiffConfig, ctx: Context) -> "FeatDiff":
        from safetensors import safe_open
        from safetensors.torch import load_file

        method = super().load(directory, config, ctx)
        f = saved_part(directory, MEMORY_FILE, "feat-diff's edit memory")
        method.memory = load_file(str(f))["memory"]
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("search"):
            method.search_table = json.loads(meta["search"])
        fitted = Path(directory) / FITTED_FILE
        if fitted.is_file():
            try:
                data = json.loads(fitted.read_text())
                method.fitted = {k: (float(data[k]) if k == "edit" else int(data[k])) for k in SEARCHED if k in data}
                if data.get("identity"):
                    method.fitted["identity"] = True
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(f"{fitted}: not a readable fitted-state file ({exc}); re-train the model") from None
        elif (method.search_table or {}).get("chosen"):
            method.fitted = {"legacy": True}  # an older ccad wrote the chosen values into config.json
        return method
