"""One epoch of the digits MLP under Lightning DDP on CPU, for tests/test_lightning.py.

    python -m tests.ddp_fit DEVICES OUT_DIR

Each rank writes OUT_DIR/rank{R}.json: its global step after the epoch, the train loader's
len(), world size and rank, and the dataset indices of its shard for epoch 0. Lightning's DDP
launcher starts rank 1 by running this same command again (with LOCAL_RANK set); the caller
sets MASTER_ADDR=127.0.0.1 and a free MASTER_PORT, and bounds the whole process group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from manualbp.lightning import DigitsDataModule, MLPClassifier


def fit(devices: int) -> pl.Trainer:
    """Train one epoch on `devices` CPU processes (DDP when more than one); the Trainer."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=32, seed=0)
    model = MLPClassifier([64, 16, 10], activation="relu", backend="manual", optimizer="sgd", lr=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return trainer


def main() -> None:
    devices, out = int(sys.argv[1]), Path(sys.argv[2])
    trainer = fit(devices)
    loader = trainer.train_dataloader
    record = {
        "global_step": trainer.global_step,
        "len": len(loader),
        "world_size": trainer.world_size,
        "rank": trainer.global_rank,
        "num_replicas": loader.num_replicas,
        "shard": loader.shard_order(0).tolist(),
        "dataset": len(loader.dataset),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    print(f"rank {trainer.global_rank} done: {trainer.global_step} steps", flush=True)


if __name__ == "__main__":
    main()
