"""Every trainer setting the benchmarks use is settable from the command line (issue 24 item 2):
``--option warmup_steps=30`` reaches the TrainConfig; a setting with its own flag is pointed to
it; an unknown key names both the method's fields and the trainer settings."""
from __future__ import annotations

from typing import Any

import pytest

from ccad.cli import main, trainer_option_names
from ccad.config import TrainConfig


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import ccad.pipeline

    seen: dict[str, Any] = {}

    def fake_train(data: Any, out: Any, **kw: Any) -> Any:
        seen.update(kw)
        raise SystemExit(0)  # nothing to train: the arguments are what this test checks

    monkeypatch.setattr(ccad.pipeline, "train_detector", fake_train)
    return seen


def test_trainer_settings_reach_the_train_config(captured: dict[str, Any], tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--variant", "ccad-v", "--steps", "40",
              "--option", "warmup_steps=30", "--option", "ema_decay=0.99", "--option", "diffusion.steps=3"])
    train: TrainConfig = captured["train"]
    assert (train.steps, train.warmup_steps, train.ema_decay) == (40, 30, 0.99)
    assert captured["method"].diffusion.steps == 3  # a method field still goes to the method


def test_a_setting_with_a_flag_and_an_unknown_key_are_refused_by_name(tmp_path, capsys) -> None:
    args = ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--variant", "ccad-v"]
    assert main([*args, "--option", "lr=0.1"]) == 2
    assert "--option lr: a trainer setting with a flag of its own; use --lr" in capsys.readouterr().err
    assert main([*args, "--option", "warmup=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'warmup'" in err and "trainer settings: " in err and "warmup_steps" in err
    assert main([*args, "--option", "warmup_steps=-1"]) == 2  # validated before any work
    assert "warmup_steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_help_lists_the_trainer_settings() -> None:
    assert {"warmup_steps", "weight_decay", "ema_decay", "grad_clip", "hflip"} <= set(trainer_option_names())
    assert "steps" not in trainer_option_names() and "lr" not in trainer_option_names()


def test_without_a_gpu_the_cli_trains_under_an_hour_budget_unless_yes(captured: dict[str, Any], tmp_path) -> None:
    import torch

    from ccad.train_budget import TimeBudget

    if torch.cuda.is_available():
        pytest.skip("the budget applies without a GPU")
    args = ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--variant", "ccad-v"]
    for extra, budget in (([], 3600.0), (["--yes"], float("inf"))):
        with pytest.raises(SystemExit):
            main([*args, *extra])
        (cb,) = [c for c in captured["callbacks"] if isinstance(c, TimeBudget)]
        assert cb.max_seconds == budget
