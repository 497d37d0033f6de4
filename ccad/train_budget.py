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

def steps_that_fit(per_step: float, seconds: float) -> int:
    """How many steps of ``per_step`` seconds fit in ``seconds``."""
    return int(seconds // per_step) if per_step > 0 else 0


def estimate_text(per_step: float, steps: int, measured_steps: int, what: str = "") -> str:
    """One line: the estimated training time of ``steps`` steps at ``per_step`` seconds, saying it
    is an estimate and how it was obtained (the wording of :class:`TimeBudget`'s line)."""
    return (f"estimated {format_seconds(per_step * int(steps))} for {int(steps)} steps "
            f"({per_step:.2f} s/step measured over {measured_steps} step(s) {what}on this machine)")
