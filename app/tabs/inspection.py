"""The Inspect tab: upload / folder / sample inputs, the four panels, threshold, histogram, batch
table, downloads and the side-by-side comparison."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import gradio as gr

from ..batch import TABLE_HEADERS, Batch
from ..controller import AppController
from ..errors import UserError
from .common import INSPECT_CONCURRENCY, blocks, error_text, threshold_slider, widened_range

PANEL_HEIGHT = 300
TABLE_TYPES = ["number", "str", "number", "str", "str", "str"]
COMPARE_TYPES = ["number", "str", "number", "str", "number", "str", "str", "str", "str"]


def _panels(prefix: str, slider_label: str) -> tuple[Any, ...]:
    """The five image panels of one model (original, heatmap, overlay, reconstruction, slider),
    created in the current row, with element ids ``{prefix}-original`` and so on."""
    images = [gr.Image(label=label, height=PANEL_HEIGHT, format="png", interactive=False,
                       elem_id=f"{prefix}-{key}")
              for key, label in (("original", "Original"), ("heatmap", "Heatmap"), ("overlay", "Overlay"),
                                 ("reconstruction", "Reconstruction"))]
    slider = gr.ImageSlider(label=slider_label, height=PANEL_HEIGHT, format="png", interactive=False,
                            type="numpy", elem_id=f"{prefix}-slider")
    return (*images, slider)


def layout(c: AppController) -> SimpleNamespace:
    """The components (built inside the caller's ``gr.Tab``/``gr.Blocks``), by name."""
    gallery = c.gallery_items()
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Upload one or many images (or a zip of them)", file_count="multiple",
                             file_types=["image", ".zip"], elem_id="inspect-upload", type="filepath")
            run_btn = gr.Button("Inspect", variant="primary", elem_id="inspect-run")
            with gr.Row():
                inspect_folder_tb = gr.Textbox(label=f"...or a folder of images (inside {c.data_root})",
                                               elem_id="inspect-folder", scale=3)
                inspect_folder_btn = gr.Button("Inspect folder", elem_id="inspect-folder-run", scale=1)
        with gr.Column(scale=3):
            sample_gallery = gr.Gallery(value=gallery, label="Samples (click one to inspect it)",
                                        columns=6, height=180, allow_preview=False,
                                        interactive=False, elem_id="inspect-samples")
    inspect_msg = gr.Markdown("", elem_id="inspect-status")
    with gr.Row(elem_id="inspect-panels", equal_height=True):
        p_orig, p_heat, p_over, p_rec, p_slider = _panels("panel", "Original ↔ reconstruction (drag)")
    with gr.Row():
        score_tb = gr.Textbox(label="Image score", interactive=False, elem_id="inspect-score")
        verdict_tb = gr.Textbox(label="Verdict", interactive=False, elem_id="inspect-verdict",
                                elem_classes=["verdict-box"])
        time_tb = gr.Textbox(label="Time taken", interactive=False, elem_id="inspect-time",
                             info="this image's own: its read, resize and post-processing, plus its "
                                  "share of the batched model pass")
        file_tb = gr.Textbox(label="File", interactive=False, elem_id="inspect-file")
        model_tb = gr.Textbox(label="Scored by (model)", interactive=False, elem_id="inspect-model")
        domain_tb = gr.Textbox(label="Training domain", interactive=False, elem_id="inspect-domain")
    # the comparison model's panels directly under the first model's, column by column (issue 21): in
    # both rows the image, heatmap and overlay come first and every panel is a fifth of the row wide
    # (main.CSS), so they line up whether or not each model has a reconstruction
    with gr.Group(visible=False, elem_id="compare-group") as compare_group:
        with gr.Row(equal_height=True, elem_id="compare-panels"):
            q_orig, q_heat, q_over, q_rec, q_slider = _panels(
                "compare", "Original ↔ reconstruction (comparison model)")
        with gr.Row():
            q_score = gr.Textbox(label="Score", interactive=False, elem_id="compare-score")
            q_verdict = gr.Textbox(label="Verdict", interactive=False, elem_id="compare-verdict")
            q_time = gr.Textbox(label="Time taken", interactive=False, elem_id="compare-time")
            q_domain = gr.Textbox(label="Training domain", interactive=False, elem_id="compare-domain")
    rng = c.threshold_range(c.registry.active)
    with gr.Row():
        with gr.Column(scale=2):
            thr = threshold_slider(minimum=rng["minimum"], maximum=rng["maximum"], value=rng["value"],
                            step=rng["step"], label="Threshold (score above it = anomalous)",
                            elem_id="inspect-threshold")
            reset_thr = gr.Button("Reset to the calibrated threshold", size="sm",
                                  elem_id="inspect-threshold-reset")
            fa_md = gr.Markdown(c.false_alarm_text(c.registry.active, rng["value"]),
                                elem_id="inspect-false-alarms")
        with gr.Column(scale=3):
            hist = gr.Plot(c.histogram(c.registry.active, None, rng["value"]), label="Scores",
                           elem_id="inspect-histogram")
    table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, label=(
        "Batch (worst first; click a row to show it; click a header to sort)"),
        elem_id="inspect-table", datatype=TABLE_TYPES)
    agree_md = gr.Markdown("", elem_id="compare-agreement")
    downloads = gr.File(label="Downloads: heatmap, overlay, mask (selected image) and the batch CSV",
                        file_count="multiple", interactive=False, elem_id="inspect-downloads")
    return blocks(locals())


