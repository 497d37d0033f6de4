"""Building a :class:`ccad.models.autoencoder.LatentAutoencoder` from a spec string.

:func:`load_autoencoder` reads ``"<kind>:<Hub id or folder>"`` (``kl``, ``tiny``, ``taef2``), a
``"<kind>:random"`` small random-init backend for tests and demos, or a bare folder holding a
saved autoencoder; Hub ids respect ``HF_HUB_OFFLINE``. What it cannot load raises
:class:`~ccad.models.autoencoder.AutoencoderNotFound`, saying how to provide one. Checking a spec
without loading it: :mod:`ccad.models.autoencoder_check`.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .autoencoder import (
    _TAEF2_FILES,
    AUTOENCODER_META,
    AutoencoderNotFound,
    LatentAutoencoder,
    _backend_class,
    _norm_kind,
)
from .taef2 import TAEF2

__all__ = ["load_autoencoder"]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _random_backend(kind: str, seed: int) -> nn.Module:
    """Small random-init backends with the real downscale (8) for tests and demos."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    with _seeded(seed):
        if kind == "kl":
            return AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
                norm_num_groups=4, sample_size=64, mid_block_add_attention=False,
            )
        if kind == "tiny":
            return AutoencoderTiny(
                encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
            )
        return TAEF2(latent_channels=32, channels=16, blocks_per_stage=1)


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_hub_id(s: str) -> bool:
    return bool(_HUB_ID.match(s)) and not s.startswith((".", "~")) and ".." not in s


def _load_local(kind: str, d: Path, spec: str, subfolder: str | None) -> nn.Module | LatentAutoencoder:
    if subfolder:
        d = d / subfolder
    for sub in (d, d / "vae"):  # a saved LatentAutoencoder, or a saved detector / pipeline folder
        if (sub / AUTOENCODER_META).is_file():
            return LatentAutoencoder.from_pretrained(sub, spec=spec)
    if kind == "taef2" and all((d / f).is_file() for f in _TAEF2_FILES):
        return TAEF2.from_original_weights(d / _TAEF2_FILES[0], d / _TAEF2_FILES[1])
    cls = _backend_class(kind)
    if (d / "config.json").is_file():
        return cls.from_pretrained(str(d))
    if (d / "vae" / "config.json").is_file():  # a diffusers pipeline folder
        return cls.from_pretrained(str(d), subfolder="vae")
    if kind == "taef2" and any((d / f).is_file() for f in _TAEF2_FILES):
        missing = [f for f in _TAEF2_FILES if not (d / f).is_file()]
        raise AutoencoderNotFound(spec, f"{d} has only one of the TAEF2 files ({', '.join(missing)} missing)")
    want = " or ".join(_TAEF2_FILES) + ", or " if kind == "taef2" else ""
    raise AutoencoderNotFound(spec, f"{d} holds no {want}config.json, vae/config.json or {AUTOENCODER_META}")


