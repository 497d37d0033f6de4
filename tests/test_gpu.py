"""What a GPU run has to show (issue 8): every test here is marked ``gpu`` and skips without CUDA.

On the GPU machine (see scripts/device_run.sh and ../shared/DEVICE.md)::

    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py

covers, in well under 10 minutes on one H100/H200:

- bf16 mixed-precision training (``TrainConfig.mixed_precision``) with channels-last inputs and
  weights, and the EMA weights differing from the raw trained ones;
- a checkpoint written at a stop and a resumed run continuing at the right step (same steps, LR
  and, within bf16 tolerance, losses as an uninterrupted run);
- training under a real ``accelerate launch`` (one process per GPU, 2 when there are several);
- every registered method (``ccad.methods.method_names()``): a tiny preset trained a few steps
  on generated textures (``ccad.data.synthetic``) at 64 px, or fitted (PatchCore), on CUDA;
  finite scores, maps of the right shape, and the saved model reloaded giving the same scores.
  Latent methods use the random-init TAEF2 autoencoder (``taef2:random``), as the CPU tests do.

Nothing here imports gradio (the GPU machine has none).

``CCAD_GPU_TESTS_ON_CPU=1`` runs the same tests on the CPU (device ``cpu``, training forced onto
the CPU with ``ACCELERATE_USE_CPU``; the CUDA-only checks such as channels-last are relaxed): a way
to check the code paths on a machine without a GPU. It takes a few minutes on 2 cores.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ccad.config import set_option
from ccad.data.detect import load_dataset
from ccad.data.coerce import coerce_image
from ccad.data.convert import to_tensor
from ccad.data.synthetic import write_dataset
from ccad.methods import get_method, method_names
from ccad.pipeline import AnomalyDetector, fit_detector, train_detector
from ccad.training import TrainConfig, Trainer, load_checkpoint_weights

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("CCAD_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
S, D = 32, 8  # the Trainer tests' image size and bank width

# Per-method settings that keep a run short (fewer reconstruction steps); every method not named
# here runs with its tiny preset and defaults. Keys are method-config fields (set_option).
FAST: dict[str, dict[str, object]] = {
    "ccad-v": {"diffusion.steps": 3, "diffusion.start_step": 100},
    "ccad-c": {"diffusion.steps": 3},
    "ccad-f": {"diffusion.steps": 3},
    "d3ad": {"K": 3, "norm_images": 4},
    "glad": {"T": 400, "steps": 4, "t_min": 100, "delta": 0.05, "feature_layers": (1, 2)},
}


@pytest.fixture(autouse=True)
def _training_device(monkeypatch):
    """With the CPU switch, keep accelerate (the Trainer) off any GPU too. accelerate's state is a
    process-wide singleton that refuses another ``mixed_precision`` once set (bf16 here, ``no``
    for "auto" on the CPU), so each test starts from a fresh one (single process: safe)."""
    from accelerate.state import AcceleratorState

    if ON_CPU:
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("gpu-data"), kinds=("granular",), n_train=8, n_test_good=2,
                         n_test_defect=2, size=SIZE, seed=8, defects=("spot",))


# ---- the Trainer on the device ---------------------------------------------------------------
def tiny_unet(seed: int = 0):
    from ccad.models import BankConditionedUNet, DenoiserConfig

    torch.manual_seed(seed)
    spec = DenoiserConfig.preset("tiny", sample_size=S, bank_dim=D, block_out_channels=(32, 32),
                                 attention_resolutions=(16,))
    return BankConditionedUNet.from_spec(spec)


def images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(0))


BANK = torch.randn(12, D, generator=torch.Generator().manual_seed(1))


def objective(record: dict | None = None):
    """CCAD eq. 15 on a tiny UNet; ``record`` collects what the loss saw (dtypes, memory format)."""
    from ccad.diffusion import make_scheduler
    from ccad.diffusion.objectives import noise_prediction_loss
    from ccad.models import images_to_model

    ddpm = make_scheduler()

    def loss_fn(m, batch, generator):
        x = batch["image"]

        def eps_fn(x_t, t):
            eps = m(x_t, t, BANK)
            if record is not None:
                conv = next(p for p in m.parameters() if p.dim() == 4)
                record.update(device=x.device.type, eps_dtype=eps.dtype,
                              autocast=torch.is_autocast_enabled(x.device.type),
                              input_channels_last=x.is_contiguous(memory_format=torch.channels_last),
                              weights_channels_last=conv.is_contiguous(memory_format=torch.channels_last))
            return eps

        return noise_prediction_loss(eps_fn, images_to_model(x), ddpm, generator)

    return loss_fn


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=4, lr=1e-3, show_progress=False, checkpoint_every=0, mixed_precision="bf16",
                channels_last=True)
    base.update(kw)
    return TrainConfig(**base)


def test_bf16_training_with_channels_last_and_ema(tmp_path):
    seen: dict = {}
    model = tiny_unet()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, objective(seen), images(), train_cfg(steps=5), tmp_path)
    result = trainer.train()
    assert str(trainer.accelerator.mixed_precision) == "bf16" and trainer.accelerator.device.type == DEVICE
    assert seen["device"] == DEVICE and seen["autocast"] and seen["eps_dtype"] == torch.bfloat16
    if DEVICE == "cuda":
        assert seen["input_channels_last"] and seen["weights_channels_last"]
    assert result.step == 5 and len(result.losses) == 5 and all(np.isfinite(result.losses))
    # the raw weights moved, and the EMA copy (fp32) is neither the init nor the raw weights
    raw = {k: v.detach().float().cpu() for k, v in trainer.model.state_dict().items()}
    ema = {k: v.detach().float().cpu() for k, v in result.model.state_dict().items()}
    names = [n for n, _ in trainer.model.named_parameters()]
    assert any(not torch.equal(raw[n], init[n].float().cpu()) for n in names)
    assert all(result.model.get_parameter(n).dtype == torch.float32 for n in names)
    diffs = [float((raw[n] - ema[n]).abs().max()) for n in names]
    assert max(diffs) > 0, "EMA weights equal the raw weights after training"
    saved = load_checkpoint_weights(tmp_path / "checkpoint-5", "ema")
    assert all(torch.equal(saved[n], ema[n]) for n in names)
    state = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["mixed_precision"] == "bf16" and state["step"] == 5


def test_checkpoint_and_resume_continue_at_the_right_step(tmp_path):
    full_lrs: list[float] = []
    full = Trainer(tiny_unet(), objective(), images(), train_cfg(mixed_precision="auto"), tmp_path / "full",
                   callbacks=[lambda s: full_lrs.append(s.lr)]).train()

    steps_a: list[int] = []
    part = Trainer(tiny_unet(), objective(), images(), train_cfg(mixed_precision="auto"), tmp_path / "part",
                   callbacks=[lambda s: steps_a.append(s.step) or s.step == 2]).train()
    assert part.stopped and part.step == 2 and steps_a == [1, 2]
    assert (tmp_path / "part" / "checkpoint-2" / "trainer_state.json").is_file()

    seen: list[tuple[int, float]] = []
    # another init: the resumed run must take its weights from the checkpoint, not from the module
    resumed = Trainer(tiny_unet(seed=7), objective(), images(), train_cfg(mixed_precision="auto"),
                      tmp_path / "part", callbacks=[lambda s: seen.append((s.step, s.lr))]).train(resume=True)
    assert [s for s, _ in seen] == [3, 4] and resumed.step == 4 and not resumed.stopped
    assert len(resumed.losses) == 4 and resumed.losses[:2] == part.losses
    state = json.loads((tmp_path / "part" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["ema_step"] == 4
    # the LR schedule continues where it stopped; losses and weights follow the uninterrupted run
    # (bit-for-bit on the CPU, see test_training.py; bf16 kernels on a GPU leave a small tolerance)
    assert [lr for _, lr in seen] == pytest.approx(full_lrs[2:], rel=1e-6)
    assert np.allclose(resumed.losses, full.losses, rtol=2e-2, atol=1e-3), (resumed.losses, full.losses)
    for (name, a), b in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_under_accelerate_launch(tmp_path):
    n = 1 if ON_CPU else min(2, torch.cuda.device_count())
    mode = ["--cpu"] if ON_CPU else (["--multi_gpu"] if n > 1 else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "_gpu_train_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(n)]
    for r in ranks:
        assert r["world"] == n and r["step"] == 3 and len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))
        assert r["device"] == DEVICE and r["autocast"] == (DEVICE == "cuda")
        assert r["mixed_precision"] == ("bf16" if DEVICE == "cuda" else "no")
        if DEVICE == "cuda":
            assert r["input_channels_last"] and r["weights_channels_last"]
    # DDP keeps the replicas identical and logs the all-reduced loss
    assert len({r["checksum"] for r in ranks}) == 1 and all(r["losses"] == ranks[0]["losses"] for r in ranks)
    assert (tmp_path / "checkpoint-3" / "trainer_state.json").is_file()


# ---- every method on the device -------------------------------------------------------------
def tiny_config(name: str):
    """The method's config with its tiny preset, the offline test autoencoder and FAST settings."""
    cfg = get_method(name).default_config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "preset" in fields:
        set_option(cfg, "preset", "tiny", "test")
    if "autoencoder" in fields:
        set_option(cfg, "autoencoder", "taef2:random", "test")
    for key, value in FAST.get(name, {}).items():
        set_option(cfg, key, value, "test")
    return cfg


