"""The Evaluate tab: metrics of the model in use on a labelled dataset, curves and worst cases."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..controller import AppController
from .common import blocks, error_text


FN_LABEL = "Worst false negatives (missed defects)"
FP_LABEL = "Worst false positives (false alarms)"


def layout(c: AppController) -> SimpleNamespace:
    """The components (built inside the caller's ``gr.Tab``/``gr.Blocks``), by name."""
    gr.Markdown("Run the model in use on a labelled dataset (MVTec / anomalib folder layout, a CSV "
                "manifest or DAGM) inside the data root.")
    with gr.Row():
        eval_path = gr.Textbox(label=f"Dataset folder or CSV (inside {c.data_root})",
                               elem_id="eval-path")
        eval_layout = gr.Dropdown(["auto", "mvtec", "csv", "dagm", "dagm-ccad", "visa", "folder"],
                                  value="auto", label="Layout", elem_id="eval-layout")
        eval_split = gr.Dropdown(["test", "train", "val"], value="test", label="Split",
                                 elem_id="eval-split")
    eval_run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
    eval_msg = gr.Markdown("", elem_id="eval-status")
    eval_table = gr.Dataframe(label="Metrics per category", interactive=False, elem_id="eval-metrics")
    eval_defects = gr.Dataframe(label="Per defect type (detected / missed at the model's threshold; "
                                      "AUROC of that defect type against the good images)",
                                interactive=False, elem_id="eval-defect-types")
    eval_report = gr.State(None)
    with gr.Row():
        eval_policy = gr.Dropdown(["f1", "recall=0.95", "recall=0.99", "fpr=0.01", "fpr=0.02", "fpr=0.05"],
                                  value="f1", allow_custom_value=True, label="Operating point (f1, recall=R, fpr=F)",
                                  elem_id="eval-policy", scale=2)
        eval_use = gr.Button("Use this operating point", elem_id="eval-use-point", scale=1)
    eval_point_msg = gr.Markdown("", elem_id="eval-point-status")
    with gr.Row():
        eval_curves = gr.Dropdown([], value=None, label="Curves for", elem_id="eval-curves",
                                  interactive=True, scale=2)
        eval_curves_note = gr.Markdown("", elem_id="eval-curves-note")
    with gr.Row():
        eval_roc = gr.Plot(label="ROC", elem_id="eval-roc")
        eval_pr = gr.Plot(label="Precision-recall", elem_id="eval-pr")
    eval_sweep = gr.Plot(label="Recall and false alarms as the threshold moves (per defect type)",
                         elem_id="eval-sweep")
    with gr.Row():
        # object_fit="contain": thumbnails keep their aspect; captions name the file and its score
        eval_fn = gr.Gallery(label=FN_LABEL, columns=4, height=300,
                             object_fit="contain", allow_preview=True, elem_id="eval-fn")
        eval_fp = gr.Gallery(label=FP_LABEL, columns=4, height=300,
                             object_fit="contain", allow_preview=True, elem_id="eval-fp")
    return blocks(locals())


def worst_gallery(items: list, label: str, none_text: str) -> Any:
    """The gallery's update: its items under its own label, or, with none, a label that says
    there are none (an empty gallery alone shows a bare image icon, which reads as broken)."""
    return gr.update(value=items, label=label if items else f"{label}: {none_text}")


def wire(c: AppController, ui: SimpleNamespace) -> None:
    """The tab's events."""
    eval_curves, eval_curves_note, eval_defects = ui.eval_curves, ui.eval_curves_note, ui.eval_defects
    eval_fn, eval_fp, eval_layout, eval_msg = ui.eval_fn, ui.eval_fp, ui.eval_layout, ui.eval_msg
    eval_path, eval_pr, eval_report, eval_roc = ui.eval_path, ui.eval_pr, ui.eval_report, ui.eval_roc
    eval_run, eval_split, eval_table, model_dd = ui.eval_run, ui.eval_split, ui.eval_table, ui.model_dd
    eval_sweep = ui.eval_sweep

    def on_eval(name: str, path: str, layout: str, split: str,
                progress: gr.Progress = gr.Progress()) -> list[Any]:
        try:
            r = c.run_evaluation(name, path, layout, split,
                                 progress=lambda d, n: progress((d, n), desc="evaluating"))
            import pandas as pd

            return [r["message"], pd.DataFrame(r["rows"], columns=r["headers"]),
                    pd.DataFrame(r["defect_rows"], columns=r["defect_headers"]), r["roc"], r["pr"],
                    worst_gallery(r["fn"], FN_LABEL, "none: every defect scored above the threshold"),
                    worst_gallery(r["fp"], FP_LABEL, "none: every good image scored at or below the threshold"),
                    r["report"],
                    gr.update(choices=r["curve_choices"], value=r["curve_choices"][0]), "", r["sweep"]]
        except Exception as exc:
            return [error_text(exc)] + [gr.update()] * 10

    eval_run.click(on_eval, [model_dd, eval_path, eval_layout, eval_split],
                   [eval_msg, eval_table, eval_defects, eval_roc, eval_pr, eval_fn, eval_fp, eval_report,
                    eval_curves, eval_curves_note, eval_sweep], concurrency_limit=1, concurrency_id="heavy",
                   show_progress_on=[eval_msg])

    def on_curves(report: Any, which: str) -> list[Any]:
        try:
            return list(c.category_curves(report, which))
        except Exception as exc:
            return [gr.update(), gr.update(), error_text(exc)]

    eval_curves.input(on_curves, [eval_report, eval_curves], [eval_roc, eval_pr, eval_curves_note])

    def on_use_point(name: str, report: Any, policy: str) -> str:
        try:
            return c.use_operating_point(name, report, policy)
        except Exception as exc:
            return error_text(exc)

    ui.eval_use.click(on_use_point, [model_dd, eval_report, ui.eval_policy], [ui.eval_point_msg])
