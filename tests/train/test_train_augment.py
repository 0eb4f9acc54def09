"""Training-time augmentation (``melp_ray.train.augment``): lead masking and time shift."""
from __future__ import annotations

import torch

from melp_ray.config import DataConfig
from melp_ray.train.augment import augment, shift_in_time


def batch(b: int = 6, leads: int = 12, length: int = 100) -> torch.Tensor:
    return torch.randn(b, leads, length, generator=torch.Generator().manual_seed(3))


def offset_of(shifted: torch.Tensor, original: torch.Tensor) -> int | None:
    """The roll that turns ``original`` (leads, T) into ``shifted``, or None if none does."""
    for k in range(original.shape[-1]):
        if torch.equal(torch.roll(original, -k, dims=-1), shifted):
            return k
    return None


def test_shift_rolls_every_lead_of_a_record_by_the_same_offset():
    x = batch()
    out = shift_in_time(x, torch.Generator().manual_seed(0))
    offsets = [offset_of(out[i], x[i]) for i in range(len(x))]
    assert None not in offsets                      # a pure roll: no sample lost or invented
    assert len(set(offsets)) > 1                    # records get their own offsets
    again = shift_in_time(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)                  # seeded: a resumed run repeats it


def test_augment_shifts_only_when_asked_and_always_masks_with_its_probability():
    x = batch()
    plain = DataConfig(lead_mask_prob=0.0)
    assert torch.equal(augment(x, plain, torch.Generator().manual_seed(0)), x)
    shifted = augment(x, DataConfig(lead_mask_prob=0.0, random_shift=True),
                      torch.Generator().manual_seed(0))
    assert not torch.equal(shifted, x)
    assert all(offset_of(shifted[i], x[i]) is not None for i in range(len(x)))
    masked = augment(x, DataConfig(lead_mask_prob=0.5, random_shift=True), torch.Generator().manual_seed(0))
    zero_leads = (masked.abs().sum(dim=-1) == 0).float().mean()
    assert 0.2 < zero_leads < 0.8                   # 72 leads, p = 0.5
