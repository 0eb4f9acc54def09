"""Run losses in 2 real gloo processes (torch.multiprocessing.spawn), one half batch each.

Launched as a script by test_model_losses.py (spawned children cannot import test modules
loaded by pytest's importlib mode). Usage: python model_ddp_worker.py CASE.pt...

One spawn serves every case (starting two ranks costs more than all the cases together).
A case (``kind``):

- ``rhythm``: the full batch and the initial weights of a tiny "model": two Linear layers
  that produce the ECG and text embeddings, a [1]-shaped logit scale and, optionally, the
  reports' token ids (``report_keys``) for same-report positives. Each rank writes its loss
  and its gradients, the parameter gradients already averaged over ranks as DDP / DeepSpeed do.
- ``token``: logits and labels; each rank writes its loss and the gradient on its logits.

Rank r of CASE.pt writes CASE.rank{r}.pt beside it.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from melp_ray.utils.distributed import free_port

WORLD = 2


def halves(rank: int, n: int) -> slice:
    return slice(rank * n // WORLD, (rank + 1) * n // WORLD)


def rhythm_case(rank: int, case: dict) -> dict:
    from melp_ray.model.losses import rhythm_loss

    local = halves(rank, case["ecg_in"].shape[0])
    dtype = case["ecg_weight"].dtype   # the test runs in float64
    ecg_proj = torch.nn.Linear(*case["ecg_weight"].shape[::-1], dtype=dtype)
    text_proj = torch.nn.Linear(*case["text_weight"].shape[::-1], dtype=dtype)
    with torch.no_grad():
        ecg_proj.weight.copy_(case["ecg_weight"]), ecg_proj.bias.copy_(case["ecg_bias"])
        text_proj.weight.copy_(case["text_weight"]), text_proj.bias.copy_(case["text_bias"])
    logit_scale = torch.nn.Parameter(case["logit_scale"].clone())
    ecg_in = case["ecg_in"][local].clone().requires_grad_(True)
    text_in = case["text_in"][local].clone().requires_grad_(True)

    ecg_emb = torch.nn.functional.normalize(ecg_proj(ecg_in), dim=-1)
    text_emb = torch.nn.functional.normalize(text_proj(text_in), dim=-1)
    keys = case.get("report_keys")   # same-report positives, when the case has them
    loss = rhythm_loss(ecg_emb, text_emb, logit_scale.exp(), None if keys is None else keys[local])
    loss.backward()

    params = {"ecg_weight": ecg_proj.weight, "ecg_bias": ecg_proj.bias,
              "text_weight": text_proj.weight, "text_bias": text_proj.bias,
              "logit_scale": logit_scale}
    grads = {}
    for name, p in params.items():  # DDP: all-reduce (sum) then divide by world size
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[name] = g / WORLD
    return {"loss": loss.detach(), "grads": grads, "rows": (local.start, local.stop),
            "ecg_in_grad": ecg_in.grad, "text_in_grad": text_in.grad}


def token_case(rank: int, case: dict) -> dict:
    from melp_ray.model.losses import token_loss

    rows = halves(rank, case["logits"].shape[0])
    logits = case["logits"][rows].clone().requires_grad_(True)
    loss = token_loss(logits, case["labels"][rows])
    loss.backward()
    return {"loss": loss.detach(), "grad": logits.grad, "rows": (rows.start, rows.stop)}


CASES = {"rhythm": rhythm_case, "token": token_case}


def run(rank: int, case_paths: list[str], port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for path in case_paths:
            case = torch.load(path)
            torch.save(CASES[case["kind"]](rank, case), f"{path.removesuffix('.pt')}.rank{rank}.pt")
        # Both ranks done before either tears down: gloo aborts a process whose peer
        # closes the connection while it is still being used.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1:], free_port()), nprocs=WORLD, join=True)
