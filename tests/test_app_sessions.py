"""A background job belongs to the browser session that started it (issue 20 item 7): another
session sees it read-only (it can neither stop nor resume it); the owner can, also after a reload
(the id lives in the browser). Controller level, no browser; the browser test is
tests/test_browser_sessions.py."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.controller import AppController, Engine, UserError


def endless_train(*_a: Any, callbacks: Any = (), cancel: Any = None, **_k: Any) -> None:
    """A training run that reports a step every 20 ms until it is asked to stop."""
    from types import SimpleNamespace

    step = 0
    while not (cancel is not None and cancel()):
        step += 1
        for cb in callbacks:
            cb(SimpleNamespace(step=step, total_steps=10_000, epoch=0, loss=1.0 / step, lr=1e-3,
                               eta_seconds=100.0))
        time.sleep(0.02)
    return None


def good_folder(root: Path, n: int = 3) -> Path:
    d = root / "good"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"g{i}.png")
    return d


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.05)


@pytest.fixture()
def ctl(tmp_path: Path) -> AppController:
    root = tmp_path / "data"
    good_folder(root)
    return AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None,
                         engine=Engine(train=endless_train))


def test_only_the_starting_session_stops_or_resumes_its_job(ctl: AppController) -> None:
    ctl.start_training("good", None, None, "tiny", 32, 100, 2, variant="ccad-v", owner="browser-a")
    wait_for(lambda: (ctl.jobs.snapshot() or {}).get("step", 0) > 0)
    other = ctl.training_status(owner="browser-b")
    assert not other["mine"] and "read-only" in other["status"] and not other["can_resume"]
    assert "another browser session" in ctl.stop_training(owner="browser-b")
    s0 = ctl.jobs.snapshot()["step"]  # polled, not slept on: the job goes on training after the refusal
    wait_for(lambda: (ctl.jobs.snapshot() or {}).get("step", 0) > s0 + 2)
    assert ctl.jobs.busy()  # still running: the other session's stop did nothing
    assert ctl.training_status(owner="browser-a")["mine"]
    assert "Stop requested" in ctl.stop_training(owner="browser-a")
    ctl.jobs.join(30)
    assert ctl.jobs.snapshot()["state"] == "stopped"
    with pytest.raises(UserError, match="another browser session"):
        ctl.start_training(None, None, None, "", 0, 0, 0, resume=True, owner="browser-b")
    assert not ctl.training_status(owner="browser-b")["can_resume"]
    assert ctl.training_status(owner="browser-a")["can_resume"]
    assert "resumed" in ctl.start_training(None, None, None, "", 0, 0, 0, resume=True, owner="browser-a")
    wait_for(lambda: ctl.jobs.busy())
    assert "another browser session" in ctl.stop_training(owner="browser-b")
    assert "Stop requested" in ctl.stop_training(owner="browser-a")
    ctl.jobs.join(30)
