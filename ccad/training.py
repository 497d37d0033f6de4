"""The Trainer: one loop for every trained method, built on ``accelerate``.

The Trainer knows nothing of a method's objective: it optimises a set of modules with the loss
function the method gives it (``loss_fn(modules, batch, generator) -> loss``, e.g. CCAD's
eq. 15 epsilon loss or DeCo-Diff's deviation loss). The same code runs on the CPU, on one GPU, or
on several under ``accelerate launch``: AdamW, diffusers' cosine learning rate with linear
warm-up (``get_cosine_schedule_with_warmup``), gradient clipping, automatic mixed precision on
CUDA (bf16 where supported, else fp16 with a loss scaler), diffusers' ``EMAModel`` (fp32; the
weights you deploy), a tqdm progress bar, callbacks that see every step and may stop training,
and resumable checkpoints (the ``checkpoint-<step>/`` folder format, no pickle anywhere, lives in
:mod:`ccad.checkpoints`).

Determinism: the batch of step s (the sample order) and all of its randomness
(the generator handed to ``loss_fn``, the flips) are pure functions of ``(seed, s, process
index)``, never of a global RNG or of a data loader's position, so "train 6 steps" and "train 3,
stop, resume to 6" give identical weights and losses.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoints import (  # noqa: F401 - re-exported: ccad.training is where callers import them
    _CHECKPOINT_FILES,
    CHECKPOINT_FORMAT,
    CHECKPOINT_PREFIX,
    STATE_NAME,
    _ema_state,
    _fsync,
    _remove_dir,
    _rng_state,
    _set_rng_state,
    _state_of,
    checkpoint_problem,
    ema_module,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    load_optimizer,
    save_optimizer,
)
from .config import TrainConfig  # the ``train`` section (re-exported: ccad.training.TrainConfig)
from .train_budget import TrainingTooLong
from .train_steps import (  # noqa: F401 - re-exported: ccad.training is where callers import them
    StepBatchSampler,
    _as_dict,
    _seed_for,
    _TensorImages,
    collate,
    lr_factor,
    resolve_mixed_precision,
    step_generator,
)


@dataclass
class TrainState:
    """What a callback sees after every optimisation step (``step`` counts completed steps)."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    seconds: float
    eta_seconds: float
    preview: np.ndarray | None = None  # H x W x 3 float32 in [0, 1] on preview steps


@dataclass
class TrainResult:
    """``model`` is the EMA copy of the modules (fp32, eval mode); ``ema`` the diffusers ``EMAModel``."""

    model: nn.Module
    ema: Any
    losses: list[float]
    stopped: bool
    step: int
    out_dir: Path
    start_step: int = 0  # the checkpoint step this run continued from (0: a fresh run)


Callback = Callable[[TrainState], bool | None]



# ---------------------------------------------------------------------------------------- trainer
LossFn = Callable[[nn.Module, dict, torch.Generator], torch.Tensor]
PreviewFn = Callable[[nn.Module, torch.Tensor], np.ndarray | None]


