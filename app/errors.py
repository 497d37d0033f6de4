"""The one exception the app's callbacks raise (a problem with what the user asked for), and the
rule that keeps server paths out of what the page shows (issue 21 item 3)."""
from __future__ import annotations

import os
import re
import tempfile
from typing import Iterable, Mapping, Optional


class UserError(ValueError):
    """A problem with what the user asked for; its message is shown in the UI as is."""


#: Server folders whose paths never reach the page: the app registers its state folder; Gradio's
#: upload folder is always included (:func:`private_roots`).
PRIVATE_ROOTS: list[str] = []


def register_private_root(path: str | os.PathLike) -> None:
    """Keep ``path`` (and everything under it) out of the messages the page shows."""
    text = os.path.realpath(os.fspath(path))
    if text not in PRIVATE_ROOTS:
        PRIVATE_ROOTS.append(text)


def private_roots() -> list[str]:
    """The folders :func:`hide_paths` hides: Gradio's upload folder and the registered ones (real
    paths and as given), longest first."""
    roots = set()
    gradio = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")
    for r in [gradio, *PRIVATE_ROOTS]:
        roots.add(os.path.abspath(r))
        roots.add(os.path.realpath(r))
    return sorted((r for r in roots if len(r) > 1), key=len, reverse=True)


def hide_paths(text: str, named: Optional[Mapping[str, str]] = None,
               roots: Optional[Iterable[str]] = None) -> str:
    """``text`` with every server path of an upload or of the app's own folders replaced by what a
    user knows: a path in ``named`` by its name (the file as uploaded, its path inside a zip), a path
    under a private root (:func:`private_roots`) by what follows the root's per-request folder
    (``/tmp/gradio/<hash>/part.png`` -> ``part.png``; ``<state>/uploads/model-x/m/config.json`` ->
    ``m/config.json``; a run folder ``<state>/runs/train-1`` -> ``runs/train-1``)."""
    out = str(text)
    for path, shown in sorted((named or {}).items(), key=lambda kv: len(kv[0]), reverse=True):
        if path:
            out = out.replace(str(path), str(shown))
    for root in (list(roots) if roots is not None else private_roots()):
        pattern = re.compile(re.escape(root.rstrip("/")) + r"((?:/[^\s'\"():,;]+)*)/?")

        def short(m: re.Match[str]) -> str:
            parts = [p for p in m.group(1).split("/") if p]
            if len(parts) >= 2 and parts[0] in ("uploads", "downloads"):
                parts = parts[2:]  # the app's per-request folder: uploads/<request>/...
            elif len(parts) >= 2 and parts[0] not in ("runs", "review"):
                parts = parts[1:]  # Gradio's <hash>/<file>
            return "/".join(parts) or "the upload"

        out = pattern.sub(short, out)
    return out
