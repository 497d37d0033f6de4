"""Checking an autoencoder spec without loading any weights, and listing the ones usable offline.

:func:`autoencoder_problem` says why :func:`ccad.models.autoencoder_load.load_autoencoder`
would fail on a spec here (a folder without the files its kind reads, a Hub id neither cached
nor reachable), so a training run can be refused before it starts;
:func:`offline_autoencoders` lists the specs that load without the network (TAEF2 folders found
on disk, known Hub autoencoders already in the local Hub cache). ``load_autoencoder`` and
``_load_local`` below are those of :mod:`ccad.models.autoencoder_load`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .autoencoder import _TAEF2_FILES, AUTOENCODER_META, _norm_kind
from .autoencoder_load import _hf_offline, _looks_like_hub_id

__all__ = ["KNOWN_HUB_AUTOENCODERS", "autoencoder_problem", "offline_autoencoders"]


KNOWN_HUB_AUTOENCODERS = ("kl:stabilityai/sd-vae-ft-mse", "tiny:madebyollin/taesd")


def _hub_cached(kind: str, repo_id: str, cache_dir: str | None = None) -> bool:
    """Whether ``repo_id`` is in the local Hub cache with the files :func:`load_autoencoder` reads
    (a diffusers ``config.json`` at the top or in ``vae/``, or TAEF2's two ``.pth`` files)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str)
        except Exception:  # noqa: BLE001 - a malformed id or cache: not usable offline
            return False

    if cached("config.json") or cached("vae/config.json"):
        return True
    return kind == "taef2" and all(cached(f) for f in _TAEF2_FILES)


def _folder_problem(kind: str, d: Path) -> str | None:
    """Why ``kind:d`` cannot load from the folder ``d`` (None: it holds what :func:`_load_local` reads)."""
    if not d.exists():
        return f"there is no folder {d}"
    if not d.is_dir():
        if kind == "taef2" and d.name in _TAEF2_FILES:
            return (f"{d} is a file; give the folder that holds {' and '.join(_TAEF2_FILES)}: "
                    f"taef2:{d.parent}")
        return f"{d} is a file, not a folder"
    if any((sub / AUTOENCODER_META).is_file() for sub in (d, d / "vae")):
        return None
    if kind == "taef2":
        have = [f for f in _TAEF2_FILES if (d / f).is_file()]
        if len(have) == len(_TAEF2_FILES):
            return None
        if have:
            missing = [f for f in _TAEF2_FILES if f not in have]
            return f"{d} has {have[0]} but not {', '.join(missing)} (TAEF2 needs both files in one folder)"
    if (d / "config.json").is_file() or (d / "vae" / "config.json").is_file():
        return None
    want = " and ".join(_TAEF2_FILES) if kind == "taef2" else "config.json (a diffusers folder) or vae/config.json"
    return f"{d} holds no {want}"


def autoencoder_problem(spec: str, online: bool | None = None, cache_dir: str | None = None) -> str | None:
    """Why :func:`load_autoencoder` would fail on ``spec`` here, checked without loading any
    weights (None: it will load). A folder must hold the files its kind reads (TAEF2: the folder
    with ``taef2_encoder.pth`` and ``taef2_decoder.pth``, not one of the files); a Hub id must be in
    the local Hub cache unless the Hub can be reached: ``online`` says whether it can (None: unknown,
    taken as reachable unless ``HF_HUB_OFFLINE`` is set)."""
    spec = str(spec or "").strip()
    if not spec:
        return "no autoencoder given"
    kind_s, sep, target = spec.partition(":")
    if not sep or (len(kind_s) == 1 and os.name == "nt"):  # a bare path: a saved LatentAutoencoder
        p = Path(os.path.expanduser(spec))
        if (p / AUTOENCODER_META).is_file():
            return None
        return (f"{spec!r} is not a saved autoencoder folder (no {AUTOENCODER_META}); write "
                "<kind>:<Hub id or folder>, e.g. taef2:/path/to/folder")
    try:
        kind = _norm_kind(kind_s)
    except ValueError as exc:
        return str(exc)
    target = target.strip()
    if not target:
        return f"no Hub id or folder after {kind_s}:"
    if target.lower() == "random":
        return None
    p = Path(os.path.expanduser(target))
    if p.exists() or not _looks_like_hub_id(target):
        return _folder_problem(kind, p)
    if _hub_cached(kind, target, cache_dir):
        return None
    offline = _hf_offline() or online is False
    if not offline:
        return None
    why = "HF_HUB_OFFLINE is set" if _hf_offline() else "the Hugging Face Hub cannot be reached from here"
    return (f"{target!r} is not in the local Hub cache and {why}; download it first "
            f"(`huggingface-cli download {target}`) or use a local folder")


def offline_autoencoders(search: Iterable[str | os.PathLike[str]] = (), cache_dir: str | None = None,
                         depth: int = 2) -> list[str]:
    """Specs that load here without the network, best first: TAEF2 folders (``taef2:<folder>``)
    found in ``search`` folders (down to ``depth`` levels; hidden folders skipped), then the known
    Hub autoencoders already in the local Hub cache. Random-init specs are not listed."""
    found: list[str] = []

    def walk(d: Path, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        names = {e.name for e in entries if e.is_file()}
        if all(f in names for f in _TAEF2_FILES):
            found.append(f"taef2:{d}")
        if level < depth:
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_dir(follow_symlinks=False) and not e.name.startswith("."):
                    walk(Path(e.path), level + 1)

    for root in search:
        walk(Path(root).expanduser(), 0)
    for spec in KNOWN_HUB_AUTOENCODERS:
        kind, _, repo = spec.partition(":")
        if _hub_cached(kind, repo, cache_dir):
            found.append(spec)
    return list(dict.fromkeys(found))
