"""Building and training detectors: :func:`fit_detector` (a method that needs no training) and
:func:`train_detector` (any method), the held-out calibration split and the refusal to overwrite a
run. The detector itself is :mod:`ccad.detector`; its names are re-exported here (the API users
have imported from ``ccad.pipeline`` since the start)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .config import ConfigError, set_option
from .detector_config import DetectorConfig
from .detector import AnomalyDetector  # noqa: F401  (re-exported: the detector's names as ccad.pipeline.*)
from .detector_folder import (  # noqa: F401  (re-exported)
    FILES, check_weight_files, default_device, model_card_text)
from .errors import CheckpointError, RunFolderExistsError  # noqa: F401  (re-exported)
from .methods import Context, Method, get_method
from .prediction import Prediction, count_statuses  # noqa: F401  (re-exported)
from .scoring.threshold import check_held_out_split, split_held_out  # noqa: F401  (re-exported)
from .scoring.verdict import STATUSES, status_of  # noqa: F401  (re-exported)

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


# --------------------------------------------------------------------------------------------
# Building and training
# --------------------------------------------------------------------------------------------

def _as_samples(data: Any, split: str = "train") -> list:
    """Good samples from a dataset path, several dataset paths (one category each), or items."""
    from .data.detect import load_dataset
    from .data.sample import Sample

    if isinstance(data, (str, Path)):
        samples = load_dataset(data, split=split)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, Path)) and Path(d).is_dir()
                                                         for d in data):
        samples = []
        for d in data:  # several folders: each is one category (named by the folder unless the layout says)
            for s in load_dataset(d, split=split):
                samples.append(s if s.category else replace(s, category=Path(d).name))
    else:
        samples = [s if isinstance(s, Sample) else Sample(str(s), None, 0) for s in data]
    good = [s for s in samples if s.label == 0]
    if not good:
        raise ValueError(f"{data if isinstance(data, (str, Path)) else 'the given samples'}: no good images found")
    return good


def split_good(samples: list, calibration_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministically hold out a slice of the good images for threshold calibration
    (stratified by category, so every category of a multi-class model is calibrated on)."""
    if not 0.0 <= calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_cat.setdefault(getattr(s, "category", "") or "", []).append(i)
    cal_idx: list[int] = []
    rng = np.random.default_rng(seed)
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        order = rng.permutation(len(idx))
        n_cal = int(round(len(idx) * calibration_fraction))
        if calibration_fraction > 0 and len(idx) >= 2:
            n_cal = min(max(n_cal, 1), len(idx) - 1)
        cal_idx.extend(idx[j] for j in order[:n_cal])
    cal_set = set(cal_idx)
    cal = [samples[i] for i in sorted(cal_set)]
    train = [samples[i] for i in range(len(samples)) if i not in cal_set]
    return train, cal


MIN_GOOD_PER_CATEGORY = 2  # one to train on, one held out to calibrate the threshold on


def check_calibration_split(samples: list, calibration_fraction: float, where: Any = None) -> None:
    """Refuse, before anything is built or trained, good images too few to hold out a calibration
    slice: with ``calibration_fraction > 0`` every category needs :data:`MIN_GOOD_PER_CATEGORY`
    good images (one to train on, one to calibrate the threshold on), else the model would be saved
    with a NaN threshold and no calibration. ``calibration_fraction = 0`` asks for an uncalibrated
    model explicitly (its verdicts are "uncalibrated", never "good")."""
    if calibration_fraction <= 0:
        return
    by_cat: dict[str, int] = {}
    for s in samples:
        key = getattr(s, "category", "") or ""
        by_cat[key] = by_cat.get(key, 0) + 1
    short = {c: n for c, n in sorted(by_cat.items()) if n < MIN_GOOD_PER_CATEGORY}
    if not short:
        return
    src = "" if where is None or not isinstance(where, (str, Path)) else f"{where}: "
    what = "; ".join(f"{n} good image{'s' if n != 1 else ''}" + (f" of category {c!r}" if c else "")
                     for c, n in short.items())
    raise ValueError(f"{src}{what}: too few to hold out a calibration slice; at least {MIN_GOOD_PER_CATEGORY} "
                     f"good images{' per category' if len(by_cat) > 1 or any(by_cat) else ''} are needed (1 to "
                     f"train on, 1 to calibrate the threshold on; more give a better threshold)")


