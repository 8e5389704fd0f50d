"""Two CPU ranks (gloo) train one step of an `MLP(mode="network")` sharded per layer with FSDP2,
for tests/test_autograd_contract.py.

    python -m tests.fsdp_mlp OUT_DIR

Every rank compares its gathered gradients with those of an unsharded `mode="layers"` copy fed
both ranks' data (FSDP2 averages gradients over ranks), and writes OUT_DIR/rank{R}.json. The
caller sets MASTER_ADDR=127.0.0.1 and a free MASTER_PORT, and bounds the whole process group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import manualbp as mbp

WORLD = 2


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    return x, torch.randn(5, 3, generator=gen, dtype=torch.float64)


def _run(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = mbp.MLP([4, 6, 6, 3], activation="gelu", dtype=torch.float64)
    reference = mbp.MLP([4, 6, 6, 3], activation="gelu", dtype=torch.float64, mode="layers")
    reference.load_state_dict(model.state_dict())
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    x, y = _data(rank)
    mbp.functional.mse_loss(model(x), y).backward()
    for r in range(WORLD):  # mean over ranks of each rank's loss, as FSDP2 averages
        xr, yr = _data(r)
        (mbp.functional.mse_loss(reference(xr), yr) / WORLD).backward()
    errors = []
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        full = p.grad.full_tensor()
        errors.append((name, float((full - q.grad).norm() / q.grad.norm())))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "errors": errors}))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(sys.argv[1],), nprocs=WORLD, join=True)
