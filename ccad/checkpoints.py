"""Training checkpoints: the folder format the :class:`ccad.training.Trainer` writes and resumes.

::

    out_dir/checkpoint-<step>/
        model.safetensors                  trained weights of every module (``<module>.<param>``)
        ema.safetensors                    EMA weights, same keys
        optimizer.safetensors + optimizer.json   AdamW state flattened to tensors + JSON
        scheduler.json                     LR scheduler state
        rng.safetensors + rng.json         torch / CUDA / numpy / python RNG states
        trainer_state.json                 step, epoch, losses, seconds, EMA step, config

No pickle anywhere. Here: the state dicts (trained and EMA), the optimizer flattened to
safetensors + JSON, the RNG states, listing / validating checkpoint folders, and the crash-safe
file helpers (fsync, rename-then-delete). ``ccad.training`` re-exports every name.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
CHECKPOINT_FORMAT = 1


def _state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _ema_state(ema: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with the EMA shadow in place of the trained parameters."""
    state = _state_of(module)
    for (name, _), shadow in zip(module.named_parameters(), ema.shadow_params):
        state[name] = shadow.detach().float().cpu().contiguous()
    return state


def ema_module(ema: Any, module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (fp32, eval) holding the EMA weights."""
    copy_ = copy.deepcopy(module).float().eval().requires_grad_(False)
    ema.copy_to(copy_.parameters())
    return copy_


def load_checkpoint_weights(checkpoint: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """The ``model`` or ``ema`` state dict of a checkpoint folder (keys ``<module>.<param>``)."""
    from safetensors.torch import load_file

    f = Path(checkpoint) / f"{which}.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; a training checkpoint has model.safetensors and ema.safetensors")
    return load_file(str(f))


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Flatten an optimizer state dict to ``optimizer.safetensors`` (tensors) + ``optimizer.json``."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Inverse of :func:`save_optimizer` (no pickle involved)."""
    from safetensors.torch import load_file

    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "numpy_keys" in tensors and "numpy" in meta:
        n = meta["numpy"]
        np.random.set_state((n[0], tensors["numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    if "python" in meta:
        p = meta["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir`` (those with a trainer state), oldest step first."""
    out_dir = Path(out_dir)
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", p.name)
            if m and p.is_dir() and (p / STATE_NAME).is_file():
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


_CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
                     "scheduler.json", "rng.safetensors", "rng.json")


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it is complete and readable).

    Checks the trainer state, every file it lists (present, at the size it was written), that
    the JSON files parse and that the safetensors headers read; a file truncated or lost by a
    crash or a full disk is reported, not discovered half-way through loading."""
    from safetensors import safe_open

    ckpt = Path(checkpoint)
    try:
        state = json.loads((ckpt / STATE_NAME).read_text())
        int(state["step"])
    except FileNotFoundError:
        return f"no {STATE_NAME}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{STATE_NAME} unreadable ({exc})"
    sizes = state.get("files") or {name: None for name in _CHECKPOINT_FILES[:4]}
    for name, size in sizes.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} missing"
        if size is not None and f.stat().st_size != int(size):
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        try:
            if name.endswith(".json"):
                json.loads(f.read_text())
            elif name.endswith(".safetensors"):
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
        except Exception as exc:  # noqa: BLE001 - any reader error means "cannot resume from this"
            return f"{name} unreadable ({exc})"
    return None


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, where the platform allows it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    """Delete a folder so that it is never seen half-deleted: rename it to a hidden name first."""
    gone = path.with_name(f".{path.name}.del-{os.getpid()}")
    try:
        os.replace(path, gone)
    except OSError:
        gone = path
    shutil.rmtree(gone, ignore_errors=True)