def existing_outputs(folder: str | Path) -> list[str]:
    """What a training run or ``ccad bank`` would destroy in ``folder``: its ``checkpoint-*``
    folders, a saved model (``model/`` or the folder itself), its bank (names relative to ``folder``)."""
    from .training import list_checkpoints

    d = Path(folder)
    if not d.is_dir():
        return []
    found = [c.name for c in list_checkpoints(d)]
    for name in ("model/config.json", "config.json", "bank.safetensors"):
        if (d / name).is_file():
            found.append(name.split("/")[0] + ("/" if "/" in name else ""))
    return found


def refuse_to_overwrite(folder: str | Path, flag_resume: Optional[str] = "resume=True",
                        flag_overwrite: str = "overwrite=True") -> None:
    """Raise :class:`RunFolderExistsError` when ``folder`` holds something :func:`existing_outputs` lists."""
    found = existing_outputs(folder)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        how = (f"pass {flag_resume} to continue it, or {flag_overwrite} to replace it" if flag_resume
               else f"pass {flag_overwrite} to replace it")
        raise RunFolderExistsError(f"{folder}: already holds {shown}; nothing was changed: {how} "
                                   f"(or choose another folder)")


def _detector_config(variant: str, image_size: Optional[int], method: Any, bank_config: Any, scoring: Any,
                     backbone: Optional[str], layers: Optional[Sequence[int]], bank_size: Optional[int],
                     weights: Optional[str], batch_size: Optional[int], preset: Optional[str],
                     resize: Optional[str] = None, tile_stride: Optional[int] = None) -> DetectorConfig:
    from .config import BankConfig

    mcls = get_method(variant)
    mcfg = method if method is not None else mcls.default_config(preset)
    if method is not None and preset is not None:
        set_option(mcfg, "preset", preset, "preset")
    bc = bank_config if bank_config is not None else BankConfig()
    for key, value in (("backbone", backbone), ("layers", None if layers is None else tuple(layers)),
                       ("size", bank_size), ("weights", weights), ("batch_size", batch_size)):
        if value is not None:
            setattr(bc, key, value)
    size = mcls.default_image_size if image_size is None else int(image_size)  # 0 is refused, never "default"
    return DetectorConfig(variant=variant, image_size=size, bank=bc,
                          scoring=scoring if scoring is not None else mcls.default_scoring(), method=mcfg,
                          resize="square" if resize is None else resize, tile_stride=tile_stride).validate()


def _prepare(data: Any, config: DetectorConfig, bank: Any, calibration_fraction: float, seed: int, device: Any,
             progress: ProgressFn, cancel: CancelFn, run_dir: Optional[Path],
             phase: Optional[Callable[[str], None]] = None) -> tuple[Method, Any, list, tuple[list, list]]:
    """Samples -> train / held-out split -> the held-out images split into a selection part and a
    threshold part (:func:`selection_and_threshold`) -> the method with its bank and modules built
    (``phase(text)`` is told when the bank and the modules are built). Returns ``(method, bank,
    train, (selection, threshold))``."""
    from .data.skips import SampleList, collect_skipped

    with collect_skipped() as unsupported:  # files left out for their extension (info.json "skipped")
        good = _as_samples(data)
    check_calibration_split(good, calibration_fraction, data)
    train, cal = split_good(good, calibration_fraction, seed)
    train = SampleList(train, unsupported)
    dev = torch.device(device) if device is not None else default_device()
    mcls = get_method(config.variant)
    ctx = Context(image_size=config.image_size, device=dev, bank_config=config.bank, scoring=config.scoring,
                  run_dir=run_dir, progress=progress, cancel=cancel, seed=seed, held_out=list(cal))
    method = mcls(config.method, ctx)
    if cal and chosen_on_held_out(method, config.scoring):  # two jobs: hold out enough for both parts
        sc = config.scoring
        train, cal = hold_out_at_least(train, cal, int(sc.min_selection_images) + int(sc.min_threshold_images))
        train = SampleList(train, unsupported)
    held = selection_and_threshold(cal, method, config.scoring, seed, data)
    n_images = len(train)
    train = SampleList(framed(train, config), unsupported)  # keep-aspect / tile: what the model is built from
    train.n_images = n_images
    ctx.held_out = framed(held[0], config)
    if bank is None:
        if phase is not None and mcls.uses_bank:
            phase("building the feature bank")
        bank = method.build_bank(train)
        if bank is not None and hasattr(bank, "meta") and config.resize != "square":
            bank.meta["resize"] = config.resize  # built from letterboxed images / tiles: said in bank.json
    elif mcls.uses_bank:
        built = (getattr(bank, "meta", None) or {}).get("resize", "square")
        if built != config.resize:
            raise ConfigError(f"resize: the feature bank given (or resumed) was built with resize={built!r}, this "
                              f"model is resize={config.resize!r}; rebuild the bank or build the model with "
                              f"--resize {built}")
        meta = getattr(bank, "meta", {}) or {}
        config.bank.backbone = meta.get("backbone", config.bank.backbone)
        config.bank.layers = tuple(meta.get("layers", config.bank.layers))
        config.bank.size = int(bank.features.shape[0])
    ctx.bank = bank
    if phase is not None:
        phase(method.build_phase)
    with torch.random.fork_rng(devices=[]):  # a fresh init is a function of the seed, not of the global RNG
        torch.manual_seed(seed)
        method.build(train)
    config.validate()
    return method, bank, train, held


