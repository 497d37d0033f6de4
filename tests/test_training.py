"""Trainer: learning, safetensors checkpoints, callbacks/stop, bit-for-bit resume, two processes."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ccad.diffusion import ddad_reconstruct, epsilon_loss, make_scheduler
from ccad.models import BankConditionedUNet, DenoiserConfig, images_to_model, model_to_images
from ccad.training import (
    StepBatchSampler,
    TrainConfig,
    Trainer,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    lr_factor,
)

S, D = 16, 8
ROOT = Path(__file__).resolve().parents[1]


def small_model(seed: int = 0) -> BankConditionedUNet:
    torch.manual_seed(seed)
    return BankConditionedUNet.from_spec(DenoiserConfig.preset("tiny", sample_size=S, bank_dim=D,
                                                               block_out_channels=(32, 32), attention_resolutions=(8,)))


def texture_images(n: int = 8, size: int = S, seed: int = 0) -> torch.Tensor:
    """Striped textures in [0, 1], N x 3 x S x S."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(size, dtype=torch.float32)
    out = []
    for i in range(n):
        f = 2 * math.pi * (1 + i % 3) / size
        stripes = 0.5 + 0.4 * torch.sin(f * x[None, :] + float(torch.rand(1, generator=g)) * 6.28)
        img = stripes.expand(size, size).unsqueeze(0).repeat(3, 1, 1) * torch.tensor([1.0, 0.8, 0.6])[:, None, None]
        out.append((img + 0.03 * torch.randn(3, size, size, generator=g)).clamp(0, 1))
    return torch.stack(out)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": 0}


BANK = torch.randn(12, D, generator=torch.Generator().manual_seed(1))
DDPM = make_scheduler()


def eps_objective(model, batch, generator):
    """CCAD eq. 15 as a Trainer objective (what the ccad-v method hands the Trainer)."""
    return epsilon_loss(model, images_to_model(batch["image"]), BANK, DDPM, generator=generator)


def trainer(model, data, config, out_dir, **kw) -> Trainer:
    return Trainer(model, eps_objective, data, config, out_dir, **kw)


def ddad_preview(model, x):
    x_hat = ddad_reconstruct(model, images_to_model(x), BANK, DDPM, start_step=50, steps=2, guidance=2.0, eta=1.0,
                             generator=torch.Generator().manual_seed(3))
    return model_to_images(x_hat)[0].permute(1, 2, 0).float().cpu().numpy()


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-3, show_progress=False, checkpoint_every=0, mixed_precision="auto")
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_and_writes_pickle_free_checkpoints(tmp_path):
    data = texture_images(8)
    model = small_model()
    ddpm = make_scheduler()

    def eval_loss(m) -> float:
        with torch.no_grad():
            return float(epsilon_loss(m, images_to_model(data), BANK, ddpm, generator=torch.Generator().manual_seed(7)))

    before = eval_loss(model)
    result = trainer(model, DictDataset(data), cfg(steps=30, batch_size=8, lr=2e-3, checkpoint_every=10),
                     tmp_path).train()
    assert result.step == 30 and len(result.losses) == 30 and not result.stopped
    assert eval_loss(result.model) < 0.6 * before
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    # keep_checkpoints=2: checkpoints at 10, 20, 30 -> the last two remain
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]
    ck = latest_checkpoint(tmp_path)
    for sub in ("model", "ema"):
        with safe_open(str(ck / f"{sub}.safetensors"), "pt") as f:
            assert len(list(f.keys())) == len(model.state_dict())
    for path in ck.rglob("*"):
        if path.is_file():
            assert path.suffix in (".json", ".safetensors"), path
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle / torch zip"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["config"]["steps"] == 30 and len(state["losses"]) == 30
    # the EMA checkpoint loads into a denoiser equal to the returned model (diffusers' EMAModel)
    ema = small_model(seed=5)
    ema.load_state_dict(load_checkpoint_weights(ck, "ema"))
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), result.model.state_dict().values()))
    assert not any(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))


