"""ZeRO 1-2 gradient reduction without an operator per parameter tensor
(``deepspeed.contiguous_gradients=false``).

DeepSpeed's default, ``contiguous_gradients``, copies each parameter's gradient into the
reduction bucket as backward produces it and, after the bucket's all-reduce, copies it out
again into the partition's gradient buffer: two ``copy_`` launches per parameter tensor and
step (~780 of the paper model's ~2,000 operators a step, ``bench/step_ops.py``). Without it
DeepSpeed flattens each bucket of gradients (one ``cat``), all-reduces it and copies the
result back into every gradient (``allreduce_and_copy``: one ``copy_`` per parameter
tensor). :func:`rebind_reduced_gradients` replaces that last loop: each gradient tensor is
re-pointed at its slice of the reduced flat bucket (``grad.data = slice``, what DeepSpeed's
contiguous path does to the gradients it copied into its bucket), so no operator runs at all.
The values are the same bits (tested against both DeepSpeed paths in
tests/train/test_zero_grads.py); memory is the same (the flat bucket replaces the gradients
it holds). Anything this does not cover (overlap_comm's side stream, a reduction in another
dtype, fp32 gradient accumulation buffers) goes to DeepSpeed's own method.
"""
from __future__ import annotations

import types
from typing import Any


def initialize_engine(**kwargs: Any):
    """``deepspeed.initialize(..., dist_init_required=False)``; with ZeRO 1-2 and
    ``contiguous_gradients`` off, the reduced gradients are then rebound, not copied."""
    import deepspeed

    engine, optimizer, loader, scheduler = deepspeed.initialize(dist_init_required=False, **kwargs)
    zero = kwargs["config"].get("zero_optimization", {})
    if zero.get("stage") in (1, 2) and zero.get("contiguous_gradients", True) is False:
        rebind_reduced_gradients(optimizer)
    return engine, optimizer, loader, scheduler


def rebind_reduced_gradients(optimizer) -> bool:
    """Install the copy-free ``allreduce_and_copy`` on a ``DeepSpeedZeroOptimizer``; False
    (nothing changed) on anything else, e.g. DeepSpeed's BF16/FP16 wrappers."""
    deepspeeds = getattr(optimizer, "allreduce_and_copy", None)
    if deepspeeds is None or not hasattr(optimizer, "allreduce_bucket") \
            or getattr(optimizer, "contiguous_gradients", True):
        return False

    def allreduce_and_copy(self, small_bucket, communication_data_type, rank=None, log=None,
                           divide=True, process_group=None, output_bucket=None):
        plain = (not self.overlap_comm and not getattr(self, "zenflow", False)
                 and getattr(self, "sequence_parallel_size", 1) == 1
                 and all(t.dtype == communication_data_type for t in small_bucket)
                 and (output_bucket is None or all(o is None for o in output_bucket)))
        if not plain:
            return deepspeeds(small_bucket, communication_data_type, rank=rank, log=log,
                              divide=divide, process_group=process_group,
                              output_bucket=output_bucket)
        from deepspeed import comm as dist

        group = self.dp_process_group if process_group is None else process_group
        reduced = self.allreduce_bucket(small_bucket, communication_data_type, rank=rank,
                                        log=log, divide=divide, process_group=group)
        if rank is None or rank == dist.get_rank(group=group):
            for grad, part in zip(small_bucket, self.unflatten(reduced, small_bucket)):
                if part.dtype == grad.dtype:
                    grad.data = part
                else:   # not reached with the checks above; DeepSpeed's own copy
                    grad.copy_(part)
        return None

    optimizer.allreduce_and_copy = types.MethodType(allreduce_and_copy, optimizer)
    return True


def grads_rebound(optimizer) -> bool:
    """Whether :func:`rebind_reduced_gradients` is installed on ``optimizer``."""
    method = getattr(optimizer, "allreduce_and_copy", None)
    return isinstance(method, types.MethodType) and method.__func__.__module__ == __name__


