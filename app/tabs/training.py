"""The Train tab: method, preset and settings form (all from the registry), the training job's
buttons, status, loss curve and preview."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import gradio as gr

from .. import views
from ..controller import AppController
from ..errors import UserError
from ..forms import FORM_HEADERS, default_variant, form_options, method_choices, method_info, settings_form
from .common import blocks, error_text, good_images_inputs

IMAGE_SIZES = [64, 96, 128, 256]


def _sizes(default: int) -> list[int]:
    return sorted(set(IMAGE_SIZES) | {int(default)})


def _method_text(info: dict[str, Any]) -> str:
    """The one-line description under the method dropdown (from the registry)."""
    text = info["description"] or info["title"]
    return f"{text}" + (f" &nbsp;·&nbsp; *{info['paper']}*" if info.get("paper") else "")


def _options_text(info: dict[str, Any]) -> str:
    opts = info.get("options") or []
    if not opts:
        return f"{info['title']} has no further options."
    return (f"Options of {info['title']} (name=default); any of them may be set above:\n\n"
            + "\n".join(f"- `{o}`" for o in opts))


def _owner(browser_id: Any) -> str:
    """The session a Train tab event comes from: the browser's id, or a fresh id that owns nothing
    while the page has not received its own yet; never None (None would own every job)."""
    import secrets

    text = str(browser_id or "")
    return text if text else f"no-id-{secrets.token_hex(8)}"


def layout(c: AppController) -> SimpleNamespace:
    """The components (built inside the caller's ``gr.Tab``/``gr.Blocks``), by name."""
    settings = c.default_train_settings()
    minfo = method_info(settings["variant"])
    gr.Markdown(c.device_note(), elem_id="train-device")
    with gr.Row():
        with gr.Column():
            train_folder, train_zip = good_images_inputs(c.data_root, "train")
            train_bank = gr.Dropdown([""] + c.registry.with_bank(), value="",
                                     label="Reuse the bank of (optional; else a bank is built)",
                                     elem_id="train-bank", visible=minfo["uses_bank"])
        with gr.Column():
            train_method = gr.Dropdown(method_choices(), value=settings["variant"], label="Method",
                                       elem_id="train-method", interactive=True)
            train_method_desc = gr.Markdown(_method_text(minfo), elem_id="train-method-description")
            train_preset = gr.Dropdown(minfo["presets"], value=settings["preset"],
                                       label="Network preset", elem_id="train-preset",
                                       visible=minfo["preset"] is not None)
            train_size = gr.Dropdown(_sizes(minfo["image_size"]), value=settings["image_size"],
                                     label="Image size", elem_id="train-image-size",
                                     allow_custom_value=True)
            ae = c.autoencoder_field(settings["variant"])
            train_ae = gr.Textbox(value=ae["value"], label="Autoencoder", info=ae["info"],
                                  elem_id="train-autoencoder", visible=ae["visible"])
            train_steps = gr.Number(value=settings["steps"], precision=0, label="Steps",
                                    elem_id="train-steps")
            train_bs = gr.Number(value=settings["batch_size"], precision=0, label="Batch size",
                                 elem_id="train-batch-size")
            train_prev = gr.Number(value=50, precision=0, label="Reconstruction preview every N steps",
                                   elem_id="train-preview-every")
            train_fuse = gr.Checkbox(value=False, label="Fuse with the bank's nearest-neighbour map",
                                     info="the method's map plus a PatchCore map, each normalised on "
                                          "held-out good images (one more pass over the images)",
                                     elem_id="train-fuse")
    with gr.Accordion(f"Settings of {minfo['title']}", open=True, elem_id="train-settings") \
            as train_settings_acc:
        gr.Markdown("Generated from the method's config: edit a **value**; only changed rows are "
                    "passed on (as KEY=VALUE options).", elem_id="train-settings-note")
        train_form = gr.Dataframe(value=settings_form(settings["variant"], settings["preset"]),
                                  headers=FORM_HEADERS, interactive=True, static_columns=[0, 1, 2],
                                  datatype=["str", "str", "str", "str"], max_height=320,
                                  elem_id="train-form", label="Method settings")
    with gr.Accordion("Advanced options", open=False, elem_id="train-advanced"):
        train_options = gr.Textbox(label="Advanced options (one KEY=VALUE per line)", lines=4,
                                   placeholder="diffusion.start_step=200", elem_id="train-options")
        train_options_help = gr.Markdown(_options_text(minfo), elem_id="train-options-help")
    with gr.Row(equal_height=True):
        train_estimate = gr.Markdown("Estimated training time: measured when you open this tab or change the "
                                     "method, preset, image size, steps or batch size.", elem_id="train-estimate")
        train_estimate_btn = gr.Button("Estimate", size="sm", scale=0, min_width=120, elem_id="train-estimate-run")
    with gr.Row():
        train_start = gr.Button("Start training", variant="primary", elem_id="train-start")
        train_stop = gr.Button("Stop (saves a resumable checkpoint)", variant="stop",
                               elem_id="train-stop")
        train_resume = gr.Button("Resume", elem_id="train-resume")
    train_msg = gr.Markdown("", elem_id="train-message")
    train_status = gr.Markdown("", elem_id="train-status")
    train_progress = gr.Markdown("", elem_id="train-progress")
    with gr.Row():
        train_loss = gr.Plot(views.loss_curve([]), label="Loss", elem_id="train-loss")
        train_preview = gr.Image(label="Reconstruction preview", height=260, interactive=False,
                                 format="png", elem_id="train-preview")
    timer = gr.Timer(1.5, active=True)
    return blocks(locals())


def wire(c: AppController, ui: SimpleNamespace, bar: SimpleNamespace) -> None:
    """The tab's events."""
    model_dd, timer, train_ae, train_bank, train_bs = ui.model_dd, ui.timer, ui.train_ae, ui.train_bank, ui.train_bs
    train_folder, train_form, train_fuse, train_loss = ui.train_folder, ui.train_form, ui.train_fuse, ui.train_loss
    train_method, train_method_desc, train_msg = ui.train_method, ui.train_method_desc, ui.train_msg
    train_options, train_options_help, train_preset = ui.train_options, ui.train_options_help, ui.train_preset
    train_prev, train_preview, train_progress = ui.train_prev, ui.train_preview, ui.train_progress
    train_resume, train_settings_acc, train_size = ui.train_resume, ui.train_settings_acc, ui.train_size
    train_start, train_status, train_steps = ui.train_start, ui.train_status, ui.train_steps
    train_stop, train_zip = ui.train_stop, ui.train_zip
    train_estimate, train_estimate_btn = ui.train_estimate, ui.train_estimate_btn
    choice_outputs, model_choices = bar.choice_outputs, bar.model_choices
    browser_id = ui.browser_id  # the job's owner: only the browser that started a job stops / resumes it

    def on_method(variant: str) -> list[Any]:
        try:
            info = method_info(variant)
            d = c.default_train_settings(variant)
            ae = c.autoencoder_field(variant)
        except Exception as exc:
            return [error_text(exc)] + [gr.update()] * 7
        return [_method_text(info),
                gr.update(choices=info["presets"], value=d["preset"], visible=info["preset"] is not None),
                gr.update(choices=_sizes(info["image_size"]), value=d["image_size"]),
                gr.update(value=ae["value"], visible=ae["visible"], info=ae["info"]),
                _options_text(info), gr.update(visible=info["uses_bank"]),
                settings_form(variant, d["preset"]), gr.update(label=f"Settings of {info['title']}")]

    train_method.change(on_method, [train_method],
                        [train_method_desc, train_preset, train_size, train_ae, train_options_help, train_bank,
                         train_form, train_settings_acc])

    def on_preset(variant: str, preset: Optional[str]) -> Any:
        try:
            return settings_form(variant, preset)
        except Exception:
            return gr.update()

    train_preset.input(on_preset, [train_method, train_preset], [train_form])

    def on_estimate(variant: str, preset: Optional[str], size: Any, steps: float, bs: float, options: str,
                    autoencoder: str, form: Any) -> str:
        """The estimated training time of the chosen setting on this machine, before Start (issue 24)."""
        try:
            opts = "\n".join(x for x in (form_options(form), options or "") if x)
            return c.training_estimate(variant or default_variant(), preset, size, steps, bs, options=opts,
                                       autoencoder=autoencoder)
        except Exception as exc:
            return error_text(exc)

    estimate_inputs = [train_method, train_preset, train_size, train_steps, train_bs, train_options, train_ae,
                       train_form]
    # one measurement at a time; a burst of changes (a new method sets preset and size) measures the last
    estimate_kw = dict(concurrency_limit=1, concurrency_id="train-estimate", trigger_mode="always_last",
                       show_progress="minimal")
    train_estimate_btn.click(on_estimate, estimate_inputs, [train_estimate], **estimate_kw)
    ui.train_tab.select(on_estimate, estimate_inputs, [train_estimate], **estimate_kw)
    for box in (train_preset, train_size, train_steps, train_bs, train_ae):
        box.change(on_estimate, estimate_inputs, [train_estimate], **estimate_kw)

    def on_train(variant: str, folder: str, zf: Optional[str], bank_model: str, preset: Optional[str],
                 size: Any, steps: float, bs: float, every: float, options: str, autoencoder: str,
                 form: Any, fuse: bool = False, owner: str = "") -> str:
        try:
            if not owner:
                raise UserError("the page is still starting; press Start training again in a moment")
            try:
                size_px = int(size)
            except (TypeError, ValueError):
                raise UserError(f"image size must be a whole number of pixels, got {size!r}") from None
            return c.start_training(folder, zf, bank_model or None, preset or "", size_px, int(steps or 0),
                                    int(bs or 0), int(every or 50), variant=variant or default_variant(),
                                    options="\n".join(x for x in (form_options(form), options or "") if x),
                                    autoencoder=autoencoder, fuse_bank=bool(fuse), owner=_owner(owner))
        except Exception as exc:
            return error_text(exc)

    train_start.click(on_train, [train_method, train_folder, train_zip, train_bank, train_preset, train_size,
                                 train_steps, train_bs, train_prev, train_options, train_ae, train_form,
                                 train_fuse, browser_id],
                      [train_msg])

    def on_resume(owner: str) -> str:
        try:
            return c.start_training(None, None, None, "", 0, 0, 0, resume=True, owner=_owner(owner))
        except Exception as exc:
            return error_text(exc)

    train_resume.click(on_resume, [browser_id], [train_msg])
    train_stop.click(lambda owner: c.stop_training(owner=_owner(owner)), [browser_id], [train_msg])

    def on_tick(selected: Optional[str], seen: Optional[int], owner: str) -> list[Any]:
        s = c.training_status(owner=_owner(owner))
        n = len(c.registry.names())
        choice = model_choices(selected) if n != (seen or 0) else [gr.update()] * 3
        # the job's own preview, or none: never the previous job's picture (issue 21)
        return [s["status"], s["progress"], views.loss_curve(s["losses"]),
                gr.update(value=s["preview"], label=s["preview_label"]), *choice, n,
                gr.update(interactive=s["mine"]), gr.update(interactive=s["mine"])]

    seen_models = gr.State(len(c.registry.names()))
    timer.tick(on_tick, [model_dd, seen_models, browser_id],
               [train_status, train_progress, train_loss, train_preview, *choice_outputs, seen_models,
                train_stop, train_resume],
               show_progress="hidden")