def test_callbacks_see_every_step_preview_and_can_stop(tmp_path):
    seen: list[TrainState] = []

    def cb(state: TrainState):
        seen.append(state)
        return state.step == 3

    result = trainer(small_model(), texture_images(5), cfg(steps=10, preview_every=2), tmp_path, callbacks=[cb],
                     preview=ddad_preview).train()
    assert [s.step for s in seen] == [1, 2, 3] and result.stopped and result.step == 3
    assert all(s.total_steps == 10 and s.lr > 0 and s.seconds > 0 and s.eta_seconds >= 0 for s in seen)
    assert seen[0].preview is None and seen[2].preview is None
    p = seen[1].preview
    assert p.shape == (S, S, 3) and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-3"]

    # request_stop() from another party (e.g. the app) stops after the current step
    other = tmp_path / "other"
    t2 = trainer(small_model(), texture_images(5), cfg(steps=10), other,
                 callbacks=[lambda s: t2.request_stop() if s.step == 2 else None])
    r2 = t2.train()
    assert r2.stopped and r2.step == 2 and latest_checkpoint(other).name == "checkpoint-2"
    # a fresh (non-resumed) run in the same folder is refused (nothing removed) unless overwrite=True,
    # which replaces the old checkpoints, so a later resume=True cannot pick up a stale one
    with pytest.raises(ValueError, match=r"resume=True.*overwrite=True"):
        trainer(small_model(), texture_images(5), cfg(steps=1), other).train(resume=False)
    assert latest_checkpoint(other).name == "checkpoint-2"
    with pytest.warns(UserWarning, match="removing 1 old checkpoint"):
        trainer(small_model(), texture_images(5), cfg(steps=1), other).train(resume=False, overwrite=True)
    assert [c.name for c in list_checkpoints(other)] == ["checkpoint-1"]


def test_resume_matches_the_uninterrupted_run(tmp_path):
    """Same data order, RNG and optimiser state after a resume: losses and weights match the
    uninterrupted run to float32 rounding (rtol 1e-5, atol 1e-6; not bit for bit, since kernels
    may round differently on tensors loaded from a checkpoint)."""
    data = DictDataset(texture_images(6))
    conf = dict(steps=6, batch_size=4, hflip=True, warmup_steps=2, checkpoint_every=0)
    full = trainer(small_model(), data, cfg(**conf), tmp_path / "full").train()

    part = trainer(small_model(), data, cfg(**conf), tmp_path / "part", callbacks=[lambda s: s.step == 3]).train()
    assert part.stopped and part.step == 3
    # a differently initialised model proves the weights really come from the checkpoint
    resumed_trainer = trainer(small_model(seed=99), data, cfg(**conf), tmp_path / "part")
    resumed = resumed_trainer.train(resume=True)
    assert resumed.step == 6 and not resumed.stopped
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    full_raw = load_checkpoint_weights(tmp_path / "full" / "checkpoint-6", "model")
    for k, v in resumed_trainer.model.state_dict().items():
        torch.testing.assert_close(v, full_raw[k], rtol=1e-4, atol=1e-5, msg=k)
    full_ema = full.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full_ema[k], rtol=1e-4, atol=1e-5, msg=k)
    # resume from an explicit path; nothing left to do once the run reached its steps
    again = trainer(small_model(), data, cfg(**conf), tmp_path / "part").train(
        resume=tmp_path / "part" / "checkpoint-6")
    assert again.step == 6 and again.losses == full.losses
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        trainer(small_model(), data, cfg(**conf), tmp_path / "x").train(resume=tmp_path / "nowhere")


def test_data_order_and_schedule_are_functions_of_the_step():
    a = StepBatchSampler(7, 3, seed=5, start=0, end=6)
    b = StepBatchSampler(7, 3, seed=5, start=4, end=6)
    assert list(a)[4:] == list(b)
    # each epoch of positions visits every sample once
    flat = [i for batch in StepBatchSampler(6, 3, seed=1, start=0, end=2) for i in batch]
    assert sorted(flat) == list(range(6))
    # two processes share a step's global batch without overlap
    r0 = StepBatchSampler(8, 2, seed=0, start=0, end=1, rank=0, world=2).indices(0)
    r1 = StepBatchSampler(8, 2, seed=0, start=0, end=1, rank=1, world=2).indices(0)
    assert not set(r0) & set(r1)
    assert lr_factor(0, 100, 10) == pytest.approx(0.0) and lr_factor(5, 100, 10) == pytest.approx(0.5)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0) and lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_config_round_trip_and_bad_input(tmp_path):
    c = cfg(hflip=True)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        trainer(small_model(), texture_images(2) * 2 - 1, cfg(), tmp_path)
    with pytest.raises(ValueError, match="empty"):
        trainer(small_model(), torch.zeros(0, 3, S, S), cfg(), tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~10-20 s: two interpreters import torch + diffusers
def test_two_process_cpu_training(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "_ddp_train_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 and r["step"] == 2 and len(r["losses"]) == 2 for r in ranks)
    # DDP keeps both replicas identical and the logged loss is the all-reduced mean
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["losses"] == ranks[1]["losses"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_jobs_with_different_mixed_precision_run_one_after_another_in_one_process(tmp_path):
    """The app trains several jobs in one server process: a job asking for bf16 followed by one
    asking for fp32 must both run (accelerate's process-wide state is not left pinned)."""
    data = DictDataset(texture_images(4))
    first = trainer(small_model(), data, cfg(steps=1, mixed_precision="bf16"), tmp_path / "a").train()
    second = trainer(small_model(), data, cfg(steps=1, mixed_precision="no"), tmp_path / "b").train()
    assert first.step == second.step == 1 and np.isfinite(second.losses).all()