def build(name: str, root: Path, run: Path) -> tuple[AnomalyDetector, Path]:
    """(the detector, its saved folder): trained 3 steps (bf16 on CUDA) or fitted (PatchCore)."""
    mcls = get_method(name)
    cfg = tiny_config(name)
    if not mcls.trainable:
        det = fit_detector(root, variant=name, method=cfg, image_size=SIZE, bank_size=16, calibration_fraction=0.25,
                           device=DEVICE)
        det.save_pretrained(run / "model")
        return det, run / "model"
    tcfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, show_progress=False, checkpoint_every=0)
    det = train_detector(root, run, variant=name, method=cfg, train=tcfg, image_size=SIZE, bank_size=16,
                         calibration_fraction=0.25, device=DEVICE)
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and all(np.isfinite(state["losses"]))
    assert state["mixed_precision"] == ("bf16" if DEVICE == "cuda" else "no")
    return det, run / "model"


@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_predicts_saves_and_reloads_on_the_device(name, root, tmp_path):
    det, folder = build(name, root, tmp_path / "run")
    assert det.device.type == DEVICE
    params = list(det.method.modules.parameters())
    assert all(p.device.type == DEVICE for p in params), name
    test = load_dataset(root, split="test")
    paths = [s.image_path for s in test]
    x = torch.stack([to_tensor(coerce_image(p), SIZE) for p in paths])
    maps, rec = det.maps_for_batch(x)
    assert maps.shape == (len(paths), 1, SIZE, SIZE) and maps.device.type == DEVICE
    assert bool(torch.isfinite(maps).all())
    if rec is not None:
        assert rec.shape == (len(paths), 3, SIZE, SIZE) and bool(torch.isfinite(rec).all())
    preds, errors = det.predict_many(paths, batch_size=4)
    assert not errors and len(preds) == len(paths)
    for p in preds:
        assert p.anomaly_map.shape == (SIZE, SIZE) and np.isfinite(p.score) and np.isfinite(p.anomaly_map).all()
    assert np.isfinite(det.threshold)
    back = AnomalyDetector.from_pretrained(folder, device=DEVICE)
    assert back.device.type == DEVICE and back.variant == name
    again, errors = back.predict_many(paths, batch_size=4)
    assert not errors
    assert [p.score for p in again] == pytest.approx([p.score for p in preds], rel=2e-3, abs=1e-5)
    assert back.threshold == pytest.approx(det.threshold)
