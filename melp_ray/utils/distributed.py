"""torch.distributed helpers used by the losses, the recipes and the benchmarks.

Each works unchanged in a single process (no process group: rank 0 of a world of 1).
The differentiable all-gather of the contrastive loss lives beside that loss, in
``melp_ray/model/losses.py``.
"""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (in place; ``t`` itself in a single process)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """Each value averaged over every rank (each rank saw only its own micro-batches).
    Every rank must pass the same keys."""
    keys = sorted(values)
    n = world()[1]
    if n == 1 or not keys:
        return dict(values)
    t = sum_over_ranks(torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64))
    return {k: float(v) / n for k, v in zip(keys, t)}


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order, when ranks hold different
    numbers of rows (none included): padded to the longest for the all-gather, then trimmed."""
    n = world()[1]
    if n == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)], dim=0)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