class _Objective(nn.Module):
    """The modules plus the method's loss, so ``accelerate``/DDP wrap one module whose forward
    is the whole objective (gradient synchronisation needs the wrapper's forward to run)."""

    def __init__(self, modules: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = modules
        self._loss_fn = loss_fn

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self._loss_fn(self.inner, batch, generator)


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


class Trainer:
    """Optimise ``modules`` with ``loss_fn`` over ``dataset`` (see the module docstring).

    Args:
        modules: the trainable network(s): an ``nn.Module``, usually a method's ``ModuleDict``
            (trained in place; the returned :class:`TrainResult` holds the EMA copy).
        loss_fn: ``loss_fn(modules, batch, generator) -> 0-d loss``; ``batch`` is the collated
            dict of the dataset items (tensors stacked and on the device), ``generator`` the CPU
            generator of this step: every random draw of the objective must come from it.
        dataset: a map-style ``Dataset`` of dicts (``"image"``: ``3 x S x S`` in [0, 1],
            ``"latent"``, ...), or a tensor ``N x 3 x S x S`` in [0, 1].
        config: :class:`TrainConfig`.
        out_dir: where checkpoints go (created).
        callbacks: called with a :class:`TrainState` after every step; returning True requests a stop.
        preview: ``preview(ema_modules, image 1 x 3 x S x S) -> H x W x 3`` for the live preview.
        preview_image: the ``3 x S x S`` image in [0, 1] the preview reconstructs (default: the
            dataset's first ``"image"``; a dataset of latents has none, so give one).
    """

    def __init__(self, modules: nn.Module, loss_fn: LossFn, dataset: Dataset | torch.Tensor,
                 config: TrainConfig, out_dir: str | Path, callbacks: Sequence[Callback] = (),
                 preview: PreviewFn | None = None, preview_image: torch.Tensor | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(modules, nn.Module):
            raise TypeError(f"modules must be an nn.Module (e.g. an nn.ModuleDict), got {type(modules).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(modules, batch, generator) -> loss")
        config.validate()
        self.model = modules
        self.loss_fn = loss_fn
        self.preview_fn = preview
        self.preview_image = None if preview_image is None else torch.as_tensor(preview_image).float().cpu()
        if torch.is_tensor(dataset):
            if dataset.dim() != 4 or dataset.shape[1] != 3:
                raise ValueError(f"a tensor dataset must be N x 3 x S x S, got shape {tuple(dataset.shape)}")
            dataset = _TensorImages(dataset.detach().float().cpu())
        self.dataset = dataset
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("dataset must have a length (a map-style torch Dataset or a tensor)") from None
        if n < 1:
            raise ValueError("dataset is empty: training needs at least one good image")
        first = _as_dict(dataset[0])
        if "image" in first:
            img = torch.as_tensor(first["image"])
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"dataset images must be 3 x S x S, got shape {tuple(img.shape)}")
            lo, hi = float(img.min()), float(img.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"dataset images must be in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        self.config = config
        self.out_dir = Path(out_dir)
        self.callbacks = list(callbacks)
        self._stop = threading.Event()
        self.accelerator = None

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (thread-safe); a checkpoint is written."""
        self._stop.set()

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, step: int, epoch: int, losses: list[float], seconds: float,
                         unwrapped: nn.Module, ema: Any, optimizer: Any, lr_sched: Any) -> Path:
        from safetensors.torch import save_file

        acc = self.accelerator
        final = self.out_dir / f"{CHECKPOINT_PREFIX}{step}"
        if acc.is_main_process:
            # atomic: everything is written (and flushed) into a hidden folder that is renamed to
            # checkpoint-<step> only when complete; a kill at any point leaves the previous
            # checkpoints intact and at most a hidden .tmp folder, which resume never picks
            tmp = self.out_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_file(_state_of(unwrapped), str(tmp / "model.safetensors"))
            save_file(_ema_state(ema, unwrapped), str(tmp / "ema.safetensors"))
            save_optimizer(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, tmp)
            (tmp / "scheduler.json").write_text(json.dumps(lr_sched.state_dict(), default=lambda _: None))
            rng_t, rng_m = _rng_state()
            save_file(rng_t, str(tmp / "rng.safetensors"))
            (tmp / "rng.json").write_text(json.dumps(rng_m))
            scaler = acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None
            state = {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "losses": losses,
                     "seconds": seconds, "ema_step": int(ema.optimization_step), "num_processes": acc.num_processes,
                     "mixed_precision": str(acc.mixed_precision), "scaler": scaler,
                     "config": self.config.to_dict(), "resumed_from": list(getattr(self, "_resumed_from", [])),
                     "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}}
            for f in tmp.iterdir():
                _fsync(f)
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
            _fsync(tmp / STATE_NAME)
            _fsync(tmp)
            if final.exists():
                _remove_dir(final)
            os.replace(tmp, final)
            _fsync(self.out_dir)
            for old in list_checkpoints(self.out_dir)[: -int(self.config.keep_checkpoints)]:
                _remove_dir(old)
        acc.wait_for_everyone()
        return final

    def _resolve_resume(self, resume: bool | str | Path) -> Path | None:
        """The checkpoint to continue from. ``True``: the latest complete one; an incomplete or
        corrupt latest one (a crash while writing, a full disk) is skipped with a warning, set
        aside as a hidden ``.checkpoint-<step>.corrupt`` folder, and the previous one is used."""
        if resume is False or resume is None:
            return None
        if resume is True:
            bad = []
            for ckpt in reversed(list_checkpoints(self.out_dir)):
                problem = checkpoint_problem(ckpt)
                if problem is None:
                    break
                bad.append(ckpt)
                warnings.warn(f"{ckpt}: incomplete or corrupt checkpoint ({problem}); skipping it and "
                              "resuming from the one before", stacklevel=3)
            else:
                ckpt = None
                if bad:
                    warnings.warn(f"{self.out_dir}: no readable checkpoint left; starting a fresh run",
                                  stacklevel=3)
            self._corrupt = bad
            return ckpt
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path}: not a training checkpoint (no {STATE_NAME})")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f"{path}: incomplete or corrupt checkpoint ({problem}); resume from an earlier one")
        return path

    # ------------------------------------------------------------------ loop
    def train(self, resume: bool | str | Path = False, overwrite: bool = False) -> TrainResult:
        """Run (or continue) training to ``config.steps``; see the module docstring for the files.

        ``resume``: False starts fresh: older ``checkpoint-*`` folders in ``out_dir`` are refused
        (``ValueError`` naming ``resume`` and ``overwrite``; nothing is removed) unless
        ``overwrite=True``, which removes them (with a warning); True continues from the latest
        checkpoint in ``out_dir`` (fresh when there is none); a path continues from that checkpoint
        folder. Continuing needs the same
        ``seed``, ``batch_size`` and number of processes for the run to be bit-for-bit the same as
        an uninterrupted one; a larger ``steps`` extends training (the cosine schedule follows the
        new total).

        Multi-process: run the calling script under ``accelerate launch --multi_gpu`` (GPUs) or
        ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N`` (CPU, gloo); every process calls
        ``train()``, the main one writes checkpoints and previews, and ``config.batch_size`` is
        per process.
        """
        from accelerate import Accelerator
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel
        from safetensors.torch import load_file
        from tqdm.auto import tqdm

        cfg = self.config
        self._stop.clear()
        from .distributed import launched_world_size

        if launched_world_size() <= 1:
            # One process: accelerate's process-wide state would pin the first job's mixed precision
            # ("AcceleratorState has already been initialized"); each run starts from a fresh state.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
        self.accelerator = acc
        device = acc.device
        rank, world = acc.process_index, acc.num_processes
        self.out_dir.mkdir(parents=True, exist_ok=True)

        model = self.model.to(device)
        use_cl = bool(cfg.channels_last) and device.type == "cuda"
        if use_cl:
            model = model.to(memory_format=torch.channels_last)
        self._corrupt: list[Path] = []
        if not resume and not overwrite and list_checkpoints(self.out_dir):
            from .errors import RunFolderExistsError

            stale = list_checkpoints(self.out_dir)
            raise RunFolderExistsError(
                f"{self.out_dir}: already holds {len(stale)} checkpoint(s) ({stale[-1].name} latest); nothing was "
                f"changed: pass resume=True to continue, or overwrite=True to replace them")
        ckpt = self._resolve_resume(resume)
        if acc.is_main_process:
            for old in self.out_dir.glob(f".{CHECKPOINT_PREFIX}*"):  # left by a killed run
                if old.is_dir() and (old.name.endswith(".tmp") or ".del-" in old.name):
                    shutil.rmtree(old, ignore_errors=True)
            for bad in self._corrupt:  # out of the way, kept for inspection
                aside = bad.with_name(f".{bad.name}.corrupt")
                if aside.exists():
                    shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
        if ckpt is None and acc.is_main_process:
            # a fresh run supersedes old checkpoints here; left in place, a later resume=True
            # would pick a stale higher-step one
            stale = list_checkpoints(self.out_dir)
            if stale:
                warnings.warn(f"{self.out_dir}: overwrite: starting a fresh run, removing {len(stale)} old "
                              f"checkpoint(s) ({stale[-1].name} latest)", stacklevel=2)
                for old in stale:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        start_step, losses, prior_seconds, saved_state = 0, [], 0.0, None
        if ckpt is not None:
            saved_state = json.loads((ckpt / STATE_NAME).read_text())
            state = load_checkpoint_weights(ckpt, "model")
            model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
            start_step = int(saved_state["step"])
            losses = [float(v) for v in saved_state.get("losses", [])][:start_step]
            prior_seconds = float(saved_state.get("seconds", 0.0))
            if cfg.show_progress and acc.is_main_process:
                print(f"resuming from {ckpt.name} (step {start_step} of {int(cfg.steps)})", file=sys.stderr)
        self._resumed_from = [int(v) for v in (saved_state or {}).get("resumed_from", [])] + (
            [start_step] if ckpt is not None else [])
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the modules have no parameter that requires a gradient")
        ema = EMAModel(model.parameters(), decay=float(cfg.ema_decay))
        if ckpt is not None:
            ema_state = load_checkpoint_weights(ckpt, "ema")
            ema.shadow_params = [ema_state[name].to(device=p.device, dtype=torch.float32).clone()
                                 for name, p in model.named_parameters()]
            ema.optimization_step = int(saved_state.get("ema_step", start_step))
        else:
            ema.shadow_params = [p.detach().float().clone() for p in model.parameters()]

        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = int(cfg.steps)
        if ckpt is not None:
            load_optimizer(optimizer, ckpt)
            if (ckpt / "rng.safetensors").is_file():
                _set_rng_state(load_file(str(ckpt / "rng.safetensors")), json.loads((ckpt / "rng.json").read_text()))
        # the schedule is a function of the step: on resume it continues at start_step for this
        # run's total (a larger `steps` stretches the remaining cosine)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", float(cfg.lr))
        lr_sched = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_steps), total,
                                                   last_epoch=start_step - 1)
        # the LR scheduler is stepped by us once per optimisation step (not prepared: accelerate would
        # step it once per process)
        objective = _Objective(model, self.loss_fn)
        objective, optimizer = acc.prepare(objective, optimizer)
        if saved_state is not None and saved_state.get("scaler") and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(saved_state["scaler"])
        unwrapped = acc.unwrap_model(objective).inner
        n = len(self.dataset)  # type: ignore[arg-type]
        global_batch = int(cfg.batch_size) * world

        stopped = False
        step = start_step
        epoch = (step * global_batch) // n
        t0 = time.perf_counter()
        bar = tqdm(total=total, initial=start_step, disable=not (cfg.show_progress and acc.is_main_process),
                   desc="train", unit="step", dynamic_ncols=True)
        last_saved = start_step if ckpt is not None else -1
        if start_step < total:
            sampler = StepBatchSampler(n, cfg.batch_size, cfg.seed, start_step, total, rank, world)
            loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                num_workers=int(cfg.num_workers), pin_memory=device.type == "cuda")
            objective.train()
            for batch in loader:
                g = step_generator(cfg.seed, step, rank)
                if cfg.hflip:
                    key = next(iter(k for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 4))
                    flips = torch.rand(batch[key].shape[0], generator=g) < 0.5
                    batch = {k: (torch.where(flips[:, None, None, None], v.flip(-1), v)
                                 if torch.is_tensor(v) and v.dim() == 4 else v) for k, v in batch.items()}
                batch = _to_device(batch, device, use_cl)
                with acc.autocast():
                    loss = objective(batch, g)
                acc.backward(loss)
                if cfg.grad_clip > 0:
                    acc.clip_grad_norm_(params, float(cfg.grad_clip))
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
                ema.step(unwrapped.parameters())
                step += 1
                epoch = (step * global_batch - 1) // n
                loss_d = loss.detach().float()
                if world > 1:
                    loss_d = acc.reduce(loss_d, reduction="mean")
                loss_v = float(loss_d)
                losses.append(loss_v)
                elapsed = time.perf_counter() - t0
                done = step - start_step
                eta = elapsed / done * (total - step)
                preview = None
                if (self.preview_fn is not None and cfg.preview_every and step % int(cfg.preview_every) == 0
                        and acc.is_main_process):
                    preview = self._preview(ema, unwrapped, device)
                lr_now = float(optimizer.param_groups[0]["lr"])
                state = TrainState(step=step, total_steps=total, epoch=epoch, loss=loss_v, lr=lr_now,
                                   seconds=prior_seconds + elapsed, eta_seconds=eta, preview=preview)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr_now:.2e}")
                want_stop = False
                try:
                    for cb in self.callbacks:
                        if cb(state):
                            want_stop = True
                except TrainingTooLong:  # refused by its time budget: keep what ran, then say why
                    bar.close()
                    self._save_checkpoint(step, epoch, losses, prior_seconds + elapsed, unwrapped, ema,
                                          optimizer, lr_sched)
                    raise
                want_stop = want_stop or self._stop.is_set()
                if world > 1:
                    flag = torch.tensor([1.0 if want_stop else 0.0], device=device)
                    want_stop = bool(acc.reduce(flag, reduction="sum").item() > 0)
                if want_stop and step < total:
                    stopped = True
                    break
                if cfg.checkpoint_every and step % int(cfg.checkpoint_every) == 0 and step < total:
                    self._save_checkpoint(step, epoch, losses, prior_seconds + elapsed, unwrapped, ema,
                                          optimizer, lr_sched)
                    last_saved = step
        bar.close()
        if step != last_saved:
            self._save_checkpoint(step, epoch, losses, prior_seconds + time.perf_counter() - t0, unwrapped, ema,
                                  optimizer, lr_sched)
        objective.eval()
        return TrainResult(model=ema_module(ema, unwrapped), ema=ema, losses=list(losses), stopped=stopped,
                           step=step, out_dir=self.out_dir, start_step=start_step)

    @torch.no_grad()
    def _preview(self, ema: Any, unwrapped: nn.Module, device: torch.device) -> np.ndarray | None:
        if self.preview_image is not None:
            x = self.preview_image
        else:
            item = _as_dict(self.dataset[0])
            if "image" not in item:
                return None
            x = torch.as_tensor(item["image"]).float()
        x = x.unsqueeze(0).to(device) if x.dim() == 3 else x.to(device)
        return self.preview_fn(ema_module(ema, unwrapped), x)


def saved_progress(out_dir: str | Path) -> dict[str, Any] | None:
    """Where the run in ``out_dir`` stands, from its latest readable checkpoint: ``step``,
    ``epoch``, ``total_steps`` (the steps it was trained for), ``seconds`` and the loss history
    ``losses`` (one per completed step, step 1 first); None when it has no checkpoint. What a
    resumed run continues from (its curve goes on at ``step + 1``)."""
    for ckpt in reversed(list_checkpoints(out_dir)):
        if checkpoint_problem(ckpt) is not None:
            continue  # resume skips it too
        try:
            state = json.loads((ckpt / STATE_NAME).read_text())
            step = int(state["step"])
            losses = [float(v) for v in state.get("losses", [])][:step]
            return {"step": step, "epoch": int(state.get("epoch", 0)),
                    "total_steps": int((state.get("config") or {}).get("steps", step)),
                    "seconds": float(state.get("seconds", 0.0)), "losses": losses, "checkpoint": ckpt}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
