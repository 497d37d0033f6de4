"""A training run that would not finish in reasonable time says so after its first steps.

On two CPU cores the README's ``ccad train DATA --out RUN`` (CCAD(V), 2000 steps) showed an ETA of
4 h 11 min after 12 steps with no warning before (issue 24 item 2). :class:`TimeBudget` is a
Trainer callback: after ``probe_steps`` steps it prints the estimate measured on this machine
(``s/step`` times the steps left) and, when that is over ``max_seconds``, refuses the run with
:class:`TrainingTooLong`, whose message gives the estimate, how many steps fit in the budget, and
how to go on. The Trainer writes a checkpoint before the refusal propagates, so ``--resume``
continues from it and nothing done (bank, cached features, the probe steps) is lost.

The CLI adds it when no CUDA device is present, unless ``--yes``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional


class TrainingTooLong(RuntimeError):
    """A run estimated over its time budget (the message says by how much and what fits)."""


def format_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


class TimeBudget:
    """Trainer callback: estimate the run from its first ``probe_steps`` steps; refuse it over
    ``max_seconds`` (:class:`TrainingTooLong`). ``say`` receives the estimate line."""

    def __init__(self, max_seconds: float = 3600.0, probe_steps: int = 3, say: Optional[Callable[[str], None]] = None,
                 hint: str = "") -> None:
        if probe_steps < 1:
            raise ValueError(f"probe_steps must be >= 1, got {probe_steps}")
        self.max_seconds, self.probe_steps, self.say, self.hint = float(max_seconds), int(probe_steps), say, hint
        self.first_step: Optional[int] = None
        self.done = False
        self.estimate: Optional[float] = None

    def __call__(self, state: Any) -> bool:
        if self.done:
            return False
        if self.first_step is None:  # the step this process started from (a resumed run starts late)
            self.first_step = int(state.step) - 1
        ran = int(state.step) - self.first_step
        if ran < self.probe_steps and state.step < state.total_steps:
            return False
        self.done = True
        left = int(state.total_steps) - int(state.step)
        if left <= 0:  # the run is over already: nothing to estimate
            return False
        per_step = float(state.eta_seconds) / left if left > 0 else 0.0
        self.estimate = float(state.eta_seconds)
        line = (f"estimated {format_seconds(self.estimate)} for the {left} steps left "
                f"({per_step:.2f} s/step measured over {ran} step(s) on this machine)")
        if self.say is not None:
            self.say(line)
        if self.estimate > self.max_seconds:
            fits = int(self.max_seconds / per_step) if per_step > 0 else left
            raise TrainingTooLong(
                f"{line}: over the {format_seconds(self.max_seconds)} budget without a GPU. About {fits} more "
                f"steps fit in it. A checkpoint at step {state.step} was written: add --resume with fewer --steps "
                f"(e.g. --steps {int(state.step) + fits}) or a smaller --preset, or --yes to train this long anyway"
                + (f" ({self.hint})" if self.hint else ""))
        return False


# ------------------------------------------------------------------ the estimate before a run starts

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


def steps_that_fit(per_step: float, seconds: float) -> int:
    """How many steps of ``per_step`` seconds fit in ``seconds``."""
    return int(seconds // per_step) if per_step > 0 else 0


def estimate_text(per_step: float, steps: int, measured_steps: int, what: str = "") -> str:
    """One line: the estimated training time of ``steps`` steps at ``per_step`` seconds, saying it
    is an estimate and how it was obtained (the wording of :class:`TimeBudget`'s line)."""
    return (f"estimated {format_seconds(per_step * int(steps))} for {int(steps)} steps "
            f"({per_step:.2f} s/step measured over {measured_steps} step(s) {what}on this machine)")
