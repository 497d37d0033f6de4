"""The Gradio Blocks app: ``build_app()`` builds it, ``launch()`` serves it (``ccad app``, ``python app.py``).

Layout: a model bar (model list, card, load from folder / zip / Hugging Face Hub) above five
tabs: Inspect, Feature bank, Train, Evaluate and DAGM review. All computation is a call into
``ccad`` through :class:`app.controller.AppController`. Each tab's components and events are a
module of :mod:`app.tabs` (``layout`` / ``wire``); this module composes them and serves the app.
Every interactive component has a stable ``elem_id`` (used by the browser tests and by users'
own automation).
"""
from __future__ import annotations

import os
import warnings
from types import SimpleNamespace
from typing import Any, Optional

import gradio as gr

from .controller import AppController
from .state import SAMPLES_DIR, default_state_dir
from .tabs import bank, evaluation, inspection, models, training
from .tabs.common import INSPECT_CONCURRENCY, new_browser_id

__all__ = ["CONCURRENCY_LIMIT", "INSPECT_CONCURRENCY", "MAX_FILE_SIZE", "QUEUE_MAX_SIZE", "build_app", "launch"]

MAX_FILE_SIZE = "200mb"
CONCURRENCY_LIMIT = 2  # the default queue group; model calls have their own (INSPECT_CONCURRENCY, app.tabs.common)
# Waiting events (all groups) beyond this are refused with "queue full": generous for ~20-30 browser
# sessions, each with at most an inspection, a threshold change and a timer tick pending.
QUEUE_MAX_SIZE = 128

# (title, id, module): the tabs before DAGM review; element id ``tab-<id>``
TABS = (("Inspect", "inspect", inspection), ("Feature bank", "bank", bank), ("Train", "train", training),
        ("Evaluate", "evaluate", evaluation))

CSS = """
.verdict-box textarea {font-weight: 700; font-size: 1.15em;}
#inspect-panels .image-container img {object-fit: contain;}
"""


def _import_review() -> tuple[Any, Optional[str], Optional[str]]:
    """The DAGM review tab (app/tabs/review.py over app/review.py): (builder, shortcuts js, import error)."""
    try:
        from .tabs.review import REVIEW_SHORTCUTS_JS, build_review_tab
    except Exception as exc:  # the rest of the app must work without it
        return None, None, f"{type(exc).__name__}: {exc}"
    return build_review_tab, REVIEW_SHORTCUTS_JS, None


def _mount_review(builder: Any, error: Optional[str], controller: AppController) -> None:
    if builder is None:
        gr.Markdown(f"The DAGM review screen is not available in this build ({error}).")
        return
    try:
        builder(lambda: controller.registry.detector(), str(controller.data_root),
                str(controller.state_dir / "review"), models=controller.registry.names,
                get_model=controller.registry.detector, active_name=lambda: controller.registry.active)
    except Exception as exc:
        gr.Markdown(f"The DAGM review screen could not be built ({type(exc).__name__}: {exc}).")


def build_app(controller: Optional[AppController] = None, data_root: str | os.PathLike = ".",
              state_dir: Optional[str | os.PathLike] = None, model: Optional[str] = None,
              load_default: bool = True) -> gr.Blocks:
    """Build the app. With no ``controller`` one is made for ``data_root`` / ``state_dir`` and the
    bundled demo model (or ``model``) is loaded; a missing demo is reported, not fatal."""
    if controller is None:
        controller = AppController(data_root=data_root, state_dir=state_dir)
    if load_default and not controller.registry.names():
        controller.load_startup(model)
    c = controller

    review_builder, review_js, review_error = _import_review()
    with warnings.catch_warnings():
        # Gradio 6 prefers these in launch(); given here they also apply to a plain demo.launch() (Spaces)
        warnings.simplefilter("ignore", UserWarning)
        demo = gr.Blocks(title="ccad anomaly inspection", theme=gr.themes.Soft(), css=CSS, js=review_js)

    with demo:
        gr.Markdown("# ccad · visual anomaly inspection\nLearn *good* from good images; flag what differs. "
                    "Diffusion detectors (CCAD V/C/F, DeCo-Diff, D3AD, GLAD) and a PatchCore baseline, trained here.")
        parts = [models.layout(c)]
        batch_state = gr.State(None)
        # this browser's id (its local storage, so it survives a reload): jobs belong to the browser
        # that started them; other sessions see them read-only
        browser_id = gr.BrowserState("", storage_key="ccad-browser-id")

        with gr.Tabs(elem_id="tabs"):
            for title, tab_id, tab in TABS:
                with gr.Tab(title, id=tab_id, elem_id=f"tab-{tab_id}"):
                    parts.append(tab.layout(c))
            with gr.Tab("DAGM review", id="review", elem_id="tab-review"):
                _mount_review(review_builder, review_error, c)

        # every component by name (a name used twice is a TypeError here), then each tab's events
        ui = SimpleNamespace(batch_state=batch_state, browser_id=browser_id,
                             **{k: v for p in parts for k, v in vars(p).items()})
        ins = inspection.wire(c, ui)
        bar = models.wire(c, ui, ins)
        bank.wire(c, ui, bar)
        training.wire(c, ui, bar)
        evaluation.wire(c, ui)

        def on_load(selected: Optional[str]) -> list[Any]:
            return bar.model_choices(selected)

        demo.load(on_load, [ui.model_dd], bar.choice_outputs)
        demo.load(new_browser_id, [browser_id], [browser_id])

    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_MAX_SIZE)
    demo.ccad_controller = c  # type: ignore[attr-defined]
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, data_root: str | os.PathLike = ".",
           model: Optional[str] = None, share: bool = False, state_dir: Optional[str | os.PathLike] = None,
           demo: Optional[gr.Blocks] = None, **launch_kwargs: Any) -> Any:
    """Serve the app (``ccad app``): uploads limited to ``MAX_FILE_SIZE``, users queued. Its state
    goes to ``state_dir`` (default :func:`app.state.default_state_dir`: ``$CCAD_STATE_DIR`` or the
    user data folder, never the checkout)."""
    if demo is None:
        demo = build_app(data_root=data_root, state_dir=default_state_dir(state_dir), model=model)
    allowed = [str(SAMPLES_DIR)]
    controller = getattr(demo, "ccad_controller", None)
    if controller is not None:  # the Inspect tab's downloads are written there (the state folder is
        allowed.append(str(controller.state_dir / "downloads"))  # neither the temp folder nor the cwd)
    allowed += list(launch_kwargs.pop("allowed_paths", None) or [])
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                       allowed_paths=allowed, **launch_kwargs)
