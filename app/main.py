"""The Gradio Blocks app: ``build_app()`` builds it, ``launch()`` serves it (``ccad app``, ``python app.py``).

Layout: a model bar (model list, card, load from folder / zip / Hugging Face Hub) above five
tabs: Inspect, Feature bank, Train, Evaluate and DAGM review. All computation is a call into
``ccad`` through :class:`app.controller.AppController`; this module only wires components.
Every interactive component has a stable ``elem_id`` (used by the browser tests and by users'
own automation).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Optional

import gradio as gr

from . import views
from .batch import AGREE_HEADER, TABLE_HEADERS, Batch
from .controller import AppController
from .errors import UserError
from .forms import FORM_HEADERS, default_variant, form_options, method_choices, method_info, settings_form
from .state import SAMPLES_DIR, default_state_dir

MAX_FILE_SIZE = "200mb"
CONCURRENCY_LIMIT = 2
# Model calls (Inspect button, sample click, Inspect folder) share one queue group run one at a time:
# with many users they are served strictly in arrival order (Gradio's queue is FIFO per group), a model
# never runs twice at once (no CPU-thread / GPU-memory contention, no thread-safety question), and
# requests beyond the limit wait in the queue instead of failing. Light events (threshold, table
# rows, timer ticks) keep the default group of CONCURRENCY_LIMIT, so they never wait behind inspections.
# CCAD_APP_INSPECT_CONCURRENCY raises it (e.g. a GPU that serves two batches at once).
INSPECT_CONCURRENCY = int(os.environ.get("CCAD_APP_INSPECT_CONCURRENCY", "1"))
# Waiting events (all groups) beyond this are refused with "queue full": generous for ~20-30 browser
# sessions, each with at most an inspection, a threshold change and a timer tick pending.
QUEUE_MAX_SIZE = 128
PANEL_HEIGHT = 300
TABLE_TYPES = ["number", "str", "number", "str", "str", "str"]
BACKBONES = ["tf_efficientnet_lite0", "tf_efficientnet_lite2", "wide_resnet50_2"]

CSS = """
.verdict-box textarea {font-weight: 700; font-size: 1.15em;}
#inspect-panels .image-container img {object-fit: contain;}
"""


def _import_review() -> tuple[Any, Optional[str], Optional[str]]:
    """The DAGM review tab (app/review.py, written separately): (builder, shortcuts js, import error)."""
    try:
        from .review import REVIEW_SHORTCUTS_JS, build_review_tab
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


def _err(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return f"⚠️ {exc}"
    return f"⚠️ Unexpected error ({type(exc).__name__}): {exc}"


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
    cancel_flags: dict[str, threading.Event] = {}
    gallery = c.gallery_items()
    settings = c.default_train_settings()
    minfo = method_info(settings["variant"])

    review_builder, review_js, review_error = _import_review()
    with warnings.catch_warnings():
        # Gradio 6 prefers these in launch(); given here they also apply to a plain demo.launch() (Spaces)
        warnings.simplefilter("ignore", UserWarning)
        demo = gr.Blocks(title="ccad anomaly inspection", theme=gr.themes.Soft(), css=CSS, js=review_js)

    with demo:
        gr.Markdown("# ccad · visual anomaly inspection\nLearn *good* from good images; flag what differs. "
                    "Diffusion detectors (CCAD V/C/F, DeCo-Diff, D3AD, GLAD) and a PatchCore baseline, trained here.")
        with gr.Accordion("Model", open=True, elem_id="model-bar"):
            with gr.Row():
                with gr.Column(scale=2):
                    model_dd = gr.Dropdown(choices=c.registry.names(), value=c.registry.active, label="Model in use",
                                           elem_id="model-select", interactive=True)
                    compare_dd = gr.Dropdown(choices=[""] + c.registry.names(), value="",
                                             label="Compare side by side with (optional)", elem_id="compare-select")
                    model_status = gr.Markdown(c.startup_message, elem_id="model-status")
                with gr.Column(scale=3):
                    card_line = gr.Markdown(c.model_card_line(c.registry.active), elem_id="model-card-line")
                    train_data_md = gr.Markdown(c.training_data_text(c.registry.active),
                                                elem_id="model-training-data")
                    with gr.Accordion("Model card (all facts)", open=False, elem_id="model-card-details"):
                        card_md = gr.Markdown(c.model_card(c.registry.active), elem_id="model-card")
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

        batch_state = gr.State(None)

        with gr.Tabs(elem_id="tabs"):
            # ------------------------------------------------------------ Inspect
            with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect"):
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
                    p_orig = gr.Image(label="Original", height=PANEL_HEIGHT, format="png", interactive=False,
                                      elem_id="panel-original")
                    p_rec = gr.Image(label="Reconstruction", height=PANEL_HEIGHT, format="png", interactive=False,
                                     elem_id="panel-reconstruction")
                    p_heat = gr.Image(label="Heatmap", height=PANEL_HEIGHT, format="png", interactive=False,
                                      elem_id="panel-heatmap")
                    p_over = gr.Image(label="Overlay", height=PANEL_HEIGHT, format="png", interactive=False,
                                      elem_id="panel-overlay")
                    p_slider = gr.ImageSlider(label="Original ↔ reconstruction (drag)", height=PANEL_HEIGHT,
                                              format="png", interactive=False, type="numpy",
                                              elem_id="panel-slider")
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
                rng = c.threshold_range(c.registry.active)
                with gr.Row():
                    with gr.Column(scale=2):
                        thr = gr.Slider(minimum=rng["minimum"], maximum=rng["maximum"], value=rng["value"],
                                        step=rng["step"], label="Threshold (score above it = anomalous)",
                                        elem_id="inspect-threshold")
                        reset_thr = gr.Button("Reset to the calibrated threshold", size="sm",
                                              elem_id="inspect-threshold-reset")
                        fa_md = gr.Markdown(c.false_alarm_text(c.registry.active, rng["value"]),
                                            elem_id="inspect-false-alarms")
                    with gr.Column(scale=3):
                        hist = gr.Plot(c.histogram(c.registry.active, None, rng["value"]), label="Scores",
                                       elem_id="inspect-histogram")
                with gr.Row(equal_height=False):
                    table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, label=(
                        "Batch (worst first; click a row to show it; click a header to sort)"),
                        elem_id="inspect-table", datatype=TABLE_TYPES)
                    with gr.Column(visible=False, elem_id="compare-table-col") as compare_table_col:
                        cmp_table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False,
                                                 label="The same batch through the comparison model",
                                                 elem_id="compare-table", datatype=TABLE_TYPES)
                agree_md = gr.Markdown("", elem_id="compare-agreement")
                downloads = gr.File(label="Downloads: heatmap, overlay, mask (selected image) and the batch CSV",
                                    file_count="multiple", interactive=False, elem_id="inspect-downloads")
                with gr.Group(visible=False, elem_id="compare-group") as compare_group:
                    gr.Markdown("**Comparison model**: the selected image through the second model "
                                "(verdicts at its own calibrated threshold)")
                    with gr.Row():
                        q_orig = gr.Image(label="Original", height=220, format="png", interactive=False,
                                          elem_id="compare-original")
                        q_rec = gr.Image(label="Reconstruction", height=220, format="png", interactive=False,
                                         elem_id="compare-reconstruction")
                        q_heat = gr.Image(label="Heatmap", height=220, format="png", interactive=False,
                                          elem_id="compare-heatmap")
                        q_over = gr.Image(label="Overlay", height=220, format="png", interactive=False,
                                          elem_id="compare-overlay")
                    with gr.Row():
                        q_score = gr.Textbox(label="Score", interactive=False, elem_id="compare-score")
                        q_verdict = gr.Textbox(label="Verdict", interactive=False, elem_id="compare-verdict")
                        q_time = gr.Textbox(label="Time taken", interactive=False, elem_id="compare-time")
                        q_domain = gr.Textbox(label="Training domain", interactive=False, elem_id="compare-domain")
                    q_slider = gr.ImageSlider(label="Original ↔ reconstruction (comparison model)", height=220,
                                              format="png", interactive=False, type="numpy",
                                              elem_id="compare-slider")

            # ------------------------------------------------------------ Feature bank
            with gr.Tab("Feature bank", id="bank", elem_id="tab-bank"):
                gr.Markdown("Build the coarse feature bank (a coreset of backbone patch features of good images). "
                            "The bank is at once a working PatchCore detector: use it in the Inspect tab right "
                            "away while the diffusion model trains.")
                with gr.Row():
                    with gr.Column():
                        bank_folder = gr.Textbox(label=f"Folder of good images (inside {c.data_root})",
                                                 elem_id="bank-folder")
                        bank_zip = gr.File(label="...or upload a zip of good images", file_types=[".zip"],
                                           type="filepath", elem_id="bank-zip")
                    with gr.Column():
                        bank_backbone = gr.Dropdown(BACKBONES, value=BACKBONES[0], label="Backbone",
                                                    elem_id="bank-backbone")
                        bank_layers = gr.CheckboxGroup([1, 2, 3, 4], value=[2, 3], label="Layers",
                                                       elem_id="bank-layers")
                        bank_xi = gr.Slider(10, 1000, value=200, step=10, label="Bank size xi", elem_id="bank-xi")
                        bank_size = gr.Dropdown([64, 128, 256, 320], value=256, label="Image size",
                                                elem_id="bank-image-size")
                with gr.Row():
                    bank_build = gr.Button("Build bank", variant="primary", elem_id="bank-build")
                    bank_cancel = gr.Button("Cancel", elem_id="bank-cancel")
                bank_msg = gr.Markdown("", elem_id="bank-status")
                with gr.Row():
                    bank_summary = gr.JSON(label="Bank summary", elem_id="bank-summary")
                    bank_plot = gr.Plot(label="Bank vs all patch features (PCA)", elem_id="bank-plot")
                with gr.Row():
                    save_path = gr.Textbox(label=f"Save to folder (inside {c.data_root})", elem_id="bank-save-path")
                    save_what = gr.Radio(["detector", "bank"], value="detector", label="What to save",
                                         elem_id="bank-save-what")
                    save_btn = gr.Button("Save the model in use", elem_id="bank-save")
                save_msg = gr.Markdown("", elem_id="bank-save-status")

            # ------------------------------------------------------------ Train
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                gr.Markdown(c.device_note(), elem_id="train-device")
                with gr.Row():
                    with gr.Column():
                        train_folder = gr.Textbox(label=f"Folder of good images (inside {c.data_root})",
                                                  elem_id="train-folder")
                        train_zip = gr.File(label="...or upload a zip of good images", file_types=[".zip"],
                                            type="filepath", elem_id="train-zip")
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

            # ------------------------------------------------------------ Evaluate
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
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
                    eval_curves = gr.Dropdown([], value=None, label="Curves for", elem_id="eval-curves",
                                              interactive=True, scale=2)
                    eval_curves_note = gr.Markdown("", elem_id="eval-curves-note")
                with gr.Row():
                    eval_roc = gr.Plot(label="ROC", elem_id="eval-roc")
                    eval_pr = gr.Plot(label="Precision-recall", elem_id="eval-pr")
                with gr.Row():
                    # object_fit="contain": thumbnails keep their aspect; captions name the file and its score
                    eval_fn = gr.Gallery(label="Worst false negatives (missed defects)", columns=4, height=300,
                                         object_fit="contain", allow_preview=True, elem_id="eval-fn")
                    eval_fp = gr.Gallery(label="Worst false positives (false alarms)", columns=4, height=300,
                                         object_fit="contain", allow_preview=True, elem_id="eval-fp")

            # ------------------------------------------------------------ DAGM review
            with gr.Tab("DAGM review", id="review", elem_id="tab-review"):
                _mount_review(review_builder, review_error, c)

        # ================================================================ wiring
        inspect_outputs = [p_orig, p_rec, p_heat, p_over, p_slider, score_tb, verdict_tb, time_tb, file_tb,
                           model_tb, domain_tb]

        def _slider(v: dict[str, Any]) -> Any:
            if v["original"] is None:
                return None
            return (v["original"], v["reconstruction"])

        def panel_updates(batch: Optional[Batch], t: Optional[float]) -> list[Any]:
            v = c.panels(batch, None, t)
            return [v["original"], gr.update(value=v["reconstruction"], label=v["recon_label"]), v["heatmap"],
                    v["overlay"], _slider(v), v["score"], v["verdict"], v["time"], v.get("name", ""),
                    v.get("model", ""), v.get("domain", "")]

        def table_updates(other: Optional[str], batch: Optional[Batch], t: Optional[float]) -> list[Any]:
            """Both tables: alone, the batch worst first; with a comparison model, both sorted by file
            (row k is the same image) with each row marked same / differs."""
            import pandas as pd

            rows_a, rows_b = ([], [])
            if other and batch is not None:
                try:
                    rows_a, rows_b = c.compare_rows(other, batch, t)
                except UserError:
                    rows_a, rows_b = [], []
            if rows_a:
                cols = [*TABLE_HEADERS[:4], AGREE_HEADER, *TABLE_HEADERS[4:]]
                types = [*TABLE_TYPES[:4], "str", *TABLE_TYPES[4:]]
                main = gr.update(value=pd.DataFrame(rows_a, columns=cols), label=c.batch_label(batch, True),
                                 datatype=types)
                cmp = gr.update(value=pd.DataFrame(rows_b, columns=cols), datatype=types,
                                label=f"The same batch scored by {other} (sorted by file; verdicts at its own "
                                      "calibrated threshold)")
                return [main, cmp]
            main = gr.update(value=pd.DataFrame(c.table_rows(batch, t), columns=TABLE_HEADERS),
                             label=c.batch_label(batch), datatype=TABLE_TYPES)
            return [main, gr.update(value=pd.DataFrame([], columns=TABLE_HEADERS), datatype=TABLE_TYPES)]

        def compare_updates(other: Optional[str], batch: Optional[Batch], t: Optional[float] = None) -> list[Any]:
            try:
                v = c.compare(other, batch)
                agree = c.agreement(other, batch, t)["text"]
            except UserError as exc:
                gr.Warning(str(exc))
                v, agree = c.panels(None), f"⚠️ {exc}"
            return [v["original"], gr.update(value=v["reconstruction"], label=v["recon_label"]), v["heatmap"],
                    v["overlay"], v["score"], v["verdict"], v["time"], v.get("domain", ""), _slider(v),
                    *table_updates(other, batch, t), agree]

        compare_outputs = [q_orig, q_rec, q_heat, q_over, q_score, q_verdict, q_time, q_domain, q_slider, table,
                           cmp_table, agree_md]

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
                return no_change(_err(exc))

        def on_sample(name: str, t: float, other: str, evt: gr.SelectData) -> list[Any]:
            try:
                batch = c.inspect_sample(name, int(evt.index))
                return show_batch(batch, name, t, other)
            except Exception as exc:
                return no_change(_err(exc))

        run_btn.click(on_run, [model_dd, upload, thr, compare_dd], batch_outputs, api_name="inspect",
                      concurrency_limit=INSPECT_CONCURRENCY, concurrency_id="inspect")

        def on_folder_run(name: str, folder: str, t: float, other: str,
                          progress: gr.Progress = gr.Progress()) -> list[Any]:
            try:
                batch = c.inspect_folder(name, folder, progress=lambda d, n: progress((d, n), desc="inspecting"))
                return show_batch(batch, name, t, other)
            except Exception as exc:
                return no_change(_err(exc))

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
                return [gr.update()] * (len(inspect_outputs) + 2) + [_err(exc)] + [gr.update()] * len(compare_outputs)

        table.select(on_row, [batch_state, thr, compare_dd],
                     [batch_state, *inspect_outputs, downloads, inspect_msg, *compare_outputs])
        cmp_table.select(on_row, [batch_state, thr, compare_dd],
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
            tables = table_updates(other, batch, t) if batch is not None else [gr.update(), gr.update()]
            return [v["verdict"] if v else gr.update(), v["heatmap"] if v else gr.update(),
                    v["overlay"] if v else gr.update(), *tables,
                    c.histogram(name, batch, t), c.false_alarm_text(name, t), agree]

        thr.change(on_threshold, [batch_state, model_dd, thr, compare_dd],
                   [verdict_tb, p_heat, p_over, table, cmp_table, hist, fa_md, agree_md],
                   show_progress="hidden", trigger_mode="always_last")
        thr.release(lambda b, t: c.downloads(b, t), [batch_state, thr], [downloads], show_progress="hidden")

        def on_reset(name: str, batch: Optional[Batch]) -> Any:
            rng = c.threshold_range(name, batch)
            return gr.update(value=rng["value"])

        reset_thr.click(on_reset, [model_dd, batch_state], [thr])

        def model_choices(selected: Optional[str]) -> list[Any]:
            names = c.registry.names()
            sel = selected if selected in names else c.registry.active
            return [gr.update(choices=names, value=sel), gr.update(choices=[""] + names),
                    gr.update(choices=[""] + c.registry.with_bank())]

        def clear_batch(name: Optional[str], other: Optional[str], msg: str) -> list[Any]:
            rng = c.threshold_range(name, None)
            return [None, *panel_updates(None, None),
                    gr.update(minimum=rng["minimum"], maximum=rng["maximum"], step=rng["step"], value=rng["value"]),
                    c.histogram(name, None, rng["value"]), c.false_alarm_text(name, rng["value"]), [], msg,
                    *compare_updates(other, None)]

        def on_model(name: str, batch: Optional[Batch], other: str,
                     progress: gr.Progress = gr.Progress()) -> list[Any]:
            # a batch's verdicts belong to the model that scored it: re-score it with the new model
            # (or clear it), never re-label the old scores at the new model's threshold
            c.registry.set_active(name)
            head = [c.model_card_line(name), c.model_card(name), c.training_data_text(name)]
            new, msg = c.switch_model(name, batch,
                                      progress=lambda d, n: progress((d, n), desc=f"re-scoring with {name}"))
            if new is None:
                return head + clear_batch(name, other, msg if batch is not None else gr.update())
            out = show_batch(new, name, None, other)
            if msg:
                out[batch_outputs.index(inspect_msg)] = msg
            return head + out

        model_dd.change(on_model, [model_dd, batch_state, compare_dd], [card_line, card_md, train_data_md,
                                                                         *batch_outputs],
                        show_progress_on=[inspect_msg], concurrency_limit=INSPECT_CONCURRENCY,
                        concurrency_id="inspect")

        def loaded(result: tuple[str, str]) -> list[Any]:
            name, msg = result
            return [*model_choices(name), msg]

        def on_folder(path: str) -> list[Any]:
            try:
                return loaded(c.load_from_folder(path))
            except Exception as exc:
                return [gr.update()] * 3 + [_err(exc)]

        def on_zip(path: Optional[str]) -> list[Any]:
            if not path:
                return [gr.update()] * 4
            try:
                return loaded(c.load_from_zip(path))
            except Exception as exc:
                return [gr.update()] * 3 + [_err(exc)]

        def on_hub(repo: str, rev: str) -> list[Any]:
            try:
                name, msg = c.load_from_hub(repo, rev)
                return [*model_choices(name), msg]
            except Exception as exc:
                return [gr.update()] * 3 + [_err(exc)]

        choice_outputs = [model_dd, compare_dd, train_bank]
        folder_btn.click(on_folder, [folder_tb], [*choice_outputs, model_status])
        zip_up.upload(on_zip, [zip_up], [*choice_outputs, model_status])
        hub_btn.click(on_hub, [hub_tb, hub_rev], [*choice_outputs, hub_msg])
        def on_compare(other: str, batch: Optional[Batch], t: float) -> list[Any]:
            return [gr.update(visible=bool(other)), gr.update(visible=bool(other)),
                    *compare_updates(other, batch, t)]

        compare_dd.change(on_compare, [compare_dd, batch_state, thr],
                          [compare_group, compare_table_col, *compare_outputs])

        # ---- bank
        def on_build(folder: str, zf: Optional[str], backbone: str, layers: list, xi: float, size: int,
                     request: gr.Request, progress: gr.Progress = gr.Progress()) -> list[Any]:
            key = getattr(request, "session_hash", None) or "default"
            flag = cancel_flags.setdefault(key, threading.Event())
            flag.clear()
            try:
                name, summary, fig, msg = c.build_bank(
                    folder, zf, backbone, layers, int(xi), int(size),
                    progress=lambda d, n: progress((d, n), desc="building the bank"), cancel=flag.is_set)
                return [*model_choices(name), summary, fig, msg]
            except Exception as exc:
                return [gr.update()] * 5 + [_err(exc)]

        bank_build.click(on_build, [bank_folder, bank_zip, bank_backbone, bank_layers, bank_xi, bank_size],
                         [*choice_outputs, bank_summary, bank_plot, bank_msg], concurrency_limit=1,
                         concurrency_id="heavy", show_progress_on=[bank_msg])  # not over the model dropdowns

        def on_cancel(request: gr.Request) -> str:
            key = getattr(request, "session_hash", None) or "default"
            if key in cancel_flags:
                cancel_flags[key].set()
                return "Cancelling the bank build..."
            return "No bank build is running."

        bank_cancel.click(on_cancel, None, [bank_msg])

        def on_save(name: str, dest: str, what: str) -> str:
            try:
                return c.save_model(name, dest, what)
            except Exception as exc:
                return _err(exc)

        save_btn.click(on_save, [model_dd, save_path, save_what], [save_msg])

        # ---- train
        def on_method(variant: str) -> list[Any]:
            try:
                info = method_info(variant)
                d = c.default_train_settings(variant)
                ae = c.autoencoder_field(variant)
            except Exception as exc:
                return [_err(exc)] + [gr.update()] * 7
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

        def on_train(variant: str, folder: str, zf: Optional[str], bank_model: str, preset: Optional[str],
                     size: Any, steps: float, bs: float, every: float, options: str, autoencoder: str,
                     form: Any, fuse: bool = False) -> str:
            try:
                try:
                    size_px = int(size)
                except (TypeError, ValueError):
                    raise UserError(f"image size must be a whole number of pixels, got {size!r}") from None
                return c.start_training(folder, zf, bank_model or None, preset or "", size_px, int(steps or 0),
                                        int(bs or 0), int(every or 50), variant=variant or default_variant(),
                                        options="\n".join(x for x in (form_options(form), options or "") if x),
                                        autoencoder=autoencoder, fuse_bank=bool(fuse))
            except Exception as exc:
                return _err(exc)

        train_start.click(on_train, [train_method, train_folder, train_zip, train_bank, train_preset, train_size,
                                     train_steps, train_bs, train_prev, train_options, train_ae, train_form,
                                     train_fuse],
                          [train_msg])

        def on_resume() -> str:
            try:
                return c.start_training(None, None, None, "", 0, 0, 0, resume=True)
            except Exception as exc:
                return _err(exc)

        train_resume.click(on_resume, None, [train_msg])
        train_stop.click(lambda: c.stop_training(), None, [train_msg])

        def on_tick(selected: Optional[str], seen: Optional[int]) -> list[Any]:
            s = c.training_status()
            n = len(c.registry.names())
            choice = model_choices(selected) if n != (seen or 0) else [gr.update()] * 3
            return [s["status"], s["progress"], views.loss_curve(s["losses"]),
                    s["preview"] if s["preview"] is not None else gr.update(), *choice, n]

        seen_models = gr.State(len(c.registry.names()))
        timer.tick(on_tick, [model_dd, seen_models],
                   [train_status, train_progress, train_loss, train_preview, *choice_outputs, seen_models],
                   show_progress="hidden")

        # ---- evaluate
        def on_eval(name: str, path: str, layout: str, split: str,
                    progress: gr.Progress = gr.Progress()) -> list[Any]:
            try:
                r = c.run_evaluation(name, path, layout, split,
                                     progress=lambda d, n: progress((d, n), desc="evaluating"))
                import pandas as pd

                return [r["message"], pd.DataFrame(r["rows"], columns=r["headers"]),
                        pd.DataFrame(r["defect_rows"], columns=r["defect_headers"]), r["roc"], r["pr"],
                        r["fn"], r["fp"], r["report"],
                        gr.update(choices=r["curve_choices"], value=r["curve_choices"][0]), ""]
            except Exception as exc:
                return [_err(exc)] + [gr.update()] * 9

        eval_run.click(on_eval, [model_dd, eval_path, eval_layout, eval_split],
                       [eval_msg, eval_table, eval_defects, eval_roc, eval_pr, eval_fn, eval_fp, eval_report,
                        eval_curves, eval_curves_note], concurrency_limit=1, concurrency_id="heavy",
                       show_progress_on=[eval_msg])

        def on_curves(report: Any, which: str) -> list[Any]:
            try:
                return list(c.category_curves(report, which))
            except Exception as exc:
                return [gr.update(), gr.update(), _err(exc)]

        eval_curves.input(on_curves, [eval_report, eval_curves], [eval_roc, eval_pr, eval_curves_note])

        def on_load(selected: Optional[str]) -> list[Any]:
            return model_choices(selected)

        demo.load(on_load, [model_dd], choice_outputs)

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
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                       allowed_paths=[str(SAMPLES_DIR)], **launch_kwargs)
