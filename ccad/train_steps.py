"""What a training step is made of, as pure functions of ``(seed, step, process index)``: its
random generator, its batch's dataset indices (:class:`StepBatchSampler`), its learning-rate
factor (diffusers' cosine schedule with warm-up), the collation of dataset items, and the
mixed-precision choice. :class:`ccad.training.Trainer` runs the loop on them; ``ccad.training``
re-exports every name.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def _seed_for(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer keys (numpy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1, 1 << 32], dtype=np.uint64)) & ((1 << 63) - 1))


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator for the randomness of one training step on one process."""
    return torch.Generator().manual_seed(_seed_for(seed, 1, step, rank))


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate factor at ``step``: diffusers' cosine schedule with linear warm-up."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, warmup_steps, total_steps)
    return float(sched.lr_lambdas[0](step))


class _TensorImages(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i]}


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if torch.is_tensor(item):
        return {"image": item}
    raise TypeError(f"dataset items must be dicts of tensors (e.g. 'image': 3 x S x S in [0, 1]), "
                    f"got {type(item).__name__}")


def collate(items: list[Any]) -> dict[str, Any]:
    """Stack the tensors of dict items by key (floats as float32); other values become lists."""
    dicts = [_as_dict(it) for it in items]
    out: dict[str, Any] = {}
    for key in dicts[0]:
        values = [d[key] for d in dicts]
        if torch.is_tensor(values[0]) or isinstance(values[0], np.ndarray):
            t = torch.stack([torch.as_tensor(v) for v in values])
            out[key] = t.float() if t.is_floating_point() else t
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class StepBatchSampler(Sampler):
    """Yields the dataset indices of steps ``start..end-1`` for one process.

    Global sample position ``p = step * batch * world + rank * batch + k``; epoch ``p // n`` uses
    the permutation seeded by ``(seed, epoch)``. So the batch of a step never depends on where a
    run started, and each process sees a disjoint shard of the global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, end: int, rank: int = 0,
                 world: int = 1) -> None:
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start, self.end, self.rank, self.world = int(start), int(end), int(rank), int(world)
        self._perm: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            g = torch.Generator().manual_seed(_seed_for(self.seed, 2, epoch))
            self._perm[epoch] = torch.randperm(self.n, generator=g)
        return self._perm[epoch]

    def indices(self, step: int) -> list[int]:
        base = step * self.batch_size * self.world + self.rank * self.batch_size
        out = []
        for k in range(self.batch_size):
            p = base + k
            out.append(int(self._permutation(p // self.n)[p % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.end - self.start)



def resolve_mixed_precision(value: str) -> str:
    """``auto`` -> ``bf16`` (or ``fp16`` without bf16 support) on CUDA, ``no`` on CPU."""
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"