def wire(c: AppController, ui: SimpleNamespace) -> SimpleNamespace:
    """The tab's events; returns what the model bar re-uses (show / clear a batch, the comparison)."""
    agree_md, batch_state, compare_dd = ui.agree_md, ui.batch_state, ui.compare_dd
    domain_tb, downloads, fa_md, file_tb, hist = ui.domain_tb, ui.downloads, ui.fa_md, ui.file_tb, ui.hist
    inspect_folder_btn, inspect_folder_tb, inspect_msg = ui.inspect_folder_btn, ui.inspect_folder_tb, ui.inspect_msg
    model_dd, model_tb, p_heat, p_orig, p_over = ui.model_dd, ui.model_tb, ui.p_heat, ui.p_orig, ui.p_over
    p_rec, p_slider, q_domain, q_heat, q_orig = ui.p_rec, ui.p_slider, ui.q_domain, ui.q_heat, ui.q_orig
    q_over, q_rec, q_score, q_slider, q_time = ui.q_over, ui.q_rec, ui.q_score, ui.q_slider, ui.q_time
    q_verdict, reset_thr, run_btn, sample_gallery = ui.q_verdict, ui.reset_thr, ui.run_btn, ui.sample_gallery
    score_tb, table, thr, time_tb, upload = ui.score_tb, ui.table, ui.thr, ui.time_tb, ui.upload
    verdict_tb = ui.verdict_tb

    inspect_outputs = [p_orig, p_rec, p_heat, p_over, p_slider, score_tb, verdict_tb, time_tb, file_tb,
                       model_tb, domain_tb]

    def _slider(v: dict[str, Any]) -> Any:
        """The original / reconstruction slider, hidden for a method without a reconstruction (it
        would compare the image with a grey panel; issue 21 item 3)."""
        shown = v.get("has_reconstruction", True)
        return gr.update(value=(v["original"], v["reconstruction"]) if v["original"] is not None and shown else None,
                         visible=shown)

    def _recon(v: dict[str, Any]) -> Any:
        return gr.update(value=v["reconstruction"] if v.get("has_reconstruction", True) else None,
                         label=v["recon_label"], visible=v.get("has_reconstruction", True))

    def panel_updates(batch: Optional[Batch], t: Optional[float]) -> list[Any]:
        v = c.panels(batch, None, t)
        return [v["original"], _recon(v), v["heatmap"],
                v["overlay"], _slider(v), v["score"], v["verdict"], v["time"], v.get("name", ""),
                v.get("model", ""), v.get("domain", "")]

    def table_updates(other: Optional[str], batch: Optional[Batch], t: Optional[float]) -> Any:
        """The batch table: alone, the batch worst first; with a comparison model, ONE table with per
        image both scores, both verdicts and whether they agree (issue 21)."""
        import pandas as pd

        head, rows = [], []
        if other and batch is not None:
            try:
                head, rows = c.compare_table(other, batch, t)
            except UserError:
                head, rows = [], []
        if rows:
            return gr.update(value=pd.DataFrame(rows, columns=head), label=c.batch_label(batch, other),
                             datatype=COMPARE_TYPES)
        return gr.update(value=pd.DataFrame(c.table_rows(batch, t), columns=TABLE_HEADERS),
                         label=c.batch_label(batch), datatype=TABLE_TYPES)

    def compare_updates(other: Optional[str], batch: Optional[Batch], t: Optional[float] = None) -> list[Any]:
        try:
            v = c.compare(other, batch)
            agree = c.agreement(other, batch, t)["text"]
        except UserError as exc:
            gr.Warning(str(exc))
            v, agree = c.panels(None), f"⚠️ {exc}"
        by = f" · {other}" if other else ""  # each panel names the comparison model it shows
        recon = _recon(v)
        recon["label"] = f"{v['recon_label']}{by}"
        return [gr.update(value=v["original"], label=f"Original{by}"), recon,
                gr.update(value=v["heatmap"], label=f"Heatmap{by}"),
                gr.update(value=v["overlay"], label=f"Overlay{by}"),
                gr.update(value=v["score"], label=f"Score{by}"),
                gr.update(value=v["verdict"], label=f"Verdict{by} (at its own calibrated threshold)"),
                v["time"], v.get("domain", ""), _slider(v), table_updates(other, batch, t), agree]

    compare_outputs = [q_orig, q_rec, q_heat, q_over, q_score, q_verdict, q_time, q_domain, q_slider, table,
                       agree_md]

    def show_batch(batch: Batch, name: str, t: float, other: Optional[str]) -> list[Any]:
        rng = c.threshold_range(name, batch)
        # keep the user's threshold if it is still inside the new range
        t_use = t if t is not None and rng["minimum"] <= t <= rng["maximum"] else rng["value"]
        msg = f"Inspected {len(batch.predictions)} image(s) with {name}."
        ood = c.out_of_domain_names(batch)
        if ood:
            msg += (f" ⚠️ **{len(ood)} image(s) unlike {name}'s training images** (out of domain: their scores "
                    "and verdicts mean little): " + ", ".join(f"`{n}`" for n in ood[:10])
                    + (f" ... ({len(ood) - 10} more)" if len(ood) > 10 else "") + ".")
        if batch.errors:
            msg += " Skipped: " + "; ".join(f"**{n}**: {m}" for n, m in batch.errors[:10])
        return [batch, *panel_updates(batch, t_use),
                gr.update(minimum=rng["minimum"], maximum=rng["maximum"], step=rng["step"], value=t_use),
                c.histogram(name, batch, t_use), c.false_alarm_text(name, t_use), c.downloads(batch, t_use),
                msg, *compare_updates(other, batch, t_use)]

    batch_outputs = [batch_state, *inspect_outputs, thr, hist, fa_md, downloads, inspect_msg, *compare_outputs]

    def no_change(msg: str) -> list[Any]:
        return [gr.update()] * (len(batch_outputs) - len(compare_outputs) - 1) + [msg] + \
            [gr.update()] * len(compare_outputs)

    def on_run(name: str, files: Any, t: float, other: str, progress: gr.Progress = gr.Progress()) -> list[Any]:
        try:
            batch = c.inspect(name, files or [], progress=lambda d, n: progress((d, n), desc="inspecting"))
            return show_batch(batch, name, t, other)
        except Exception as exc:
            return no_change(error_text(exc))

    def on_sample(name: str, t: float, other: str, evt: gr.SelectData) -> list[Any]:
        try:
            batch = c.inspect_sample(name, int(evt.index))
            return show_batch(batch, name, t, other)
        except Exception as exc:
            return no_change(error_text(exc))

    run_btn.click(on_run, [model_dd, upload, thr, compare_dd], batch_outputs, api_name="inspect",
                  concurrency_limit=INSPECT_CONCURRENCY, concurrency_id="inspect")

    def on_folder_run(name: str, folder: str, t: float, other: str,
                      progress: gr.Progress = gr.Progress()) -> list[Any]:
        try:
            batch = c.inspect_folder(name, folder, progress=lambda d, n: progress((d, n), desc="inspecting"))
            return show_batch(batch, name, t, other)
        except Exception as exc:
            return no_change(error_text(exc))

    inspect_folder_btn.click(on_folder_run, [model_dd, inspect_folder_tb, thr, compare_dd], batch_outputs,
                             api_name="inspect_folder", concurrency_limit=INSPECT_CONCURRENCY,
                             concurrency_id="inspect")
    inspect_folder_tb.submit(on_folder_run, [model_dd, inspect_folder_tb, thr, compare_dd], batch_outputs,
                             api_name="inspect_folder_submit",
                             concurrency_limit=INSPECT_CONCURRENCY, concurrency_id="inspect")
    sample_gallery.select(on_sample, [model_dd, thr, compare_dd], batch_outputs, api_name="inspect_sample",
                          concurrency_limit=INSPECT_CONCURRENCY, concurrency_id="inspect")

    def on_row(batch: Optional[Batch], t: float, other: str, evt: gr.SelectData) -> list[Any]:
        try:
            batch = c.select_row(batch, evt.row_value)
            return [batch, *panel_updates(batch, t), c.downloads(batch, t), "",
                    *compare_updates(other, batch, t)]
        except Exception as exc:
            return [gr.update()] * (len(inspect_outputs) + 2) + [error_text(exc)] + [gr.update()] * len(compare_outputs)

    table.select(on_row, [batch_state, thr, compare_dd],
                 [batch_state, *inspect_outputs, downloads, inspect_msg, *compare_outputs])

    def on_threshold(batch: Optional[Batch], name: str, t: float, other: str) -> list[Any]:
        # re-label only: no model call (Prediction.with_threshold; the comparison batch is cached).
        # The slider is the threshold of the model in use: a batch another model scored is not re-labelled.
        batch = c.batch_for(name, batch)
        v = c.panels(batch, None, t) if batch is not None else None
        try:
            agree = c.agreement(other, batch, t)["text"] if batch is not None and other else gr.update()
        except UserError as exc:
            agree = f"⚠️ {exc}"
        tables = table_updates(other, batch, t) if batch is not None else gr.update()
        # a typed value outside the slider's range is taken: the range widens to it (box = verdicts)
        return [v["verdict"] if v else gr.update(), v["heatmap"] if v else gr.update(),
                v["overlay"] if v else gr.update(), tables,
                c.histogram(name, batch, t), c.false_alarm_text(name, t), agree,
                widened_range(c.threshold_range(name, batch), float(t))]

    thr.change(on_threshold, [batch_state, model_dd, thr, compare_dd],
               [verdict_tb, p_heat, p_over, table, hist, fa_md, agree_md, thr],
               show_progress="hidden", trigger_mode="always_last")
    thr.release(lambda b, t: c.downloads(b, t), [batch_state, thr], [downloads], show_progress="hidden")

    def on_reset(name: str, batch: Optional[Batch]) -> Any:
        rng = c.threshold_range(name, batch)
        return gr.update(value=rng["value"])

    reset_thr.click(on_reset, [model_dd, batch_state], [thr])

    def clear_batch(name: Optional[str], other: Optional[str], msg: str) -> list[Any]:
        rng = c.threshold_range(name, None)
        return [None, *panel_updates(None, None),
                gr.update(minimum=rng["minimum"], maximum=rng["maximum"], step=rng["step"], value=rng["value"]),
                c.histogram(name, None, rng["value"]), c.false_alarm_text(name, rng["value"]), [], msg,
                *compare_updates(other, None)]

    return SimpleNamespace(show_batch=show_batch, clear_batch=clear_batch, compare_updates=compare_updates,
                           batch_outputs=batch_outputs, compare_outputs=compare_outputs)
