"""Operators launched by one training step of the recipe (forward, backward, optimizer step),
before and after the step optimisations, with the numerics checked equal.

    python bench/step_ops.py                 # paper preset, bf16 (the GPU precision), ZeRO-2
    python bench/step_ops.py --stage 1       # the stage bench/gpu_step.py measured on the H200
    python bench/step_ops.py --smoke         # tiny preset: the same code path in ~30 s (CI)
    python bench/step_ops.py --count after   # paper preset: count the optimised step only
    PYTHONPATH=<old checkout> python bench/step_ops.py --baseline   # count older code

On a GPU every operator that does arithmetic is (at least) one kernel launch, and at the
paper model's size on an H200 the step is launch-bound (bench/gpu_step.py: 4.8 % MFU,
~7,400 launches a step). The count does not depend on the device or the batch size, so it
is measured here, on a CPU: ``torch.profiler`` around one ``PretrainRecipe.micro_step``
(lead masking, forward, the three losses, ``engine.backward``, ``engine.step``) on the
DeepSpeed engine ``build_engine`` makes (world size 1, gloo), i.e. the code path of a Ray
Train worker and of ``bench/gpu_step.py``. Counted: every aten/c10d operator that does work
and that no other such operator called (what Python, autograd and DeepSpeed dispatch; a composite such as
``aten::linear`` counts once, as one ``addmm`` launch on a GPU) and every generated kernel of
a compiled region (``cpp.enable_kernel_profile``), less views, reshapes, empty allocations
and other metadata operators, which launch nothing (``NO_KERNEL``).

"before" runs with every optimisation key of ``OPTIMISATIONS`` off, "after" with each on.
Numerics: the same two settings in fp32 with dropout 0, from the same weights and batch:
every parameter's gradient of the first step and the losses of ``--check-steps`` steps,
before vs after, must agree to ``--tol`` (relative; see ``compare``).
"""
from __future__ import annotations

import gc
import re
from collections import Counter

import _common as C
from gpu_step import build_recipe, one_batch

# key -> (before, after). The "after" values are the defaults where the choice is not real;
# contiguous_gradients=false is paper.yaml's (default true: DeepSpeed's, see README).
OPTIMISATIONS: dict[str, tuple[str, str]] = {
    "deepspeed.check_grad_overflow": ("true", "false"),
    "deepspeed.contiguous_gradients": ("true", "false"),
    "train.compile": ("false", "true"),
}

KERNEL = re.compile(r"(graph_\d+_)?(cpp_fused|triton_)")   # inductor's generated kernels

# Operators that launch no kernel on a GPU: views, metadata, empty allocations.
NO_KERNEL = re.compile(
    r"aten::(view|_unsafe_view|view_as|as_strided|transpose|t|permute|expand|expand_as|"
    r"unsqueeze|squeeze|slice|select|alias|detach|detach_|empty|empty_strided|empty_like|"
    r"resize_|_reshape_alias|reshape|flatten|unflatten|lift_fresh|set_|result_type|unbind|"
    r"split|split_with_sizes|chunk|narrow|contiguous|to|type_as|_to_copy|resolve_conj|"
    r"resolve_neg|is_nonzero|is_same_size|_has_compatible_shallow_copy_type|numel|size|"
    r"stride|dim|record_stream|_local_scalar_dense|item|diagonal|movedim|swapaxes|"
    r"_nested_tensor_from_mask_left_aligned|lift|_unsafe_index|new_empty|new_empty_strided|"
    r"clone_if_view|_fw_primal|_make_dual|_unpack_dual|__getitem__|"
    r"zeros_like_meta|values|indices|_values|_indices|sym_size|sym_stride|sym_numel)$")


def step_config(args, optimised: bool, check: bool):
    """The preset at 1 worker, grad_accum 1 (one micro-step = one optimizer step)."""
    from melp_ray.config import PretrainConfig, load_config

    preset = "tiny" if args.smoke else "paper"
    overrides = ["train.num_workers=1", f"train.global_batch_size={args.batch}",
                 f"deepspeed.zero_stage={args.stage}", "train.max_steps=1000",
                 "train.warmup_steps=2", "train.use_gpu=true"]
    if not args.baseline:
        overrides += [f"{k}={after if optimised else before}"
                      for k, (before, after) in OPTIMISATIONS.items()]
    overrides += [f"data.seconds={args.seconds}"]
    if args.smoke:   # the tiny model with the paper's optimizer settings (no clipping)
        overrides += ["train.decay_all_parameters=true", "train.schedule=cosine_restarts",
                      "train.grad_clip=0"]
    else:
        overrides += ["data.sample_rate=500"]
    if check:   # numerics: fp32, no dropout (compiled code draws other random numbers)
        overrides += ["train.precision=fp32", "model.dropout=0", "model.attention_dropout=0",
                      "model.dropout_input=0"]
    else:
        overrides += [f"train.precision={args.precision}"]
    cfg = load_config(PretrainConfig, preset, overrides)   # validated as the GPU run it stands for
    cfg.train.use_gpu = False   # ...and run here (DeepSpeed's bf16 bookkeeping is the same on a CPU)
    if check:   # the text tower's dropout too
        cfg.model.text_overrides = {**cfg.model.text_overrides, "hidden_dropout_prob": 0.0,
                                    "attention_probs_dropout_prob": 0.0}
    return cfg


