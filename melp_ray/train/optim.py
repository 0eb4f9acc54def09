"""The optimizer's parameter groups and the learning-rate schedules of a recipe."""
from __future__ import annotations

from typing import Any

import torch


def param_groups(model: torch.nn.Module, weight_decay: float,
                 decay_all: bool = False) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms and the logit scale (CLIP practice).

    ``decay_all``: decay every trainable parameter, as the reference does.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "logit_scale" in name
        (no_decay if exempt and not decay_all else decay).append(p)
    # No empty group: ZeRO drops empty groups from the optimizer it wraps, and a scheduler
    # built on the client optimizer then has one learning rate too many (it fails at step 1).
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_schedule(optimizer, train):
    """``warmup_cosine``: linear warm-up, then one cosine decay to 0 over ``max_steps``.

    ``cosine_restarts`` (the reference): cosine annealing with warm restarts every
    ``restart_steps`` steps (the reference uses half the run), no warm-up, floor 1e-8.
    """
    if train.schedule == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=train.restart_steps or max(train.max_steps // 2, 1), eta_min=1e-8)
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, train.warmup_steps, max(train.max_steps, 1))
