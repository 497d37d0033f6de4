"""Two-process CPU training run for tests/test_training.py.

Usage: ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/_ddp_train_script.py OUT_DIR
(``accelerate launch --cpu`` runs a single process unless MPI is configured; torchrun + gloo is
the plain way to get two CPU processes, and accelerate picks the distributed setup from its env.)
Writes OUT_DIR/rank<k>.json with the step reached, the losses and a weight checksum per process.
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

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BankConditionedUNet.from_spec(DenoiserConfig.preset("tiny", sample_size=16, bank_dim=8,
                                                      block_out_channels=(32, 32), attention_resolutions=(8,)))
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bank = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=2, batch_size=2, checkpoint_every=0, show_progress=False, mixed_precision="no")
    ddpm = make_scheduler()

    def objective(m, batch, generator):
        return epsilon_loss(m, images_to_model(batch["image"]), bank, ddpm, generator=generator)

    trainer = Trainer(model, objective, images, cfg, out_dir)
    result = trainer.train()
    acc = trainer.accelerator
    checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
    Path(out_dir, f"rank{acc.process_index}.json").write_text(json.dumps(
        {"step": result.step, "losses": result.losses, "world": acc.num_processes, "checksum": checksum}))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