def launched_ops(events) -> Counter:
    """The operators of a profile that launch work, by name: each aten/c10d operator that no
    other operator called (a composite's own kernels are its business: ``aten::linear`` is
    one ``addmm`` on a GPU, whatever helpers the CPU kernel calls), and each generated kernel
    of a compiled region."""
    counts: Counter = Counter()
    for e in events:
        name = e.name
        if KERNEL.match(name):
            counts["compiled kernels (inductor)"] += 1
            continue
        if not does_work(name):
            continue
        parent = e.cpu_parent
        while parent is not None and not does_work(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            counts[name] += 1
    return counts


def does_work(name: str) -> bool:
    """An operator that launches work (``aten::to`` does not, its ``copy_`` does)."""
    return name.startswith(("aten::", "c10d::")) and not NO_KERNEL.match(name)


def count_step(args, optimised: bool, device) -> dict:
    """Warm-up steps (compilation, DeepSpeed's lazy set-up), then one profiled step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cfg = step_config(args, optimised, check=False)
    recipe = build_recipe(cfg, device)
    batch = one_batch(cfg, device)
    for _ in range(args.warmup):
        recipe.micro_step(batch)
        recipe.state.micro_in_epoch += 1
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        losses = recipe.micro_step(batch)
    events = prof.events()
    leaves = launched_ops(events)
    del recipe
    gc.collect()
    torch._dynamo.reset()
    return {"ops": sum(leaves.values()), "events": len(events), "by_name": dict(leaves.most_common()),
            "losses": losses}


def numerics(args, optimised: bool, device) -> dict:
    """fp32, no dropout: every parameter's gradient of the first step (same weights before
    and after) and the losses of ``--check-steps`` steps."""
    import torch
    from deepspeed.utils import safe_get_full_grad

    cfg = step_config(args, optimised, check=True)
    recipe = build_recipe(cfg, device)
    batch = one_batch(cfg, device)
    seed = recipe.micro_seed()     # the first step as micro_step runs it, gradients read
    torch.manual_seed(seed)
    recipe.engine.train()
    out = recipe.compute_losses(batch, torch.Generator().manual_seed(seed))
    recipe.engine.backward(out["total"])
    grads = {}
    for name, p in recipe.engine.module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            grads[name] = None if g is None else g.detach().float().clone()
    recipe.engine.step()
    recipe.state.micro_in_epoch += 1
    losses = [{k: float(v.detach()) for k, v in out.items()}]
    for _ in range(args.check_steps - 1):
        losses.append(recipe.micro_step(batch))
        recipe.state.micro_in_epoch += 1
    del recipe
    gc.collect()
    torch._dynamo.reset()
    return {"losses": losses, "grads": grads}


def compare(before: dict, after: dict) -> dict:
    """Largest relative loss difference; largest gradient difference, relative to the
    tensor's largest value or 1e-3 of the largest of all gradients, whichever is larger (a
    gradient that is 0 in exact arithmetic, such as a key projection's bias, holds rounding
    noise only)."""
    loss_diff = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)
                    for a, b in zip(after["losses"], before["losses"]) for k in b)
    grad_diff, worst = 0.0, None
    missing = sorted(set(before["grads"]) ^ set(after["grads"]))
    floor = 1e-3 * max(float(g.abs().max()) for g in before["grads"].values() if g is not None)
    for name, g in before["grads"].items():
        h = after["grads"].get(name)
        if g is None or h is None:
            if (g is None) != (h is None):
                missing.append(name)
            continue
        d = float((g - h).abs().max()) / max(float(g.abs().max()), floor, 1e-30)
        if d > grad_diff:
            grad_diff, worst = d, name
    return {"max_rel_loss_diff": loss_diff, "max_rel_grad_diff": grad_diff,
            "worst_grad": worst, "grads_compared": len(before["grads"]), "grad_mismatch": missing}


def main(argv=None) -> int:
    import os

    p = C.parser("step_ops", __doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage (paper.yaml: 2)")
    p.add_argument("--precision", default="bf16", help="of the counted steps (GPUs run bf16)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch (the count does not depend on it)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the profiled one")
    p.add_argument("--check-steps", type=int, default=3, help="steps of the numerics check")
    p.add_argument("--tol", type=float, default=1e-4, help="largest relative loss/gradient difference")
    p.add_argument("--top", type=int, default=15, help="operator names in the table")
    p.add_argument("--seconds", type=int, default=10, help="ECG length (the count does not depend on it)")
    p.add_argument("--baseline", action="store_true",
                   help="count one step with no optimisation key set, nothing else (for code "
                        "that predates the keys: PYTHONPATH=<old checkout>)")
    p.add_argument("--count", choices=("before", "after"),
                   help="only count one step of this checkout with the keys off/on, no numerics "
                        "(the paper model's compiled fp32 check takes ~30 min on 2 cores)")
    args = p.parse_args(argv)
    import torch
    import torch._inductor.config as inductor_config

    from melp_ray.train.session import single_process_group

    inductor_config.cpp.enable_kernel_profile = True   # each generated kernel: one event
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device = torch.device("cpu")
    single_process_group()
    info = C.machine()
    counts, checks = {}, {}
    if args.baseline or args.count:
        row = count_step(args, args.count == "after", device)
        C.finish("step_ops", args, {"machine": info, "baseline": args.baseline,
                                    "count": args.count, "stage": args.stage,
                                    "optimisations": {} if args.baseline else OPTIMISATIONS,
                                    "precision": args.precision, "seconds": args.seconds,
                                    "ops": row["ops"], "events": row["events"],
                                    "by_name": row["by_name"]},
                 C.table(["operator", "per step"], [["counted (launched)", row["ops"]],
                                                    *list(row["by_name"].items())[: args.top]]))
        return 0
    for label, optimised in (("before", False), ("after", True)):
        C.log(f"{label}: counting the operators of one step")
        counts[label] = count_step(args, optimised, device)
        C.log(f"{label}: {counts[label]['ops']} operators")
    for label, optimised in (("before", False), ("after", True)):
        C.log(f"{label}: numerics ({args.check_steps} steps, fp32, no dropout)")
        checks[label] = numerics(args, optimised, device)
    diff = compare(checks["before"], checks["after"])
    ratio = counts["after"]["ops"] / counts["before"]["ops"]
    equal = (diff["max_rel_loss_diff"] <= args.tol and diff["max_rel_grad_diff"] <= args.tol
             and not diff["grad_mismatch"])
    result = {"machine": info, "config": "tiny" if args.smoke else "paper", "stage": args.stage,
              "seconds": args.seconds,
              "precision": args.precision, "batch": args.batch, "optimisations": OPTIMISATIONS,
              "ops_before": counts["before"]["ops"], "ops_after": counts["after"]["ops"],
              "ratio": ratio, "target_ratio": 0.2, "verdict": C.check(ratio, 0.2, higher_is_better=False),
              "events_before": counts["before"]["events"], "events_after": counts["after"]["events"],
              "by_name_before": counts["before"]["by_name"], "by_name_after": counts["after"]["by_name"],
              "numerics": {**diff, "tol": args.tol, "equal": equal,
                           "losses_before": checks["before"]["losses"],
                           "losses_after": checks["after"]["losses"]}}
    names = list(counts["before"]["by_name"])[: args.top]
    names += [n for n in list(counts["after"]["by_name"])[: args.top] if n not in names]
    rows = [["all operators (events)", counts["before"]["events"], counts["after"]["events"]],
            ["counted (launched)", counts["before"]["ops"], counts["after"]["ops"]]]
    rows += [[f"  {n}", counts["before"]["by_name"].get(n, 0), counts["after"]["by_name"].get(n, 0)]
             for n in names]
    text = C.table(["per step", "before", "after"], rows)
    text += (f"\nafter / before = {ratio:.3f} (target <= 0.2: {result['verdict']}); numerics "
             f"{'EQUAL' if equal else 'DIFFER'}: loss {diff['max_rel_loss_diff']:.2e}, gradient "
             f"{diff['max_rel_grad_diff']:.2e} ({diff['worst_grad']}), tol {args.tol:g}")
    C.finish("step_ops", args, result, text)
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
