"""Our typed config -> a DeepSpeed config dict."""
from __future__ import annotations

from typing import Any

from melp_ray.config import DeepSpeedConfig, TrainConfig


def use_bf16(train: TrainConfig) -> bool:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and gloo has no bf16 reductions)."""
    return train.precision == "bf16" or (train.precision == "auto" and train.use_gpu)


def skip_cpu_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-building and loading ``deepspeed_shm_comm_op`` in every CPU
    worker. The op serves only ``inference_all_reduce`` (DeepSpeed-Inference's tensor-parallel
    reduction); training collectives go through torch.distributed (gloo) either way. Building
    it cost ~30 s at a fresh machine's first start, printed "built successfully" twice per
    worker, and put a native library in each worker for nothing. DeepSpeed keeps the result
    of its op probe in this dict and reads it before building (``comm/torch.py``)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.zero_stage in (1, 2):   # false: zero_grads.initialize_engine rebinds, not copies
        zero["contiguous_gradients"] = ds.contiguous_gradients
    if ds.offload_optimizer and ds.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if ds.offload_param and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if ds.zero_stage in (1, 2) and train.grad_clip == 0 and not ds.offload_optimizer:
        # Nothing reads the global gradient norm without clipping; computing it costs a norm
        # and a dtype conversion per parameter tensor every step.
        zero["compute_grad_norm"] = False
    if ds.zero_stage == 3:
        # Gather full parameters for the forward of small modules instead of prefetching
        # fragments; keeps the tiny CPU runs from spending their time in bookkeeping.
        zero["stage3_param_persistence_threshold"] = 10_000
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(train), "check_grad_overflow": ds.check_grad_overflow},
        "fp16": {"enabled": False},
        # Our client torch.optim.AdamW compiles nothing (DeepSpeed's own Adam JIT-builds C++).
        "zero_allow_untested_optimizer": True,
        # With offload, DeepSpeed refuses a client optimizer unless told otherwise: it wants its
        # DeepSpeedCPUAdam, whose C++ JIT-builds for ~45 s in every fresh environment (each CI
        # run, each new cluster node). We keep torch's AdamW, which then steps the fp32 master
        # partitions on the host: the same update as without offload (losses match, tested),
        # no build, on CPU and GPU alike; the cost is a slower host step than DeepSpeed's SIMD
        # Adam (see docs/memory.md).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
