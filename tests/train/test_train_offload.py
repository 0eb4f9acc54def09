"""ZeRO-Offload (#36.1): DeepSpeed engines built in this process (a world of one, gloo) on
the tiny MELP; an offloaded run takes the same steps as the plain one."""
from __future__ import annotations

import pytest
import torch

from melp_ray.config import DeepSpeedConfig, TrainConfig
from melp_ray.model.losses import compute_losses
from melp_ray.model import MELP, model_config_from_preset
from melp_ray.train.deepspeed_config import deepspeed_config, skip_cpu_shared_memory_op
from melp_ray.train.optim import param_groups
from melp_ray.train.session import single_process_group
from model_fixture import random_batch

STEPS = 3
BATCH = 2


def synthetic_batch(cfg, step: int) -> tuple[torch.Tensor, ...]:
    return random_batch(cfg, BATCH, step)


def losses_of_run(ds: DeepSpeedConfig) -> list[float]:
    import deepspeed

    single_process_group()
    skip_cpu_shared_memory_op()
    cfg = model_config_from_preset("tiny", dropout=0.0, attention_dropout=0.0,
                                   dropout_input=0.0)
    torch.manual_seed(0)
    model = MELP(cfg)
    train = TrainConfig(num_workers=1, global_batch_size=BATCH, micro_batch_size=BATCH,
                        precision="fp32", max_steps=STEPS)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(train, ds), dist_init_required=False)
    losses = []
    for step in range(STEPS):
        loss = compute_losses(engine(*synthetic_batch(cfg, step)))["total"]
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    engine.destroy()
    return losses


@pytest.mark.parametrize("stage, offload_param", [(2, False), (3, True)])
def test_offloaded_run_takes_the_same_steps_as_the_plain_run(stage, offload_param):
    plain = losses_of_run(DeepSpeedConfig(zero_stage=stage))
    offloaded = losses_of_run(DeepSpeedConfig(zero_stage=stage, offload_optimizer=True,
                                              offload_param=offload_param))
    assert plain[-1] != plain[0]                     # the optimizer did step
    assert offloaded == pytest.approx(plain, rel=1e-5, abs=1e-6)
