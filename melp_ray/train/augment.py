"""Training-time augmentation of ECG batches (MELP's lead masking, an optional time shift),
drawn from a seeded generator on the training worker so that a resumed run repeats it, and
the padding of a short batch; and the seeding of a micro-batch's draws."""
from __future__ import annotations

import torch


def pad_rows(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """``batch`` with exactly ``size`` rows: its rows repeated in turn (or the first ``size``)."""
    index = torch.arange(size) % len(batch["ecg"])
    return {k: v[index.to(v.device)] for k, v in batch.items()}


def augment(ecg: torch.Tensor, data_cfg, generator: torch.Generator) -> torch.Tensor:
    """The training-time augmentation of a batch: lead masking, then the optional time shift."""
    ecg = mask_leads(ecg, data_cfg.lead_mask_prob, generator)
    return shift_in_time(ecg, generator) if data_cfg.random_shift else ecg


def shift_in_time(ecg: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Roll each record (b, leads, T) by its own random offset in [0, T): the same beats and
    rhythm, a different position of every beat relative to the frames and positional conv."""
    b, _, length = ecg.shape
    offsets = torch.randint(0, length, (b, 1), generator=generator).to(ecg.device)
    index = (torch.arange(length, device=ecg.device) + offsets) % length
    return ecg.gather(2, index[:, None, :].expand_as(ecg))


def mask_leads(ecg: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each lead of each record with probability ``prob`` (MELP's augmentation).

    Drawn on the training worker from a seeded generator so a resumed run repeats it.
    """
    if prob <= 0:
        return ecg
    keep = torch.rand(ecg.shape[0], ecg.shape[1], 1, generator=generator) >= prob
    return ecg * keep.to(device=ecg.device, dtype=ecg.dtype)


def seeded_draws(seed: int) -> torch.Generator:
    """Seed a micro-batch's random draws: torch's global generator (dropout etc.) and the
    returned one (augmentation). The same seed gives the same draws (after a resume, or in
    gradient caching's second forward)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
