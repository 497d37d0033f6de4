"""The DAGM review tab's components and wiring (the callbacks are :class:`app.review.ReviewUI`).

``build_review_tab(get_detector, data_root, state_dir)`` creates the components inside an open
``gr.Blocks``/``gr.Tab`` context. ``REVIEW_SHORTCUTS_JS`` is the keyboard-shortcut snippet the app
passes to ``gr.Blocks(js=...)`` (or ``launch(js=...)``): n / → next, p / ← previous, a accept,
r reject, ignored while typing in an input.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from ..review import AUTO, EDITOR_BRUSH, EDITOR_CANVAS, EDITOR_HEIGHT, PANEL_HEIGHT, ReviewUI

__all__ = ["ELEM_IDS", "REVIEW_SHORTCUTS_JS", "build_review_tab"]

ELEM_IDS = {
    "folder": "review-folder", "load": "review-load", "status": "review-status",
    "accept": "review-accept", "reject": "review-reject", "save_edit": "review-save-edit",
    "next": "review-next", "prev": "review-prev", "progress": "review-progress",
    "item": "review-item", "original": "review-panel-original", "ellipse": "review-panel-ellipse",
    "mask": "review-panel-mask", "heatmap": "review-panel-heatmap", "opacity": "review-opacity",
    "mode": "review-mode", "editor": "review-editor", "export": "review-export",
    "export_file": "review-export-file", "advance": "review-advance", "model": "review-model",
}

REVIEW_SHORTCUTS_JS = """
() => {
  if (window.__ccadReviewShortcuts) { return; }
  window.__ccadReviewShortcuts = true;
  const keys = {"n": "review-next", "ArrowRight": "review-next", "p": "review-prev",
                "ArrowLeft": "review-prev", "a": "review-accept", "r": "review-reject"};
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.repeat) { return; }
    const t = ev.target;
    const tag = t && t.tagName ? t.tagName.toLowerCase() : "";
    if (tag === "input" || tag === "textarea" || tag === "select" || (t && t.isContentEditable)) { return; }
    const key = ev.key && ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
    const id = keys[key];
    if (!id) { return; }
    const el = document.getElementById(id);
    if (!el || el.offsetParent === null) { return; }  /* the review tab is not shown */
    const button = el.tagName === "BUTTON" ? el : el.querySelector("button");
    if (!button || button.disabled) { return; }
    ev.preventDefault();
    button.click();
  });
}
"""



def build_review_tab(get_detector: Callable[[], Any], data_root: str | os.PathLike[str],
                     state_dir: str | os.PathLike[str], models: Optional[Callable[[], list[str]]] = None,
                     get_model: Optional[Callable[[str], Any]] = None,
                     active_name: Optional[Callable[[], Optional[str]]] = None) -> ReviewUI:
    """Create the DAGM review components inside the current ``gr.Blocks``/``gr.Tab`` context.

    ``get_detector()`` returns the loaded ``AnomalyDetector`` or None (then the heatmap panel
    shows a note and proposals use the image cue only); folders typed by the user are confined
    to ``data_root``; decisions live under ``state_dir``. Returns the :class:`ReviewUI`.
    """
    import gradio as gr

    ui = ReviewUI(get_detector, data_root, state_dir, models=models, get_model=get_model,
                  active_name=active_name)
    ids = ELEM_IDS
    key_state = gr.State(None)
    gr.Markdown("Review tight-mask proposals for DAGM's ellipse labels. Keys: **n**/→ next, "
                "**p**/← previous, **a** accept, **r** reject.")
    with gr.Row():
        folder = gr.Textbox(label=f"DAGM folder (inside {ui.data_root})", value=ui.last_folder,
                            elem_id=ids["folder"], scale=4)
        load = gr.Button("Load", variant="primary", elem_id=ids["load"], scale=1)
        model = gr.Dropdown(ui.model_choices(), value=AUTO, label="Heatmap and proposals from",
                            elem_id=ids["model"], scale=3, interactive=True)
    status = gr.Markdown(elem_id=ids["status"])
    with gr.Row():
        original = gr.Image(label="Original", interactive=False, format="png", height=PANEL_HEIGHT,
                            elem_id=ids["original"])
        ellipse = gr.Image(label="Ellipse label", interactive=False, format="png", height=PANEL_HEIGHT,
                           elem_id=ids["ellipse"])
        mask = gr.Image(label="Proposed / edited mask", interactive=False, format="png", height=PANEL_HEIGHT,
                        elem_id=ids["mask"])
        heatmap = gr.Image(label="Model heatmap", interactive=False, format="png", height=PANEL_HEIGHT,
                           elem_id=ids["heatmap"])
    with gr.Row():
        opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity",
                            elem_id=ids["opacity"])
        mode = gr.Radio(["outline", "fill"], value="outline", label="Overlay", elem_id=ids["mode"])
        advance = gr.Checkbox(value=True, label="Go to the next image after a decision",
                              elem_id=ids["advance"])
    with gr.Row():
        prev_b = gr.Button("◀ Previous (p)", elem_id=ids["prev"])
        accept_b = gr.Button("Accept (a)", variant="primary", elem_id=ids["accept"])
        reject_b = gr.Button("Reject (r)", variant="stop", elem_id=ids["reject"])
        next_b = gr.Button("Next (n) ▶", elem_id=ids["next"])
    with gr.Row():
        progress = gr.Markdown("0 / 0 reviewed", elem_id=ids["progress"])
        item = gr.Markdown(elem_id=ids["item"])
    with gr.Accordion("Edit the mask (brush adds, eraser removes)", open=False):
        editor = gr.ImageEditor(label="Mask editor", type="numpy", image_mode="RGBA",
                                sources=(), transforms=(), format="png",
                                brush=gr.Brush(colors=["#ff0000"], default_color="#ff0000",
                                               color_mode="fixed", default_size=EDITOR_BRUSH),
                                eraser=gr.Eraser(default_size=EDITOR_BRUSH),
                                layers=gr.LayerOptions(allow_additional_layers=False),
                                canvas_size=EDITOR_CANVAS, height=EDITOR_HEIGHT, elem_id=ids["editor"])
        save_b = gr.Button("Save edit", elem_id=ids["save_edit"])
    with gr.Row():
        export_b = gr.Button("Export masks + CSV (zip)", elem_id=ids["export"])
        export_f = gr.File(label="Download", interactive=False, elem_id=ids["export_file"])

    view_out = [status, original, ellipse, mask, heatmap, editor, progress, item]
    look = [opacity, mode]
    load.click(ui.load, [folder, *look], [key_state, *view_out])
    folder.submit(ui.load, [folder, *look], [key_state, *view_out])
    prev_b.click(lambda k, o, m: ui.navigate(k, -1, o, m), [key_state, *look], view_out)
    next_b.click(lambda k, o, m: ui.navigate(k, 1, o, m), [key_state, *look], view_out)
    accept_b.click(ui.accept, [key_state, *look, advance], view_out)
    reject_b.click(ui.reject, [key_state, *look, advance], view_out)
    save_b.click(ui.save_edit, [key_state, editor, *look, advance], view_out)
    # Restyling does not touch the editor (it would drop an edit in progress).
    restyle_out = [status, original, ellipse, mask, heatmap, progress, item]

    def restyle(k: Optional[str], o: float, m: str) -> list[Any]:
        v = ui.views(k, o, m)
        return v[:5] + v[6:]

    opacity.release(restyle, [key_state, *look], restyle_out)
    mode.change(restyle, [key_state, *look], restyle_out)
    export_b.click(ui.export, [key_state], [export_f, status])
    model.focus(lambda: gr.update(choices=ui.model_choices()), None, [model])
    model.input(lambda k, ch, o, m: ui.choose_model(k, ch, o, m), [key_state, model, *look], view_out)
    return ui