def framed(samples: Sequence[Any], config: DetectorConfig) -> list:
    """The samples as the model with ``config.resize`` reads them (:func:`ccad.data.framing.frame_samples`):
    as given for ``square``, letterboxed for ``keep-aspect``, one sample per tile for ``tile``."""
    from .data.framing import frame_samples

    return frame_samples(list(samples), config.resize, config.input_side, config.tile_stride)


def hold_out_at_least(train: list, held: list, need: int) -> tuple[list, list]:
    """Move good images from ``train`` to ``held`` until ``held`` has ``need`` of them (taken from
    the end of the categories with the most training images, each keeping at least one to train
    on), so a small data set still gives the selection part and the threshold part their minimum;
    when it cannot, ``held`` stays short and :func:`selection_and_threshold` refuses with the numbers."""
    train, held = list(train), list(held)
    while len(held) < need:
        by_cat: dict[str, list[int]] = {}
        for i, s in enumerate(train):
            by_cat.setdefault(getattr(s, "category", "") or "", []).append(i)
        spare = [idx for _, idx in sorted(by_cat.items(), key=lambda kv: (-len(kv[1]), kv[0])) if len(idx) >= 2]
        if not spare:
            break
        held.append(train.pop(spare[0][-1]))
    return train, held


def chosen_on_held_out(method: Method, scoring: Any) -> list[str]:
    """What is chosen on held-out good images for this method and scoring (words; [] = nothing)."""
    chosen = list(method.selects_on_held_out())
    if scoring.fusion == "bank":
        chosen.append("the fusion's weight and normalisation" if scoring.fusion_weight_fit == "synthetic"
                      else "the fusion's normalisation")
    return chosen


def selection_and_threshold(held_out: list, method: Method, scoring: Any, seed: int = 0,
                            where: Any = None) -> tuple[list, list]:
    """The held-out good images as ``(selection, threshold)`` (issue: one slice must not do two
    jobs): when this method or the fusion chooses settings on held-out images, they are split by
    ``scoring.selection_fraction`` (:func:`split_held_out`) and too few to give each part its
    minimum is a ``ValueError`` naming the numbers, before anything is built; when nothing is
    chosen, every held-out image sets the threshold. Nothing held out -> ``([], [])``."""
    if not held_out:
        return [], []
    chosen = chosen_on_held_out(method, scoring)
    if not chosen:
        return [], list(held_out)
    sel, thr = split_held_out(held_out, float(scoring.selection_fraction), seed)
    check_held_out_split(sel, thr, chosen, scoring.min_selection_images, scoring.min_threshold_images,
                         where if isinstance(where, (str, Path)) else None)
    return sel, thr


def _build_fusion(config: DetectorConfig, train: list, cal: list, device: torch.device, memory: Any,
                  progress: ProgressFn, cancel: CancelFn, seed: int) -> Any:
    """The fusion memory (:mod:`ccad.scoring.fusion`) when ``scoring.fusion`` is ``"bank"``: fitted on
    the training images, or ``memory`` (an already fitted ``PatchCoreScorer`` of the same images)."""
    sc = config.scoring
    if sc.fusion != "bank":
        if memory is not None:
            raise ConfigError("fusion_memory was given but scoring.fusion is 'none'")
        return None
    if not cal:
        raise ConfigError("scoring.fusion='bank' normalises both maps on held-out good images: "
                          "calibration_fraction must be > 0")
    from .scoring.fusion import BankFusion, bank_backbone

    if memory is not None:
        return BankFusion(scorer=memory, weight=float(sc.fusion_weight), norm=sc.fusion_norm)
    return BankFusion.fit(train, bank_backbone(config.bank, device), image_size=int(sc.fusion_image_size),
                          ratio=float(sc.fusion_ratio), weight=float(sc.fusion_weight), norm=sc.fusion_norm,
                          batch_size=config.bank.batch_size, seed=seed, progress=progress, cancel=cancel)


