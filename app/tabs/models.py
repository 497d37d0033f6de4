"""The model bar above the tabs: the model in use, the comparison model, the card, and loading a
model from a folder, a zip or the Hugging Face Hub."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import gradio as gr

from ..batch import Batch
from ..controller import AppController
from .common import INSPECT_CONCURRENCY, blocks, error_text


def layout(c: AppController) -> SimpleNamespace:
    """The components (built inside the caller's ``gr.Tab``/``gr.Blocks``), by name."""
    with gr.Accordion("Model", open=True, elem_id="model-bar"):
        with gr.Row():
            with gr.Column(scale=2):
                model_dd = gr.Dropdown(choices=c.registry.names(), value=c.registry.active, label="Model in use",
                                       elem_id="model-select", interactive=True)
                compare_dd = gr.Dropdown(choices=[""] + c.registry.names(), value="",
                                         label="Compare side by side with (optional)", elem_id="compare-select")
                model_status = gr.Markdown(c.model_status_line(c.registry.active), elem_id="model-status")
            with gr.Column(scale=3):
                card_line = gr.Markdown(c.model_card_line(c.registry.active), elem_id="model-card-line")
                train_data_md = gr.Markdown(c.training_data_text(c.registry.active),
                                            elem_id="model-training-data")
                with gr.Accordion("Model card (all facts)", open=False, elem_id="model-card-details"):
                    card_md = gr.Markdown(c.model_card(c.registry.active), elem_id="model-card")
                with gr.Row():
                    export_btn = gr.Button("Export (ONNX zip, runs without torch)", elem_id="model-export",
                                           size="sm")
                    export_file = gr.File(label="exported model", elem_id="model-export-file", visible=False)
                export_msg = gr.Markdown("", elem_id="model-export-status")
        with gr.Accordion("Load another model: folder, zip or Hugging Face Hub", open=False,
                          elem_id="model-load"), gr.Row():
            with gr.Column():
                folder_tb = gr.Textbox(label=f"Model folder (inside {c.data_root})", elem_id="model-folder")
                folder_btn = gr.Button("Load folder", elem_id="model-folder-load")
            with gr.Column():
                zip_up = gr.File(label="...or upload a zipped model folder", file_types=[".zip"],
                                 elem_id="model-zip", type="filepath")
            with gr.Column():
                hub_tb = gr.Textbox(label="Hugging Face Hub repo id", placeholder="user/ccad-model",
                                    elem_id="hub-repo")
                hub_rev = gr.Textbox(label="revision (branch, tag or commit; optional)", elem_id="hub-revision")
                hub_btn = gr.Button("Load from the Hub", elem_id="hub-load")
                hub_msg = gr.Markdown("", elem_id="hub-status")
    return blocks(locals())


def wire(c: AppController, ui: SimpleNamespace, ins: SimpleNamespace) -> SimpleNamespace:
    """The bar's events; returns ``model_choices`` (fresh model lists) and the components it fills."""
    batch_state, card_line, card_md, compare_dd = ui.batch_state, ui.card_line, ui.card_md, ui.compare_dd
    compare_group, folder_btn = ui.compare_group, ui.folder_btn
    folder_tb, hub_btn, hub_msg, hub_rev, hub_tb = ui.folder_tb, ui.hub_btn, ui.hub_msg, ui.hub_rev, ui.hub_tb
    inspect_msg, model_dd, model_status, thr = ui.inspect_msg, ui.model_dd, ui.model_status, ui.thr
    train_bank, train_data_md, zip_up = ui.train_bank, ui.train_data_md, ui.zip_up
    batch_outputs, clear_batch, compare_outputs = ins.batch_outputs, ins.clear_batch, ins.compare_outputs
    compare_updates, show_batch = ins.compare_updates, ins.show_batch

    def model_choices(selected: Optional[str]) -> list[Any]:
        names = c.registry.names()
        sel = selected if selected in names else c.registry.active
        return [gr.update(choices=names, value=sel), gr.update(choices=[""] + names),
                gr.update(choices=[""] + c.registry.with_bank())]

    def on_model(name: str, batch: Optional[Batch], other: str,
                 progress: gr.Progress = gr.Progress()) -> list[Any]:
        # a batch's verdicts belong to the model that scored it: re-score it with the new model
        # (or clear it), never re-label the old scores at the new model's threshold
        c.registry.set_active(name)
        head = [c.model_card_line(name), c.model_card(name), c.training_data_text(name), c.model_status_line(name)]
        new, msg = c.switch_model(name, batch,
                                  progress=lambda d, n: progress((d, n), desc=f"re-scoring with {name}"))
        if new is None:
            return head + clear_batch(name, other, msg if batch is not None else gr.update())
        out = show_batch(new, name, None, other)
        if msg:
            out[batch_outputs.index(inspect_msg)] = msg
        return head + out

    model_dd.change(on_model, [model_dd, batch_state, compare_dd], [card_line, card_md, train_data_md,
                                                                     model_status, *batch_outputs],
                    show_progress_on=[inspect_msg], concurrency_limit=INSPECT_CONCURRENCY,
                    concurrency_id="inspect")

    def loaded(result: tuple[str, str]) -> list[Any]:
        name, msg = result
        return [*model_choices(name), msg]

    def on_folder(path: str) -> list[Any]:
        try:
            return loaded(c.load_from_folder(path))
        except Exception as exc:
            return [gr.update()] * 3 + [error_text(exc)]

    def on_zip(path: Optional[str]) -> list[Any]:
        if not path:
            return [gr.update()] * 4
        try:
            return loaded(c.load_from_zip(path))
        except Exception as exc:
            return [gr.update()] * 3 + [error_text(exc)]

    def on_hub(repo: str, rev: str) -> list[Any]:
        try:
            name, msg = c.load_from_hub(repo, rev)
            return [*model_choices(name), msg]
        except Exception as exc:
            return [gr.update()] * 3 + [error_text(exc)]

    def on_export(name: str) -> list[Any]:
        try:
            path, msg = c.export_zip(name)
            return [gr.update(value=path, visible=True), msg]
        except Exception as exc:
            return [gr.update(visible=False), error_text(exc)]

    ui.export_btn.click(on_export, [model_dd], [ui.export_file, ui.export_msg], concurrency_limit=1)

    choice_outputs = [model_dd, compare_dd, train_bank]
    folder_btn.click(on_folder, [folder_tb], [*choice_outputs, model_status])
    zip_up.upload(on_zip, [zip_up], [*choice_outputs, model_status])
    hub_btn.click(on_hub, [hub_tb, hub_rev], [*choice_outputs, hub_msg])

    def on_compare(other: str, batch: Optional[Batch], t: float) -> list[Any]:
        return [gr.update(visible=bool(other)), *compare_updates(other, batch, t)]

    compare_dd.change(on_compare, [compare_dd, batch_state, thr], [compare_group, *compare_outputs])

    return SimpleNamespace(model_choices=model_choices, choice_outputs=choice_outputs)
