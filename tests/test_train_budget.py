"""A run too long for this machine says so after its first steps (issue 24 item 2): the estimate
comes from the measured step time; over the budget the run is refused with what fits, after a
checkpoint that ``resume`` continues from (nothing done is lost)."""
from __future__ import annotations

import pytest

from ccad.train_budget import TimeBudget, TrainingTooLong, format_seconds
from ccad.training import TrainState
from tests.test_training import DictDataset, cfg, small_model, texture_images, trainer


def _state(step: int, total: int, eta: float) -> TrainState:
    return TrainState(step=step, total_steps=total, epoch=0, loss=1.0, lr=1e-3, seconds=0.0, eta_seconds=eta)


def test_the_estimate_is_said_once_after_the_probe_steps_and_a_short_run_goes_on() -> None:
    said: list[str] = []
    budget = TimeBudget(max_seconds=3600, probe_steps=3, say=said.append)
    assert budget(_state(1, 100, 990.0)) is False and said == []
    assert budget(_state(2, 100, 980.0)) is False and said == []
    assert budget(_state(3, 100, 970.0)) is False  # 10 s/step x 97 steps: 16 min, under the hour
    assert said == ["estimated 16 min for the 97 steps left (10.00 s/step measured over 3 step(s) on this machine)"]
    assert budget(_state(4, 100, 960.0)) is False and len(said) == 1


def test_a_run_over_the_budget_is_refused_with_what_fits() -> None:
    budget = TimeBudget(max_seconds=3600, probe_steps=3)
    budget(_state(1, 2000, 1999 * 7.5))
    budget(_state(2, 2000, 1998 * 7.5))
    with pytest.raises(TrainingTooLong) as err:
        budget(_state(3, 2000, 1997 * 7.5))  # 7.5 s/step: 4 h 9 min
    msg = str(err.value)
    assert "estimated 4 h 9 min for the 1997 steps left" in msg and "About 480 more steps fit" in msg
    assert "checkpoint at step 3" in msg and "--resume" in msg and "--steps 483" in msg and "--yes" in msg
    assert format_seconds(45) == "45 s" and format_seconds(600) == "10 min"


def test_the_trainer_writes_a_checkpoint_before_the_refusal_and_resume_continues(tmp_path) -> None:
    data = DictDataset(texture_images(6))
    refused = trainer(small_model(), data, cfg(steps=6), tmp_path, callbacks=[TimeBudget(max_seconds=0, probe_steps=2)])
    with pytest.raises(TrainingTooLong, match="checkpoint at step 2"):
        refused.train()
    assert (tmp_path / "checkpoint-2").is_dir()
    resumed = trainer(small_model(seed=5), data, cfg(steps=6), tmp_path).train(resume=True)
    assert resumed.start_step == 2 and resumed.step == 6


def test_the_step_time_is_measured_before_a_run_by_a_short_real_probe(tmp_path, monkeypatch) -> None:
    """Issue 24: the Train tab's estimate before Start times real training steps of the method on
    synthetic images; the probe stops after them (nothing calibrated or saved, its folder removed)."""
    import tempfile

    import torch

    from ccad.methods import get_method
    from ccad.train_budget import estimate_text, steps_that_fit
    from ccad.train_probe import measure_step_seconds

    torch.set_num_threads(1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = get_method("feat-diff").default_config("tiny")
    got = measure_step_seconds("feat-diff", cfg, image_size=32, batch_size=2, probe_steps=2)
    assert got["steps"] == 2 and got["per_step"] > 0 and got["seconds"] >= got["setup_seconds"] >= 0
    assert list(tmp_path.iterdir()) == []  # the probe's images and run folder are gone
    line = estimate_text(2.0, 300, 2, "of this method ")
    assert line == "estimated 10 min for 300 steps (2.00 s/step measured over 2 step(s) of this method on this machine)"
    assert steps_that_fit(2.0, 600) == 300 and steps_that_fit(0.0, 600) == 0
