"""Training under ``accelerate launch`` for tests/test_gpu.py (one process per GPU).

Usage: accelerate launch --num_processes N [--multi_gpu] tests/_gpu_train_script.py OUT_DIR
(``--cpu`` instead of ``--multi_gpu`` for the CPU check, see tests/test_gpu.py). Trains a tiny
bank-conditioned UNet for 3 steps with ``mixed_precision="auto"`` (bf16 on CUDA) and
channels-last, and writes OUT_DIR/rank<k>.json: the device, world size, mixed precision, the
step reached, the losses, whether the inputs / weights were channels-last, and a weight checksum.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out_dir: str) -> None:
    from ccad.diffusion import epsilon_loss, make_scheduler
    from ccad.models import BankConditionedUNet, DenoiserConfig, images_to_model
    from ccad.training import TrainConfig, Trainer

    torch.manual_seed(0)
    spec = DenoiserConfig.preset("tiny", sample_size=32, bank_dim=8, block_out_channels=(32, 32),
                                 attention_resolutions=(16,))
    model = BankConditionedUNet.from_spec(spec)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bank = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=3, batch_size=2, checkpoint_every=0, show_progress=False, mixed_precision="auto",
                      channels_last=True)
    ddpm = make_scheduler()
    seen: dict[str, bool] = {}

    def objective(m, batch, generator):
        x = batch["image"]
        seen["input_channels_last"] = bool(x.is_contiguous(memory_format=torch.channels_last))
        conv = next(p for p in m.parameters() if p.dim() == 4)
        seen["weights_channels_last"] = bool(conv.is_contiguous(memory_format=torch.channels_last))
        seen["autocast"] = bool(torch.is_autocast_enabled(x.device.type))
        return epsilon_loss(m, images_to_model(x), bank, ddpm, generator=generator)

    trainer = Trainer(model, objective, images, cfg, out_dir)
    result = trainer.train()
    acc = trainer.accelerator
    checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
    Path(out_dir, f"rank{acc.process_index}.json").write_text(json.dumps(
        {"step": result.step, "losses": result.losses, "world": acc.num_processes, "checksum": checksum,
         "device": acc.device.type, "mixed_precision": str(acc.mixed_precision), **seen}))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
