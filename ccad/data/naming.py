"""Output file names for inspected images that never point at the wrong image.

``ccad predict --out`` (and any batch export) writes ``<stem>_heatmap.png``, ``<stem>_overlay.png``
and ``<stem>_mask.png`` for every image into one flat folder. :func:`output_stems` gives each input
its own ``stem``:

* the image's path relative to the deepest folder holding all the inputs, without its extension,
  with the folder separator written as ``+`` (``a/000.png`` -> ``a+000``); a single folder of
  images keeps its plain stems (``000.png`` -> ``000``);
* the encoding is injective: ``%`` ``+`` ``~``, characters that some file systems refuse
  (``<>:"/\\|?*``), control characters and bytes of the name that are not UTF-8 are
  percent-encoded (``b+c.png`` -> ``b%2Bc``, ``\\xff.png`` -> ``%FF``), so a
  top-level ``b_000.png`` (``b_000``) and ``b/000.png`` (``b+000``) can never swap names;
* what is left (``a.png`` beside ``a.jpg``, or names equal but for case, which collide on
  case-insensitive file systems) gets ``~2``, ``~3``, ... in input order (deterministic; ``~``
  never occurs otherwise).

The output kinds (``_heatmap``, ``_overlay``, ``_mask``, ``_reconstruction``) are none a suffix of
another, so ``<stem>_<kind>.png`` is unique per (image, kind) too. :func:`output_files` gives the
file names themselves.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Iterable, Optional, Sequence, Union

__all__ = ["OUTPUT_KINDS", "display_name", "encode_relative", "output_stems", "output_files"]

PathLike = Union[str, "os.PathLike[str]"]

#: The per-image files a prediction writes (``<stem>_<kind>.png``).
OUTPUT_KINDS: tuple[str, ...] = ("heatmap", "overlay", "mask", "reconstruction")

_SEP = "+"
_DUP = "~"
_ESCAPE = set('%+~<>:"/\\|?*')


def _quote(part: str) -> str:
    return "".join(f"%{ord(c):02X}" if (c in _ESCAPE or ord(c) < 32 or ord(c) == 127)
                   else f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF  # a byte that is not UTF-8
                   else c for c in part)


def display_name(path: PathLike) -> str:
    """``path`` as text that can be printed and written to a UTF-8 file: a byte of the name
    that is not valid UTF-8 (held by Python as a surrogate escape) is shown as ``\\xff``."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def encode_relative(parts: Sequence[str]) -> str:
    """``("a", "000")`` -> ``"a+000"``: path components joined by ``+``, each percent-encoded
    (``%``, ``+``, ``~``, ``<>:"/\\|?*``, control characters) so that the result is injective."""
    return _SEP.join(_quote(p) for p in parts)


def _common_folder(paths: Sequence[str]) -> Optional[str]:
    parents = [os.path.dirname(p) for p in paths]
    try:
        return os.path.commonpath(parents) if parents else None
    except ValueError:  # absolute and relative mixed, or different drives
        return None


def output_stems(paths: Iterable[Optional[PathLike]], fallback: str = "image") -> list[str]:
    """One distinct, unambiguous file stem per path, in order (see the module docstring).

    Paths are taken as given (made absolute without resolving symlinks: a link is named by its
    own name, never its target). ``None`` (an in-memory image) is named ``fallback`` (then
    ``fallback~2`` ...). Deterministic: the same inputs in the same order give the same names.
    """
    given = list(paths)
    absolute = [os.path.abspath(os.fspath(p)) for p in given if p is not None]
    root = _common_folder(absolute)
    stems: list[str] = []
    used: set[str] = set()
    it = iter(absolute)
    for p in given:
        if p is None:
            base = _quote(fallback)
        else:
            a = next(it)
            rel = PurePath(os.path.relpath(a, root) if root is not None else a)
            parts = list(rel.parts[1:] if rel.anchor else rel.parts) or [fallback]
            parts[-1] = os.path.splitext(parts[-1])[0] or parts[-1]
            base = encode_relative(parts)
        stem, n = base, 1
        while stem.casefold() in used:
            n += 1
            stem = f"{base}{_DUP}{n}"
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def output_files(stem: str, kinds: Sequence[str] = OUTPUT_KINDS[:3]) -> dict[str, str]:
    """``{"heatmap": "<stem>_heatmap.png", ...}`` for the given kinds."""
    for k in kinds:
        if k not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {k!r}; one of {', '.join(OUTPUT_KINDS)}")
    return {k: f"{stem}_{k}.png" for k in kinds}
