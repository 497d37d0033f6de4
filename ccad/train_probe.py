"""A short real training probe: seconds per step of a method on this machine, measured before a
run (the app's Train tab shows the estimate before Start, issue 24). Its own module because it runs
:func:`ccad.pipeline.train_detector`, which sits above :mod:`ccad.train_budget` (the budget the
training loop itself reads): the layers keep one direction (tests/test_architecture.py)."""
from __future__ import annotations

from typing import Any


class _ProbeDone(Exception):
    """Raised by the probe's callback once its steps are timed (ends the probe run early)."""


def measure_step_seconds(variant: str, method: Any = None, image_size: int = 128, batch_size: int = 4,
                         probe_steps: int = 3, device: Any = None, images: int = 12) -> dict[str, Any]:
    """Seconds per training step of ``variant`` with its config ``method`` at ``image_size`` and
    ``batch_size``, measured on this machine: ``train_detector`` runs on ``images`` synthetic good
    textures (written to a temporary folder, removed after) and the wall time of steps 2 ..
    ``probe_steps + 1`` is taken (the first step's warm-up is left out), the same loop, networks,
    loss and batch a real run has. The probe stops there: nothing is calibrated or saved. Returns
    ``{"per_step", "steps", "setup_seconds", "seconds"}`` (``setup_seconds``: what ran before the
    first step here: the bank, cached features or latents; a real run's setup grows with its images).
    """
    import tempfile
    import time
    from pathlib import Path

    from .config import TrainConfig
    from .data.synthetic import write_dataset
    from .pipeline import train_detector

    if probe_steps < 1:
        raise ValueError(f"probe_steps must be >= 1, got {probe_steps}")
    times: list[float] = []
    t0 = time.perf_counter()

    def tick(state: Any) -> bool:
        times.append(time.perf_counter())
        if len(times) > probe_steps:
            raise _ProbeDone()
        return False

    with tempfile.TemporaryDirectory(prefix="ccad-step-probe-") as tmp:
        n = max(int(images), 2 * int(batch_size) + 2)
        data = write_dataset(Path(tmp) / "data", kinds=("fibrous",), n_train=n, n_test_good=0, n_test_defect=0,
                             size=int(image_size), seed=0, defects=("spot",)) / "fibrous" / "train" / "good"
        train = TrainConfig(steps=probe_steps + 1, batch_size=int(batch_size), checkpoint_every=0,
                            preview_every=0, show_progress=False)
        try:
            train_detector(str(data), Path(tmp) / "run", variant=variant, method=method, image_size=int(image_size),
                           train=train, callbacks=(tick,), device=device, calibration_fraction=0.25)
        except _ProbeDone:
            pass
    if len(times) < probe_steps + 1:
        raise RuntimeError(f"the probe run of {variant} ended after {len(times)} step(s); nothing to time")
    per_step = (times[probe_steps] - times[0]) / probe_steps
    return {"per_step": per_step, "steps": probe_steps, "setup_seconds": times[0] - t0 - per_step,
            "seconds": time.perf_counter() - t0}