def _info(train: list, bank: Any) -> dict[str, Any]:
    cats = sorted({getattr(s, "category", "") or "" for s in train} - {""})
    from .data.skips import unsupported_reason

    skipped = list((getattr(bank, "meta", {}) or {}).get("skipped", []) if bank is not None else [])
    skipped += [{"path": str(p), "reason": unsupported_reason(p)} for p in getattr(train, "skipped", [])]
    info: dict[str, Any] = {"n_train_images": int(getattr(train, "n_images", len(train))), "skipped": skipped,
                            "categories": cats or None}
    if getattr(train, "n_images", len(train)) != len(train):
        info["n_train_inputs"] = len(train)  # tiles (resize = tile): the model was built from this many inputs
    return info


def fit_detector(
    data: Any,
    variant: str = "patchcore",
    backbone: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    bank_size: Optional[int] = None,
    image_size: int = 256,
    method: Any = None,
    calibration_fraction: float = 0.2,
    batch_size: int = 8,
    weights: Optional[str] = None,
    bank_config: Any = None,
    scoring: Any = None,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    device: Any = None,
    seed: int = 0,
    fusion_memory: Any = None,
    resize: str = "square",
    tile_stride: Optional[int] = None,
) -> AnomalyDetector:
    """Build a detector whose method needs no training (e.g. PatchCore) from good images: a working
    detector within seconds, calibrated on a held-out good slice. ``method`` is the method's own
    config (e.g. ``get_method("patchcore").Config(ratio=0.05)``); the bank settings default to
    :class:`ccad.config.BankConfig`. With ``scoring.fusion = "bank"`` the method's map is fused
    with a nearest-neighbour map (:mod:`ccad.scoring.fusion`; ``fusion_memory`` reuses a fitted
    ``PatchCoreScorer`` of the same training images). ``resize``: ``square`` (default),
    ``keep-aspect`` or ``tile`` (with ``tile_stride``), how images of any shape become the model's
    input, at building and at scoring (:mod:`ccad.data.framing`)."""
    if get_method(variant).trainable:
        raise ValueError(f"{variant!r} is trained: use train_detector (ccad train --variant {variant})")
    config = _detector_config(variant, image_size, method, bank_config, scoring, backbone, layers, bank_size,
                              weights, batch_size, None, resize, tile_stride)
    m, bank, train, (sel, thr) = _prepare(data, config, None, calibration_fraction, seed, device, progress, cancel,
                                          None)
    fusion = _build_fusion(config, train, thr, m.ctx.device, fusion_memory, progress, cancel, seed)
    det = AnomalyDetector(config, bank, m, info=_info(train, bank), device=m.ctx.device, fusion=fusion)
    if thr:
        det.calibrate(thr, batch_size=batch_size, selection=sel, chosen=chosen_on_held_out(m, config.scoring))
    return det


