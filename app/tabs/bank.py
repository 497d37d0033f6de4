"""The Feature bank tab: build a bank (a PatchCore detector) from good images, see and save it."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import gradio as gr

from ..controller import AppController
from ..errors import UserError
from .common import blocks, error_text, good_images_inputs

#: (label, name): the label says which load offline; equal to ccad.features.backbone.backbone_choices()
#: (written out so that importing the app does not import torch; tests/test_backbone.py checks it)
BACKBONES = [("tf_efficientnet_lite0 (offline, default)", "tf_efficientnet_lite0"),
             ("tf_efficientnet_lite1 (offline)", "tf_efficientnet_lite1"),
             ("tf_efficientnet_lite2 (offline)", "tf_efficientnet_lite2"),
             ("wide_resnet50_2 (Hugging Face Hub or a weights file)", "wide_resnet50_2")]


def layout(c: AppController) -> SimpleNamespace:
    """The components (built inside the caller's ``gr.Tab``/``gr.Blocks``), by name."""
    gr.Markdown("Build the coarse feature bank (a coreset of backbone patch features of good images). "
                "The bank is at once a working PatchCore detector: use it in the Inspect tab right "
                "away while the diffusion model trains.")
    with gr.Row():
        with gr.Column():
            bank_folder, bank_zip = good_images_inputs(c.data_root, "bank")
        with gr.Column():
            bank_backbone = gr.Dropdown(BACKBONES, value=BACKBONES[0][1], label="Backbone",
                                        elem_id="bank-backbone")
            bank_layers = gr.CheckboxGroup([1, 2, 3, 4], value=[2, 3], label="Layers",
                                           elem_id="bank-layers")
            bank_xi = gr.Slider(10, 1000, value=200, step=10, label="Bank size xi", elem_id="bank-xi",
                                info="the Coarse Feature Bank: what the diffusion methods are conditioned on "
                                     "(Train tab, 'Reuse the bank'); the PatchCore detector built here scores "
                                     "against its own memory, sized below")
            bank_memory = gr.Slider(0.1, 10, value=1.0, step=0.1, label="PatchCore memory (% of all patches)",
                                    elem_id="bank-memory",
                                    info="the coreset of patch features each test patch is compared with: more "
                                         "is slower and closer to keeping every patch")
            bank_size = gr.Dropdown([64, 128, 256, 320], value=256, label="Image size",
                                    elem_id="bank-image-size")
    with gr.Row():
        bank_build = gr.Button("Build bank", variant="primary", elem_id="bank-build")
        bank_cancel = gr.Button("Cancel", elem_id="bank-cancel")
    bank_msg = gr.Markdown("", elem_id="bank-status")
    bank_jobs = gr.Markdown("", elem_id="bank-jobs")  # this browser's build, listed after a reload too
    bank_timer = gr.Timer(1.5, active=True)  # a tab's own timer: Gradio mounts a tab's contents when it is opened
    with gr.Row():
        bank_summary = gr.JSON(label="Bank summary", elem_id="bank-summary")
        bank_plot = gr.Plot(label="Bank vs all patch features (PCA)", elem_id="bank-plot")
    with gr.Row():
        save_path = gr.Textbox(label=f"Save to folder (inside {c.data_root})", elem_id="bank-save-path")
        save_what = gr.Radio(["detector", "bank"], value="detector", label="What to save",
                             elem_id="bank-save-what")
        save_btn = gr.Button("Save the model in use", elem_id="bank-save")
    save_msg = gr.Markdown("", elem_id="bank-save-status")
    return blocks(locals())


def wire(c: AppController, ui: SimpleNamespace, bar: SimpleNamespace) -> None:
    """The tab's events."""
    bank_backbone, bank_build, bank_cancel = ui.bank_backbone, ui.bank_build, ui.bank_cancel
    bank_folder, bank_layers, bank_msg, bank_plot = ui.bank_folder, ui.bank_layers, ui.bank_msg, ui.bank_plot
    bank_size, bank_summary, bank_xi, bank_zip = ui.bank_size, ui.bank_summary, ui.bank_xi, ui.bank_zip
    model_dd, save_btn, save_msg, save_path = ui.model_dd, ui.save_btn, ui.save_msg, ui.save_path
    save_what = ui.save_what
    choice_outputs, model_choices = bar.choice_outputs, bar.model_choices
    browser_id, bank_timer, bank_jobs = ui.browser_id, ui.bank_timer, ui.bank_jobs

    def on_build(folder: str, zf: Optional[str], backbone: str, layers: list, xi: float, size: int,
                 memory: float, owner: str, progress: gr.Progress = gr.Progress()) -> list[Any]:
        try:
            if not owner:
                raise UserError("the page is still starting; press Build bank again in a moment")
            name, summary, fig, msg = c.build_bank(
                folder, zf, backbone, layers, int(xi), int(size),
                progress=lambda d, n: progress((d, n), desc="building the bank"), owner=owner,
                memory_percent=float(memory))
            return [*model_choices(name), summary, fig, msg]
        except Exception as exc:
            return [gr.update()] * 5 + [error_text(exc)]

    bank_build.click(on_build, [bank_folder, bank_zip, bank_backbone, bank_layers, bank_xi, bank_size, ui.bank_memory,
                                browser_id],
                     [*choice_outputs, bank_summary, bank_plot, bank_msg], concurrency_limit=1,
                     concurrency_id="heavy", show_progress_on=[bank_msg])  # not over the model dropdowns

    # the build is the server's, listed per browser: a reload still shows it and can cancel it
    bank_cancel.click(lambda owner: c.cancel_bank(owner or None) if owner else "No bank build is running.",
                      [browser_id], [bank_jobs])
    bank_timer.tick(lambda owner: c.bank_jobs_text(owner or None) if owner else gr.update(), [browser_id],
                    [bank_jobs], show_progress="hidden")

    def on_save(name: str, dest: str, what: str) -> str:
        try:
            return c.save_model(name, dest, what)
        except Exception as exc:
            return error_text(exc)

    save_btn.click(on_save, [model_dd, save_path, save_what], [save_msg])
