"""Activation checkpointing (``model.gradient_checkpointing``, #36.2): the same gradients as
the plain model, with the ECG transformer layers, text tower layers and decoder blocks
re-run in backward."""
from __future__ import annotations

import torch

from melp_ray.model.losses import compute_losses
from melp_ray.model import MELP, model_config_from_preset
from melp_ray.model.text_tower import transformer_layers
from model_fixture import random_batch

BATCH = 2


def tiny_batch(cfg) -> tuple[torch.Tensor, ...]:
    return random_batch(cfg, BATCH, 0)


def gradients_and_forward_counts(checkpointing: bool) -> tuple[dict, dict]:
    cfg = model_config_from_preset("tiny", dropout=0.0, attention_dropout=0.0,
                                   dropout_input=0.0, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = MELP(cfg).train()
    watched = {"ecg layer": model.ecg_encoder.layers[-1],
               # transformers checkpoints a layer's forward, not its __call__: watch a child
               "text layer": next(transformer_layers(model.text.backbone)[-1].children()),
               "decoder self block": model.decoder.resblocks[-1],
               "decoder cross block": model.decoder.cross_attn[-1]}
    counts = dict.fromkeys(watched, 0)
    # Pre-hooks: the recompute in backward stops as soon as it has what it needs, before a
    # (post-)forward hook would run.
    for name, module in watched.items():
        module.register_forward_pre_hook(
            lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    compute_losses(model(*tiny_batch(cfg)))["total"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, counts


def test_checkpointed_model_recomputes_its_blocks_and_gets_the_same_gradients():
    plain, plain_counts = gradients_and_forward_counts(False)
    ckpt, ckpt_counts = gradients_and_forward_counts(True)
    assert set(plain_counts.values()) == {1}
    assert set(ckpt_counts.values()) == {2}, ckpt_counts   # forward, then again in backward
    assert plain.keys() == ckpt.keys() and len(plain) > 50
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_is_off_by_default_and_in_eval():
    cfg = model_config_from_preset("tiny", gradient_checkpointing=True)
    assert model_config_from_preset("paper").gradient_checkpointing is False
    model = MELP(cfg).eval()
    calls = []
    model.ecg_encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model.encode_ecg(tiny_batch(cfg)[0])
    assert calls == [1]
