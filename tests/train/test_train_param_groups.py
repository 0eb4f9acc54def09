"""param_groups: which parameters are decayed, and no empty group (ZeRO drops empty groups
from the optimizer it wraps, leaving a scheduler built on the client optimizer with one
learning rate too many: the paper settings failed at step 1; end to end through DeepSpeed in
tests/test_bench_smoke.py::test_gpu_step_smoke_runs_the_recipe_step_with_the_paper_optimizer)."""
from __future__ import annotations

from torch import nn

from melp_ray.train.optim import param_groups


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_matrices_are_decayed_biases_and_norms_are_not():
    model = _model()
    decay, no_decay = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4   # two biases, the norm's weight and bias


def test_decay_all_gives_one_group_and_never_an_empty_one():
    model = _model()
    groups = param_groups(model, 0.2, decay_all=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.2
    assert len(groups[0]["params"]) == len(list(model.parameters()))
    for p in model[1].parameters():
        p.requires_grad_(False)
    for p in (model[0].bias, model[2].bias):
        p.requires_grad_(False)
    assert [len(g["params"]) for g in param_groups(model, 0.2)] == [2]   # nothing left to exempt