def _load_hub(kind: str, repo_id: str, spec: str, subfolder: str | None,
              cache_dir: str | None) -> nn.Module:
    offline = _hf_offline()
    cls = _backend_class(kind)
    kw: dict[str, Any] = dict(local_files_only=offline)
    if cache_dir is not None:
        kw["cache_dir"] = cache_dir
    errors: list[str] = []
    subfolders = [subfolder] if subfolder else [None, "vae"]
    for sub in subfolders:
        try:
            with warnings.catch_warnings():  # diffusers' own deprecation notice on every miss
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                return cls.from_pretrained(repo_id, subfolder=sub, **kw)
        except (OSError, ValueError) as e:  # not cached / not found / invalid id
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if kind == "taef2":
        try:
            from huggingface_hub import hf_hub_download

            paths = [hf_hub_download(repo_id, f, subfolder=subfolder, **kw) for f in _TAEF2_FILES]
            return TAEF2.from_original_weights(*paths)
        except (OSError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    where = "in the local Hub cache (HF_HUB_OFFLINE=1)" if offline else "on the Hub or in its cache"
    raise AutoencoderNotFound(spec, f"{repo_id!r} is not a local folder and was not found {where} "
                                    f"({errors[0] if errors else 'no detail'})")


def load_autoencoder(spec: str | LatentAutoencoder, device: str | torch.device | None = None,
                     *, subfolder: str | None = None, seed: int = 0, cache_dir: str | None = None,
                     scale: float | None = None, shift: float | None = None) -> LatentAutoencoder:
    """Build a :class:`LatentAutoencoder` from a spec string.

    Specs:
        ``"kl:<hub id or folder>"``: diffusers ``AutoencoderKL`` (e.g. ``kl:stabilityai/sd-vae-ft-mse``);
        ``"tiny:<hub id or folder>"``: diffusers ``AutoencoderTiny`` (e.g. ``tiny:madebyollin/taesd``);
        ``"taef2:<folder>"``: a folder with ``taef2_encoder.pth`` + ``taef2_decoder.pth`` (the
        original weights), or a ``save_pretrained`` folder;
        ``"<kind>:random"``: a small random-init backend (tests, demos; ``seed`` sets the init);
        a bare folder holding ``autoencoder.json`` (a saved :class:`LatentAutoencoder`).

    Folders load with ``from_pretrained(folder)`` (``subfolder="vae"`` for an SD pipeline
    folder); Hub ids use ``local_files_only`` when ``HF_HUB_OFFLINE`` is set. ``scale`` /
    ``shift`` override the default scaling.

    Raises:
        AutoencoderNotFound: no such folder, not cached, or offline; the message says how to
            provide one.
        ValueError: unknown kind or a malformed spec.
    """
    if isinstance(spec, LatentAutoencoder):
        ae = spec
    else:
        spec = str(spec).strip()
        kind_s, sep, target = spec.partition(":")
        if not sep or (len(kind_s) == 1 and os.name == "nt"):  # a bare path
            p = Path(os.path.expanduser(spec))
            if (p / AUTOENCODER_META).is_file() or (subfolder and (p / subfolder / AUTOENCODER_META).is_file()):
                ae = LatentAutoencoder.from_pretrained(p, subfolder=subfolder)
            elif p.exists():
                raise ValueError(f"autoencoder spec {spec!r}: say which kind it is, e.g. kl:{spec}, "
                                 f"tiny:{spec} or taef2:{spec}")
            else:
                raise AutoencoderNotFound(spec, "expected '<kind>:<hub id or folder>'")
        else:
            kind = _norm_kind(kind_s)
            target = target.strip()
            if not target:
                raise AutoencoderNotFound(spec, "no hub id or folder after the kind")
            if target.lower() == "random":
                backend: nn.Module | LatentAutoencoder = _random_backend(kind, seed)
                spec = f"{kind}:random" + (f"@seed={seed}" if seed else "")
            else:
                p = Path(os.path.expanduser(target))
                if p.exists():
                    if not p.is_dir():
                        raise AutoencoderNotFound(spec, f"{p} is a file, not a folder")
                    backend = _load_local(kind, p, spec, subfolder)
                elif _looks_like_hub_id(target):
                    backend = _load_hub(kind, target, spec, subfolder, cache_dir)
                else:
                    raise AutoencoderNotFound(spec, f"no folder {p}")
            if isinstance(backend, LatentAutoencoder):
                if backend.kind != kind:
                    raise ValueError(f"{spec!r}: the folder holds a {backend.kind} autoencoder, not {kind}")
                ae = backend
            else:
                ae = LatentAutoencoder(backend, kind, spec=spec)
    if scale is not None or shift is not None:
        ae.set_scaling(ae.scale if scale is None else scale, ae.shift if shift is None else shift,
                       fitted=False)
    if device is not None:
        ae.to(device)
    return ae
