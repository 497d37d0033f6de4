"""Many images, many processes: shard ``ccad predict`` / ``ccad evaluate`` across the processes
that ``accelerate launch`` (or ``torchrun``) starts, and merge what they found.

Every process gets one contiguous slice of the inputs, cut at batch boundaries, so each batch
holds the same images as in a single-process run and concatenating the slices in rank order
gives the single-process order back. Small results (rows, paths, errors) travel with
``accelerate.utils.gather_object``; large arrays (evaluation maps) go through per-rank ``.npz``
files in a folder every process can see. The main process writes the merged output.

Run alone (no launcher), :func:`current` returns a one-process :class:`Shard` without
touching ``accelerate`` or ``torch.distributed``: single-process behaviour is unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, TypeVar

T = TypeVar("T")

# what the launchers set: torchrun / accelerate launch --multi_gpu (WORLD_SIZE), MPI (the others)
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """How many processes the launcher says there are (1 when not launched)."""
    for var in _WORLD_VARS:
        try:
            n = int(os.environ.get(var, "1"))
        except ValueError:
            continue
        if n > 1:
            return n
    return 1


@dataclass
class Shard:
    """This process's place among the processes: ``rank`` of ``world``; ``state`` is the
    ``accelerate.PartialState`` (None when running alone)."""

    rank: int = 0
    world: int = 1
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def bounds(self, n: int, batch_size: int = 1) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous slice of ``n`` items, cut at multiples of
        ``batch_size`` (whole batches per rank; ranks past the last batch get an empty slice)."""
        b = max(int(batch_size), 1)
        n_batches = -(-n // b)
        lo = self.rank * n_batches // self.world
        hi = (self.rank + 1) * n_batches // self.world
        return min(lo * b, n), min(hi * b, n)

    def split(self, items: Sequence[T], batch_size: int = 1) -> list[T]:
        """This rank's slice of ``items`` (all of them when running alone)."""
        lo, hi = self.bounds(len(items), batch_size)
        return list(items[lo:hi])

    def gather(self, values: list[T]) -> list[list[T]]:
        """Every rank's ``values``, as one list per rank in rank order (on every rank)."""
        if not self.distributed:
            return [list(values)]
        from accelerate.utils import gather_object

        # gather_object flattens one level: wrap so each rank's list survives as one element
        return [list(v) for v in gather_object([list(values)])]

    def broadcast(self, value: T) -> T:
        """The main process's ``value`` on every rank."""
        if not self.distributed:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def wait(self) -> None:
        """Block until every rank gets here."""
        if self.distributed:
            self.state.wait_for_everyone()

    def close(self) -> None:
        """Leave the process group (after the last collective call)."""
        if self.distributed:
            self.state.destroy_process_group()


def current() -> Shard:
    """The :class:`Shard` of this process. Under a launcher this starts ``accelerate``'s
    ``PartialState`` (gloo on CPU, NCCL on GPUs; each process on its own GPU); call it before
    loading the model so ``cuda`` means this process's GPU."""
    if launched_world_size() <= 1:
        return Shard()
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1:  # pragma: no cover - a launcher variable without a process group
        return Shard()
    return Shard(rank=int(state.process_index), world=int(state.num_processes), state=state)


def shard_folder(shard: Shard, folder: Optional[str]) -> str:
    """A folder for per-rank files that every rank uses: ``folder`` when given (it must be on
    a file system all machines share when the processes run on several), else a fresh temporary
    folder made by the main process, its path sent to the others (one machine)."""
    import tempfile

    if folder:
        os.makedirs(folder, exist_ok=True)
        return folder
    return shard.broadcast(tempfile.mkdtemp(prefix="ccad-shards-") if shard.is_main else None)
