"""Run ``token_loss`` in 2 real gloo processes, one half batch each (see test_model_losses.py).

Usage: python model_ddp_token_worker.py CASE.pt OUT_DIR. Each rank writes its loss and the
gradient on its logits.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_ddp_rhythm_worker import WORLD

from melp_ray.utils.distributed import free_port


def run(rank: int, case_path: str, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from melp_ray.model.losses import token_loss

        case = torch.load(case_path)
        half = case["logits"].shape[0] // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        logits = case["logits"][rows].clone().requires_grad_(True)
        loss = token_loss(logits, case["labels"][rows])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": logits.grad, "rows": (rows.start, rows.stop)},
                   os.path.join(out_dir, f"token_rank{rank}.pt"))
        # Both ranks done before either tears down: gloo aborts a process whose peer
        # closes the connection while it is still being used.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2], free_port()), nprocs=WORLD, join=True)
