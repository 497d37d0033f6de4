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
import threading
import time
import warnings
import weakref
from types import SimpleNamespace
from typing import Any, Optional

import gradio as gr

from .controller import AppController
from .paths import trim_file_cache
from .state import SAMPLES_DIR, default_state_dir
from .tabs import bank, evaluation, inspection, models, training
from .tabs.common import INSPECT_CONCURRENCY, new_browser_id

__all__ = ["CONCURRENCY_LIMIT", "INSPECT_CONCURRENCY", "MAX_FILE_SIZE", "QUEUE_MAX_SIZE", "build_app", "launch"]

MAX_FILE_SIZE = "200mb"
CONCURRENCY_LIMIT = 2  # the default queue group; model calls have their own (INSPECT_CONCURRENCY, app.tabs.common)
# Waiting events (all groups) beyond this are refused with "queue full": generous for ~20-30 browser
# sessions, each with at most an inspection, a threshold change and a timer tick pending.
QUEUE_MAX_SIZE = 128

CACHE_MAX_AGE_S = 24 * 3600  # Gradio's cached uploads / served files older than this are removed hourly


def start_cache_janitor(demo: gr.Blocks, max_bytes: Optional[int] = None, every_s: Optional[float] = None,
                        grace_s: Optional[float] = None) -> threading.Thread:
    """A daemon thread that keeps ``demo``'s Gradio file cache (every upload and every file it
    served, :func:`app.paths.trim_file_cache`) under ``max_bytes`` (``$CCAD_APP_UPLOAD_CACHE_MB``,
    default 1024 MB), oldest first, checked every ``every_s`` seconds (``$CCAD_APP_CACHE_CHECK_S``,
    default 30); files younger than ``grace_s`` (``$CCAD_APP_CACHE_GRACE_S``, default 120) stay."""
    env = os.environ.get
    budget = int(max_bytes if max_bytes is not None else float(env("CCAD_APP_UPLOAD_CACHE_MB", "1024")) * 1024**2)
    every = float(every_s if every_s is not None else env("CCAD_APP_CACHE_CHECK_S", "30"))
    grace = float(grace_s if grace_s is not None else env("CCAD_APP_CACHE_GRACE_S", "120"))
    ref = weakref.ref(demo)

    def loop() -> None:
        while True:
            time.sleep(every)
            blocks = ref()
            if blocks is None:
                return
            try:
                trim_file_cache(list(blocks.temp_file_sets), budget, grace)
            except Exception:  # noqa: BLE001 - a clean-up never takes the server down
                pass
            del blocks

    thread = threading.Thread(target=loop, name="ccad-cache-janitor", daemon=True)
    thread.start()
    return thread


# (title, id, module): the tabs before DAGM review; element id ``tab-<id>``
TABS = (("Inspect", "inspect", inspection), ("Feature bank", "bank", bank), ("Train", "train", training),
        ("Evaluate", "evaluate", evaluation))

CSS = """
.verdict-box textarea {font-weight: 700; font-size: 1.15em;}
#inspect-panels .image-container img {object-fit: contain;}
#inspect-panels, #compare-panels {justify-content: flex-start !important; gap: 16px !important;}
#inspect-panels > div, #compare-panels > div {flex: 0 0 calc(20% - 12.8px) !important; margin: 0 !important;
    min-width: 0 !important;}
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
        # Gradio's own clean-up of its file cache (uploads, served files): hourly, files older than
        # CACHE_MAX_AGE_S, and everything when the server stops; the byte budget: start_cache_janitor
        demo = gr.Blocks(title="ccad anomaly inspection", theme=gr.themes.Soft(), css=CSS, js=review_js,
                         delete_cache=(3600, CACHE_MAX_AGE_S))

    with demo:
        gr.Markdown("# ccad · visual anomaly inspection\nLearn *good* from good images; flag what differs. "
                    "Diffusion detectors (CCAD V/C/F, DeCo-Diff, D3AD, GLAD) and a PatchCore baseline, trained here.")
        parts = [models.layout(c)]
        batch_state = gr.State(None)
        # this browser's id (its local storage, so it survives a reload): jobs belong to the browser
        # that started them; other sessions see them read-only
        browser_id = gr.BrowserState("", storage_key="ccad-browser-id")

        tab_blocks: dict[str, gr.Tab] = {}
        with gr.Tabs(elem_id="tabs"):
            for title, tab_id, tab in TABS:
                with gr.Tab(title, id=tab_id, elem_id=f"tab-{tab_id}") as tab_blocks[tab_id]:
                    parts.append(tab.layout(c))
            with gr.Tab("DAGM review", id="review", elem_id="tab-review"):
                _mount_review(review_builder, review_error, c)

        # every component by name (a name used twice is a TypeError here), then each tab's events
        ui = SimpleNamespace(batch_state=batch_state, browser_id=browser_id, train_tab=tab_blocks["train"],
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
        # the line under the model list says how the page's model in use was loaded (never a stale line)
        demo.load(lambda sel: c.model_status_line(sel if sel in c.registry.names() else c.registry.active),
                  [ui.model_dd], [ui.model_status])

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
    if controller is not None:
        print(f"ccad app: serving the folders under {controller.data_root} (--data-root); its state (runs, "
              f"uploads being read, downloads) goes to {controller.state_dir}", flush=True)
    start_cache_janitor(demo)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                       allowed_paths=allowed, **launch_kwargs)
