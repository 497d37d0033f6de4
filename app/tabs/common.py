"""What every tab's UI shares: the inspection queue group, the error line, collecting a layout's
components by name, and the good-image inputs (a server folder or a zip)."""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..errors import UserError, hide_paths

# Model calls (Inspect button, sample click, Inspect folder) share one queue group run one at a time:
# with many users they are served strictly in arrival order (Gradio's queue is FIFO per group), a model
# never runs twice at once (no CPU-thread / GPU-memory contention, no thread-safety question), and
# requests beyond the limit wait in the queue instead of failing. Light events (threshold, table
# rows, timer ticks) keep the default group of CONCURRENCY_LIMIT, so they never wait behind inspections.
# CCAD_APP_INSPECT_CONCURRENCY raises it (e.g. a GPU that serves two batches at once).
INSPECT_CONCURRENCY = int(os.environ.get("CCAD_APP_INSPECT_CONCURRENCY", "1"))


def new_browser_id(current: Any) -> str:
    """The browser's id (kept in its local storage by a ``gr.BrowserState``): ``current`` when it has
    one, else a new random one. A background job belongs to the browser that started it."""
    import secrets

    text = str(current or "")
    return text if len(text) >= 16 else secrets.token_hex(16)


def error_text(exc: BaseException) -> str:
    """The line a callback shows for an error: a :class:`UserError` as is, anything else named; no
    server path of an upload or of the app's folders (:func:`app.errors.hide_paths`)."""
    if isinstance(exc, UserError):
        return f"⚠️ {hide_paths(str(exc))}"
    return f"⚠️ Unexpected error ({type(exc).__name__}): {hide_paths(str(exc))}"


def blocks(scope: dict[str, Any]) -> SimpleNamespace:
    """The Gradio blocks among a layout function's locals, by variable name."""
    return SimpleNamespace(**{k: v for k, v in scope.items() if isinstance(v, gr.blocks.Block)})


def good_images_inputs(data_root: Any, prefix: str) -> tuple[gr.Textbox, gr.File]:
    """A folder box (inside ``data_root``) and a zip upload for a set of good images; element ids
    ``<prefix>-folder`` and ``<prefix>-zip``."""
    folder = gr.Textbox(label=f"Folder of good images (inside {data_root})", elem_id=f"{prefix}-folder")
    zip_file = gr.File(label="...or upload a zip of good images", file_types=[".zip"], type="filepath",
                       elem_id=f"{prefix}-zip")
    return folder, zip_file


FREE_SLIDERS: set[str] = set()  # elem_ids of the sliders whose number box takes any finite value


def _free_preprocess(original: Any) -> Any:
    import math

    def preprocess(self: gr.Slider, payload: Any) -> Any:
        if getattr(self, "elem_id", None) not in FREE_SLIDERS:
            return original(self, payload)
        try:
            value = float(payload)
        except (TypeError, ValueError):
            raise gr.Error(f"The threshold must be a number, got {payload!r}; nothing changed.") from None
        if not math.isfinite(value):
            raise gr.Error(f"The threshold must be a finite number, got {payload!r}; nothing changed.")
        return value

    preprocess.ccad_free = True  # type: ignore[attr-defined]
    return preprocess


def threshold_slider(**kwargs: Any) -> gr.Slider:
    """The threshold slider: its number box takes any finite value, also outside the slider's range
    (the callback widens the range to it, :func:`widened_range`); a value that is no finite number is
    refused with a message, never Gradio's bare range error. Gradio rebuilds a session's slider from
    its class on every update, so the check is Gradio's slider's own, replaced for the ``elem_id``s
    in :data:`FREE_SLIDERS` only (a subclass would make Gradio write a ``.pyi`` beside this file)."""
    FREE_SLIDERS.add(str(kwargs["elem_id"]))
    if not getattr(gr.Slider.preprocess, "ccad_free", False):
        gr.Slider.preprocess = _free_preprocess(gr.Slider.preprocess)  # type: ignore[method-assign]
    return gr.Slider(**kwargs)


def widened_range(rng: dict[str, float], value: float) -> Any:
    """A slider update that widens the range ``rng`` (minimum / maximum / step) to take ``value``
    (no update when it is inside)."""
    if rng["minimum"] <= value <= rng["maximum"]:
        return gr.update()
    lo, hi = min(rng["minimum"], value), max(rng["maximum"], value)
    return gr.update(minimum=lo, maximum=hi, step=float(f"{(hi - lo) / 1000:.2g}") or rng["step"])

