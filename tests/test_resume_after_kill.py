"""A training process killed with SIGKILL resumes with at most one checkpoint interval lost
(issue 8): checkpoints are written atomically, a half-written or corrupt latest checkpoint is
never resumed from (the previous one is, with a warning)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ccad.training import TrainConfig, Trainer, checkpoint_problem, list_checkpoints, load_checkpoint_weights

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))


def loss_fn(model, batch, generator):
    x = batch["image"]
    noise = torch.randn(x.shape, generator=generator)
    return ((model.net(x + 0.1 * noise) - x) ** 2).mean()


def run(out_dir: Path, steps: int, resume=False, every: int = 2, stop_at: int = 0):
    data = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-2, checkpoint_every=every, keep_checkpoints=2,
                      show_progress=False, mixed_precision="no")
    stop = [lambda state: state.step == stop_at]
    return Trainer(Tiny(), loss_fn, data, cfg, out_dir, callbacks=stop).train(resume=resume)


def step_of(p: Path) -> int:
    return int(p.name.rsplit("-", 1)[1])


def test_a_corrupt_or_half_written_latest_checkpoint_is_skipped(tmp_path):
    full = run(tmp_path / "full", 8)
    out = tmp_path / "run"
    assert run(out, 8, stop_at=6).stopped  # leaves checkpoint-4 and checkpoint-6
    assert [step_of(p) for p in list_checkpoints(out)] == [4, 6]
    assert checkpoint_problem(out / "checkpoint-6") is None
    # a crash while writing checkpoint-8 (the hidden temporary folder) and a truncated latest one
    half = out / ".checkpoint-8.tmp"
    half.mkdir()
    (half / "trainer_state.json").write_text(json.dumps({"step": 8}))
    weights = out / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "model.safetensors" in checkpoint_problem(out / "checkpoint-6")
    with pytest.raises(ValueError, match="checkpoint-6: incomplete or corrupt"):
        run(out, 8, resume=out / "checkpoint-6")
    with pytest.warns(UserWarning, match=r"checkpoint-6: incomplete or corrupt checkpoint \(model.safetensors"):
        res = run(out, 8, resume=True)
    assert res.start_step == 4 and res.step == 8
    # continued from step 4 as the uninterrupted run (to float32 rounding: another process)
    assert res.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    for k, v in load_checkpoint_weights(out / "checkpoint-8", "model").items():
        torch.testing.assert_close(v, load_checkpoint_weights(tmp_path / "full" / "checkpoint-8", "model")[k],
                                   rtol=1e-4, atol=1e-5, msg=k)
    assert not half.exists() and (out / ".checkpoint-6.corrupt").is_dir()  # set aside, not resumed again
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["resumed_from"] == [4]


def test_sigkill_during_training_loses_at_most_one_checkpoint_interval(tmp_path):
    from ccad.data.synthetic import write_dataset
    from ccad.pipeline import AnomalyDetector

    root = write_dataset(tmp_path / "data", kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1,
                         size=32, seed=0, defects=("spot",))
    good = root / "fibrous" / "train" / "good"
    (good / "notes.txt").write_text("lot 7")  # reported as skipped, not lost silently
    out = tmp_path / "run"
    steps, every = 12, 3
    cmd = [sys.executable, "-m", "ccad.cli", "train", str(good), "--out", str(out), "--variant", "ccad-v",
           "--preset", "tiny", "--image-size", "32", "--steps", str(steps), "--checkpoint-every", str(every),
           "--batch-size", "2", "--size", "8", "--option", "diffusion.steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = [0]  # the last step the progress bar showed

    def read_progress() -> None:
        buf = ""
        while True:
            ch = proc.stderr.read(1)
            if not ch:
                return
            buf = (buf + ch)[-200:]
            m = re.findall(rf"(\d+)/{steps} \[", buf)
            if m:
                seen[0] = max(seen[0], int(m[-1]))

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            done = [step_of(p) for p in list_checkpoints(out)]
            if done and max(done) >= 2 * every and seen[0] > max(done):  # killed between two checkpoints
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training finished or died before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    assert proc.returncode == -signal.SIGKILL
    on_disk = [step_of(p) for p in list_checkpoints(out)]
    latest = max(on_disk)
    assert latest < steps and not (out / "model").exists()

    res = subprocess.run(cmd + ["--resume", "--quiet"], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipped 1 file(s) with unsupported extensions: notes.txt" in res.stderr
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["resumed_from"] == [latest]  # the latest checkpoint on disk at the kill
    assert seen[0] - latest <= every  # steps lost to the kill: at most one checkpoint interval
    assert len(state["losses"]) == steps
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps"] == steps
    det = AnomalyDetector.from_pretrained(out / "model", device="cpu")
    assert det.info["train_steps"] == steps
    assert [Path(s["path"]).name for s in det.info["skipped"]] == ["notes.txt"]
    assert det.predict(str(sorted(good.glob("*.png"))[0])).score >= 0
