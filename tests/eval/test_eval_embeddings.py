"""build_model: the checkpoint's weights, or its architecture with seeded untrained weights."""
from __future__ import annotations

import torch

from melp_ray.eval.embeddings import build_model


def test_random_init_weights_are_untrained_and_seeded(tiny_checkpoint):
    from melp_ray.hub.checkpoint import load_model

    trained = load_model(tiny_checkpoint).state_dict()
    first = build_model(tiny_checkpoint, random_init=True, seed=0).state_dict()
    again = build_model(tiny_checkpoint, random_init=True, seed=0).state_dict()
    assert first.keys() == trained.keys()
    name = "beat_proj.weight"
    assert torch.equal(first[name], again[name])
    assert not torch.allclose(first[name], trained[name])