def train_detector(
    data: Any,
    out_dir: str | Path,
    variant: str = "ccad-v",
    method: Any = None,
    train: Any = None,
    bank: Any = None,
    preset: Optional[str] = None,
    image_size: Optional[int] = None,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    backbone: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    bank_size: Optional[int] = None,
    bank_config: Any = None,
    scoring: Any = None,
    calibration_fraction: float = 0.2,
    callbacks: Sequence[Callable] = (),
    resume: bool | str = False,
    cancel: CancelFn = None,
    progress: ProgressFn = None,
    device: Any = None,
    seed: int = 0,
    fusion_memory: Any = None,
    overwrite: bool = False,
    phase: Optional[Callable[[str], None]] = None,
    resize: Optional[str] = None,
    tile_stride: Optional[int] = None,
) -> AnomalyDetector:
    """Build and train a detector of any registered method on good images; save ``out_dir/model``.

    ``method`` is the method's typed config (default: its defaults, with ``preset``); ``train`` a
    :class:`ccad.training.TrainConfig` (``steps`` / ``batch_size`` / ``lr`` override its fields).
    The bank is built first unless given (and, when resuming, reloaded from ``out_dir``). Training
    runs :class:`ccad.training.Trainer` on the method's loss (accelerate; AMP, EMA, checkpoints in
    ``out_dir``; ``resume=True`` continues from the latest). A callback returning True stops
    training with a resumable checkpoint; the detector is still assembled (from the EMA weights
    so far), calibrated and saved. Methods without training are fitted (as :func:`fit_detector`).
    ``scoring.fusion = "bank"`` fuses the method's map with a nearest-neighbour map, normalised on
    the calibration slice (:mod:`ccad.scoring.fusion`; ``fusion_memory``: a fitted
    ``PatchCoreScorer`` of the same training images to reuse).

    An ``out_dir`` that already holds a run (``checkpoint-*``, ``model/``, ``bank.safetensors``) is
    refused with :class:`RunFolderExistsError` before anything is read or written, unless
    ``resume`` (continue it) or ``overwrite=True`` (replace it: its checkpoints are removed when
    training starts, its model when the new one is saved). Too few good images to hold out a
    calibration slice is a ``ValueError`` before anything is built (:func:`check_calibration_split`).
    ``phase(text)`` is told what runs now, as it starts ("building the feature bank" only for a
    method that builds one, the method's own text for preparing its training data, "training",
    "calibrating ...", "saving ..."); ``progress(done, total)`` counts within a phase.
    ``resize`` / ``tile_stride``: as :func:`fit_detector` (the model is trained on what it scores:
    letterboxed images or tiles).
    """
    from .features import FeatureBank
    from .training import TrainConfig, Trainer

    def say(text: str) -> None:
        if phase is not None:
            phase(text)

    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in out_dir, "
                         "overwrite replaces it")
    if not resume and not overwrite:
        refuse_to_overwrite(out_dir)
    state = _launch_state()
    if state is not None:  # several processes: each checks the folder before any of them writes to it
        state.wait_for_everyone()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _detector_config(variant, image_size, method, bank_config, scoring, backbone, layers, bank_size,
                              None, None, preset, resize, tile_stride)
    mcls = get_method(variant)
    tcfg = train if train is not None else TrainConfig(seed=seed)
    for key, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            setattr(tcfg, key, value)
    tcfg.validate()
    if bank is None and resume and (out_dir / "bank.safetensors").is_file():
        bank = FeatureBank.load(out_dir)  # the bank this run was trained with
    m, bank, train_s, (sel, cal) = _prepare(data, config, bank, calibration_fraction, seed, device, progress,
                                            cancel, out_dir, phase=say)
    if bank is not None:
        if state is not None:  # every process has read the folder's bank (resume) before it is rewritten
            state.wait_for_everyone()
        if state is None or state.is_main_process:
            bank.save(out_dir)
    info = _info(train_s, bank)
    t0 = time.perf_counter()
    if mcls.trainable:
        config.train = tcfg
        cbs = list(callbacks)
        if cancel is not None:
            cbs.append(lambda state: bool(cancel()))
        say(m.training_data_phase)
        dataset = m.training_dataset(train_s)
        preview_image = _preview_image(train_s, m.ctx.image_size) if tcfg.preview_every else None
        say("training")
        trainer = Trainer(m.trainable_modules(), m.training_loss, dataset, tcfg, out_dir, callbacks=cbs,
                          preview=m.preview, preview_image=preview_image)
        result = trainer.train(resume=resume, overwrite=bool(overwrite))
        m.use_trained(result.model)
        after = m.after_training_phase()
        if after:
            say(after)
        m.after_training(train_s)  # e.g. domain adaptation of the scoring extractor (D3AD eq. 10)
        info.update({"train_steps": int(result.step), "stopped_early": bool(result.stopped)})
    info["train_seconds"] = round(time.perf_counter() - t0, 1)
    if config.scoring.fusion == "bank":
        say("fitting the bank map it is fused with")
    fusion = _build_fusion(config, train_s, cal, m.ctx.device, fusion_memory, progress, cancel, seed)
    det = AnomalyDetector(config, bank, m, device=m.ctx.device, info=info, fusion=fusion)
    if cal:
        say(f"calibrating the threshold on {len(cal)} held-out good images")
        det.calibrate(cal, batch_size=tcfg.batch_size, selection=sel, chosen=chosen_on_held_out(m, config.scoring))
    say("saving the model")
    if state is None or state.is_main_process:  # several processes (accelerate launch): one writes the model
        det.save_pretrained(out_dir / "model")  # replaced as a whole, in one swap (ccad.atomic)
    if state is not None:
        state.wait_for_everyone()
    return det


def _preview_image(train: Sequence[Any], image_size: int) -> Optional[torch.Tensor]:
    """The first readable training image (``3 x S x S`` in [0, 1]) the live preview reconstructs."""
    from .data.dataset import ImageDataset

    ds = ImageDataset(list(train)[:8], image_size, on_error="skip")
    try:
        return ds[0]["image"] if len(ds) else None
    except Exception:  # noqa: BLE001 - no readable image among the first: no preview, training goes on
        return None


def _launch_state() -> Any:
    """accelerate's shared state when a launcher started several processes, else None (started as
    :func:`ccad.distributed.current` does: gloo on CPU, each process on its own GPU)."""
    from .distributed import current

    return current().state
