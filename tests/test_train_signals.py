"""SIGTERM / SIGINT during ``ccad train`` (issue 20 item 7): the run stops after the current step,
writes a checkpoint and exits (it used to die with up to ``checkpoint_every - 1`` steps lost); the
checkpoint resumes. A real process, a real signal."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ccad.data.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]


def _train_cmd(data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ccad.cli", "train", str(data), "--out", str(run), "--variant", "ccad-v",
            "--preset", "tiny", "--image-size", "32", "--size", "4", "--batch-size", "2", "--steps", str(steps),
            "--checkpoint-every", "0", "--yes", *extra]  # --yes: the CPU time budget must not end it first


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_training_checkpoints_then_exits(tmp_path, sig):
    root = write_dataset(tmp_path / "data", kinds=("fibrous",), n_train=5, n_test_good=1, n_test_defect=1,
                         size=32, seed=6, defects=("spot",))
    data, run = root / "fibrous", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # no periodic checkpoint (--checkpoint-every 0) and far more steps than it will run
    proc = subprocess.Popen(_train_cmd(data, run, 100000), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=env)
    err: list[str] = []
    under_way = threading.Event()

    def read() -> None:  # under way: the "training ..." phase line, or the progress bar past step 0
        while chunk := proc.stderr.read1(4096):
            err.append(chunk.decode("utf-8", "replace"))
            if re.search(r"^\[\d+:\d\d\] training$|train:.*\b[1-9]\d*/100000", "".join(err), re.M):
                under_way.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert under_way.wait(timeout=600), "training never started:\n" + "".join(err)
        proc.send_signal(sig)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    text = "".join(err)
    assert proc.returncode == 128 + sig, text
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, text
    step = int(ckpts[-1].name.split("-")[1])
    assert 1 <= step < 100000 and f"stopped at step {step}" in text and "--resume" in text
    assert not (run / "model").exists()  # it exited: no half-calibrated model
    if sig == signal.SIGTERM:  # the checkpoint continues the run: one more step, then the model is saved
        done = subprocess.run(_train_cmd(data, run, step + 1, "--resume", "--quiet"), capture_output=True,
                              text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == step + 1
        assert (run / "model" / "config.json").is_file()
