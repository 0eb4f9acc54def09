"""``train.compile``: MELP.compile_parts gives eager's outputs and gradients (CPU, tiny, fp32)."""
from __future__ import annotations

import copy

import torch

from melp_ray.model.losses import compute_losses
from melp_ray.model import MELP, model_config_from_preset
from melp_ray.text import report_ids

REPORTS = ["sinus rhythm. normal ecg.", "atrial fibrillation. st depression in v5.",
           "left bundle branch block", "sinus bradycardia. left axis deviation. otherwise normal."]


def losses_and_grads(model: MELP, batch: dict) -> tuple[dict, dict]:
    out = model(batch["ecg"], batch["input_ids"], batch["attention_mask"], batch["sentence_ids"])
    losses = compute_losses(out, rhythm=1.0, token=2.0, beat=0.2)
    losses["total"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in losses.items()}, grads


def test_compiled_parts_match_eager_and_keep_parameter_names():
    # No dropout anywhere: compiled code draws its own random numbers. One layer per stack
    # keeps the compilation short.
    tiny = model_config_from_preset("tiny")
    cfg = model_config_from_preset(
        "tiny", dropout=0.0, attention_dropout=0.0, dropout_input=0.0, ecg_layers=1,
        decoder_layers=1, text_overrides={**tiny.text_overrides, "hidden_dropout_prob": 0.0,
                                          "attention_probs_dropout_prob": 0.0})
    torch.manual_seed(0)
    eager = MELP(cfg)
    compiled = copy.deepcopy(eager)
    # aot_eager: dynamo's graph capture and AOT autograd, all of torch.compile that meets
    # MELP's code (graph breaks, parameter names, shapes, gradients). Inductor's C++ code
    # generation is PyTorch's own and costs ~100 CPU-s here on a cold cache (a fresh CI
    # machine; 20 s warm): the default backend runs in bench/step_ops.py.
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled.compile_parts(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())   # checkpoints unchanged
    arrays = report_ids.encode_reports(eager.tokenizer, REPORTS, cfg.max_text_length)
    torch.manual_seed(1)
    batch = {"ecg": torch.rand(len(REPORTS), 12, 1000),
             **{k: torch.from_numpy(v) for k, v in arrays.items()}}
    want_losses, want_grads = losses_and_grads(eager, batch)
    got_losses, got_grads = losses_and_grads(compiled, batch)
    assert set(got_grads) == set(want_grads)
    for k, v in want_losses.items():
        torch.testing.assert_close(got_losses[k], v, rtol=1e-5, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # ... and it was compiled: the encoder and the text model run through dynamo's wrapper
    assert compiled.ecg_encoder._compiled_call_impl is not None
    assert compiled.text.backbone._compiled_call_impl is not None
    # The text model (causal + padding mask, cfg.text_frozen_layers frozen) is one graph, and
    # other rows of the same text width (text_columns: the longest report, rounded up to 8)
    # compile nothing new.
    assert cfg.text_frozen_layers >= 1 and int(batch["attention_mask"].sum(1).min()) < cfg.max_text_length
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    other = report_ids.encode_reports(eager.tokenizer, REPORTS[::-1], cfg.max_text_length)
    losses_and_grads(compiled, {**batch, **{k: torch.from_numpy(v) for k, v in other.items()}})
    assert counters["stats"]["unique_graphs"] == graphs >= 5, graphs
