"""The analytic FLOPs count against torch's FlopCounterMode on real forward/backward passes."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from melp_ray.model import MELP, model_config_from_preset
from melp_ray.model.flops import (PEAK_FLOPS, estimate_mfu, flops_breakdown, forward_flops,
                                  mean_training_flops, training_flops)
from melp_ray.model.text_tower import text_columns

N_SAMPLES, BATCH, SENTENCES = 1000, 2, 3


def measured_flops(cfg, backward: bool, real_tokens: int | None = None) -> float:
    """FLOPs per sample counted by torch (math SDPA: the CPU flash kernel is not counted).
    ``real_tokens``: the longest report's tokens before the [CLS] (default: no padding)."""
    torch.manual_seed(0)
    model = MELP(cfg)
    length = cfg.max_text_length
    ecg = torch.randn(BATCH, cfg.ecg_leads, N_SAMPLES)
    ids = torch.randint(1000, 2000, (BATCH, length))
    mask = torch.ones(BATCH, length, dtype=torch.long)
    if real_tokens is not None:
        mask[:, real_tokens:-1] = 0
    sentence_ids = torch.arange(length).repeat(BATCH, 1) % SENTENCES
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ecg, ids, mask, sentence_ids)
        if backward:
            loss = sum(out[k].float().sum() for k in
                       ("logits", "ecg_emb", "text_emb", "sentence_emb", "beat_emb"))
            loss.backward()
    return counter.get_total_flops() / BATCH


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-text-prefix", "all-trainable"])
def test_analytic_count_matches_flop_counter(frozen):
    overrides = (dict(freeze_text_embeddings=True) if frozen
                 else dict(text_frozen_layers=0, freeze_text_embeddings=False))
    cfg = model_config_from_preset("tiny", **overrides)
    forward = forward_flops(cfg, N_SAMPLES, SENTENCES)
    assert measured_flops(cfg, backward=False) == pytest.approx(forward, rel=0.01)
    # Backward adds small ops the analytic 2x rule leaves out (a few %).
    train = training_flops(cfg, N_SAMPLES, SENTENCES)
    assert measured_flops(cfg, backward=True) == pytest.approx(train, rel=0.05)


def test_a_trimmed_batch_is_counted_at_its_width():
    cfg = model_config_from_preset("tiny")
    mask = torch.ones(1, cfg.max_text_length, dtype=torch.long)
    mask[:, 13:-1] = 0
    width = len(text_columns(mask))             # 13 tokens + [CLS] -> 16 columns
    assert width == 16 < cfg.max_text_length
    assert measured_flops(cfg, backward=False, real_tokens=13) == \
        pytest.approx(forward_flops(cfg, N_SAMPLES, SENTENCES, text_length=width), rel=0.01)
    # What trimming saves in a training step: as counted, as measured (the few % of backward
    # ops the 2x rule leaves out are in the ECG side, the same in both).
    counted = training_flops(cfg, N_SAMPLES, SENTENCES, text_length=width)
    saved = training_flops(cfg, N_SAMPLES, SENTENCES) - counted
    assert saved > 0.3 * counted
    assert measured_flops(cfg, backward=True) - measured_flops(cfg, backward=True, real_tokens=13) \
        == pytest.approx(saved, rel=0.02)
    # Reports of 14 tokens (13 + [CLS]) in every micro-batch: every batch is 16 columns wide.
    assert mean_training_flops(cfg, N_SAMPLES, [14] * 50, micro_batch=4, draws=20) == \
        training_flops(cfg, N_SAMPLES, text_length=16)
    # Longer reports in the mix: dearer on average, never above the full width.
    mixed = mean_training_flops(cfg, N_SAMPLES, [14] * 45 + [40] * 5, micro_batch=4, draws=200)
    assert training_flops(cfg, N_SAMPLES, text_length=16) < mixed < training_flops(cfg, N_SAMPLES)


def test_frozen_prefix_is_not_charged_a_backward():
    frozen = model_config_from_preset("tiny", freeze_text_embeddings=True)
    parts = flops_breakdown(frozen, N_SAMPLES, SENTENCES)
    assert parts["text_frozen"] > 0
    assert training_flops(frozen, N_SAMPLES, SENTENCES) == \
        3 * (sum(parts.values()) - parts["text_frozen"]) + parts["text_frozen"]


def test_paper_preset_is_dominated_by_the_ecg_encoder():
    cfg = model_config_from_preset("paper")
    parts = flops_breakdown(cfg, 5000)
    # 8 layers x 312 frames x 768 wide: 24 * 312 * 768^2 * 8 ~ 35 GFLOP, plus convs.
    assert 30e9 < parts["ecg_encoder"] < 60e9
    assert max(parts, key=parts.get) == "ecg_encoder"
    assert all(v >= 0 for v in parts.values())


def test_estimate_mfu():
    assert estimate_mfu(1e12, 100.0, PEAK_FLOPS["h100-sxm-bf16"]) == pytest.approx(100e12 / 989e12)
    assert PEAK_FLOPS["h200-bf16"] == PEAK_FLOPS["h100-sxm-bf16"]
    with pytest.raises(ValueError):
        estimate_mfu(1.0, 1.0, 0.0)
    assert math.isfinite(estimate_mfu(0.0, 0.0, 1.0))
