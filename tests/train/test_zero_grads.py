"""``deepspeed.contiguous_gradients=false`` (melp_ray/train/zero_grads.py): DeepSpeed engines
built in this process (a world of one, gloo) on the tiny MELP take the same steps, with the
same gradients, as DeepSpeed's contiguous default, without a copy per parameter tensor."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from melp_ray.config import DeepSpeedConfig, TrainConfig
from melp_ray.model.losses import compute_losses
from melp_ray.model import MELP, model_config_from_preset
from melp_ray.train.deepspeed_config import deepspeed_config, skip_cpu_shared_memory_op
from melp_ray.train.optim import param_groups
from melp_ray.train.session import single_process_group
from melp_ray.train.zero_grads import grads_rebound, initialize_engine
from model_fixture import random_batch

STEPS = 3
MICRO = 2


def run(ds: DeepSpeedConfig, grad_accum: int) -> dict:
    """Losses of STEPS optimizer steps; the gradients of the first (without accumulation);
    the copy_ operators that no other operator called in the last step's backward passes
    and optimizer step."""
    from deepspeed.utils import safe_get_full_grad

    single_process_group()
    skip_cpu_shared_memory_op()
    cfg = model_config_from_preset("tiny", dropout=0.0, attention_dropout=0.0, dropout_input=0.0)
    torch.manual_seed(0)
    model = MELP(cfg)
    train = TrainConfig(num_workers=1, global_batch_size=MICRO * grad_accum,
                        micro_batch_size=MICRO, precision="fp32", max_steps=STEPS)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    engine, zero, *_ = initialize_engine(model=model, optimizer=optimizer,
                                         config=deepspeed_config(train, ds))
    losses, grads, copies = [], {}, 0
    for step in range(STEPS):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for micro in range(grad_accum):
                loss = compute_losses(engine(*random_batch(cfg, MICRO, step * 10 + micro)))["total"]
                engine.backward(loss)
                losses.append(float(loss.detach()))
            if step == 0 and grad_accum == 1:   # DeepSpeed shows them only then
                grads = {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()
                         if p.requires_grad}
            engine.step()
        copies = sum(e.name == "aten::copy_" and not called_by_an_operator(e) for e in prof.events())
    engine.destroy()
    tensors = sum(p.requires_grad for p in model.parameters())
    return {"losses": losses, "grads": grads, "copies": copies, "rebound": grads_rebound(zero),
            "tensors": tensors}


def called_by_an_operator(event) -> bool:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return parent is not None


@pytest.mark.parametrize("stage, grad_accum", [(2, 1), (2, 2), (1, 1)])
def test_rebound_gradients_equal_deepspeeds_copies(stage, grad_accum):
    contiguous = run(DeepSpeedConfig(zero_stage=stage), grad_accum)
    rebound = run(DeepSpeedConfig(zero_stage=stage, contiguous_gradients=False), grad_accum)
    assert rebound["rebound"] and not contiguous["rebound"]
    assert contiguous["losses"][-1] != contiguous["losses"][0]      # the optimizer did step
    # The same reductions in the same order: the same bits.
    assert rebound["losses"] == contiguous["losses"]
    assert rebound["grads"].keys() == contiguous["grads"].keys()
    for name, g in contiguous["grads"].items():
        assert torch.equal(rebound["grads"][name], g), name
    # DeepSpeed copies each gradient into its bucket and out again; rebinding copies none.
    assert contiguous["copies"] >= 2 * contiguous["tensors"]
    assert rebound["copies"] < contiguous["tensors"] // 2, (rebound["copies"], contiguous["copies"])
