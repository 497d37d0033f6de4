"""One session's inspection results (:class:`Batch`) and the text helpers that show them: times,
training-domain notes, file names and left-out files."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


@dataclass
class Batch:
    """The predictions of the last inspection in one session (labelled at the model's threshold;
    the UI re-labels them with ``with_threshold`` without re-running the model)."""

    model: str
    predictions: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    selected: int = 0
    compared: dict[str, "Batch"] = field(default_factory=dict)  # the same images through other models

    def at(self, threshold: Optional[float]) -> list[Any]:
        if threshold is None or not math.isfinite(float(threshold)):
            return list(self.predictions)
        return [p.with_threshold(float(threshold)) for p in self.predictions]


TABLE_HEADERS = ["#", "file", "score", "verdict", "seconds", "training domain"]
AGREE_HEADER = "verdicts agree"


def seconds_text(v: Any) -> str:
    """An image's own time, to 3 significant digits (rows of one batch differ in the digits shown)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return f"{x:.3g} s" if math.isfinite(x) else "-"


def domain_text(p: Any, short: bool = False) -> str:
    """Whether an image's features lie inside the model's training distribution, from the engine's
    ``Prediction.out_of_domain`` / ``domain_distance`` (the bank's nearest-neighbour distance
    against that of held-out good images); empty when the model does not say."""
    ood = getattr(p, "out_of_domain", None)
    if ood is None:
        return ""
    d, lim = getattr(p, "domain_distance", None), getattr(p, "domain_limit", None)
    try:
        dist = f" (feature distance {float(d):.3g}" if d is not None and math.isfinite(float(d)) else ""
        if dist and lim is not None and math.isfinite(float(lim)):
            dist += f"; good images up to {float(lim):.3g}"
        dist += ")" if dist else ""
    except (TypeError, ValueError):
        dist = ""
    if bool(ood):
        if short:
            return "OUT OF DOMAIN" + (f" ({float(d):.3g} > {float(lim):.3g})" if dist and lim is not None else dist)
        return ("OUT OF DOMAIN: unlike the model's training images" + dist
                + "; its score and verdict mean little for this image")
    return "in domain" + dist


def verdict_text(p: Any) -> str:
    """The verdict box: GOOD / ANOMALOUS / ..., or OUT OF DOMAIN first when the image is unlike the
    model's good images (the model's own verdict beside it, never ANOMALOUS with the warning
    elsewhere; issue 21 item 2)."""
    verdict = str(p.verdict).upper()
    if getattr(p, "out_of_domain", None):
        return f"OUT OF DOMAIN (score {float(p.score):.4g}; the model would say {verdict}, but it was not built on " \
               f"images like this one)"
    return verdict


def name_list(items: Sequence[tuple[str, str]], limit: int = 10) -> str:
    """``a.gif (unsupported file type .gif), ...`` for ``(name, reason)`` pairs, at most ``limit``."""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(f"{n} ({why})" for n, why in items[:limit]) + more


def left_out_files(det: Any) -> list[tuple[str, str]]:
    """``(file name, reason)`` of the files a fitted or trained detector's data left out (info.json
    ``skipped``: unsupported extensions and unreadable images)."""
    info = getattr(det, "info", None) or {}
    return [(Path(str(s.get("path", ""))).name, str(s.get("reason", ""))) for s in info.get("skipped") or []]


def relative_name(path: str | os.PathLike, base: Optional[str | os.PathLike] = None) -> str:
    """``path`` relative to ``base`` (posix separators) when it lies inside it, else its file name;
    a byte of the name that is not UTF-8 is shown as ``\\xff`` (the page is UTF-8 text)."""
    from ccad.data.naming import display_name

    p = Path(path)
    if base is not None:
        try:
            return display_name(p.resolve().relative_to(Path(base).resolve()).as_posix())
        except ValueError:
            pass
    return display_name(p.name)


def unique_names(names: Sequence[str]) -> list[str]:
    """The names, with a repeated one numbered (``000.png``, ``000.png (2)``) so rows stay distinct."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def to_uint8(img: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """An image in [0, 1] (or already uint8) as uint8, for the UI."""
    if img is None:
        return None
    if img.dtype == np.uint8:
        return img
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
