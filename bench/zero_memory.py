"""Per-worker memory of model states under ZeRO 0/1/2/3, 2 workers (gloo, CPU).

    python bench/zero_memory.py           # a ~33 M-parameter MELP ("mid"), batch 2/worker
    python bench/zero_memory.py --smoke   # the tiny preset, fp32 only
    python bench/zero_memory.py --stages 2,2-offload,3,3-offload   # ZeRO-Offload rows

Stages: 0-3, plus ``2-offload`` (``deepspeed.offload_optimizer``) and ``3-offload``
(``offload_optimizer`` + ``offload_param``). This bench runs on CPU (gloo), where host and
"device" are the same memory: offload rows show that the states are all still held (moved,
not dropped); the accelerator memory they save is reported "not run" until a GPU variant
exists (``accelerator`` column: bytes of counted tensors on a non-CPU device).

For each stage, two fresh processes join a gloo group, build the model, start DeepSpeed
with the same config our recipe uses (``melp_ray.train.deepspeed_config``), and train two
steps on synthetic batches. Each rank then counts the bytes of the tensors it holds:
- params: the module's parameters (for ZeRO-3 their ``ds_tensor`` partitions, plus the
  small parameters DeepSpeed keeps whole below its persistence threshold);
- grads: ``.grad`` tensors and DeepSpeed's gradient partitions/buckets;
- optimizer: the fp32 master partitions and the AdamW moments (``engine.optimizer`` state);
measured after backward (gradients alive) and after the step; the peak of the two is
reported. Tensors are deduplicated by storage, so views into DeepSpeed's flat buffers are
counted once. As a cross-check, every live CPU tensor found by the garbage collector is
summed too, and each rank's peak RSS (``ru_maxrss``) is recorded.
Both precisions are measured: fp32 (what runs on CPU) and bf16 (what runs on GPUs; DeepSpeed
runs it on CPU too, so its bookkeeping is the same as on a GPU).
Target: ZeRO-3 model states <= 0.6 x ZeRO-0.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import tempfile
from pathlib import Path

import _common as C

TARGET = 0.6
BATCH = 2
N_SAMPLES = 1000   # 10 s at 100 Hz


def model_config(smoke: bool):
    from melp_ray.model import model_config_from_preset

    if smoke:
        return model_config_from_preset("tiny")
    # "mid": between tiny and paper, big enough that model states dwarf activations at batch 2.
    return model_config_from_preset(
        "tiny", conv_layers=4, conv_channels=128, pos_conv_kernel=32, pos_conv_groups=8,
        ecg_width=384, ecg_layers=4, ecg_heads=6, ecg_ffn=1536,
        num_beat_queries=8, beat_width=128, num_caption_queries=32, pooler_heads=4,
        embed_dim=128, decoder_layers=2, decoder_heads=4,  # decoder width = the text width (256)
        text_overrides=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=1024))


# ---------------------------------------------------------------- counting (in each rank)

class Ledger:
    """Unique tensor storages, each under the first category that claimed it."""

    def __init__(self):
        self.seen: dict[int, tuple[int, str]] = {}
        self.accelerator = 0

    def add(self, t, category: str) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.seen:
            self.seen[storage.data_ptr()] = (storage.nbytes(), category)
            if t.device.type != "cpu":
                self.accelerator += storage.nbytes()

    def walk(self, obj, category_of, name: str = "", depth: int = 0) -> None:
        """Tensors in (nested) lists / tuples / dicts of an object's attributes."""
        import torch

        if isinstance(obj, torch.Tensor):
            self.add(obj, category_of(name))
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for item in obj:
                self.walk(item, category_of, name, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for key, item in obj.items():   # only string keys name things (not tensor keys)
                self.walk(item, category_of, f"{name}.{key}" if isinstance(key, str) else name,
                          depth + 1)

    def totals(self) -> dict[str, int]:
        out = {"params": 0, "grads": 0, "optimizer": 0}
        for nbytes, category in self.seen.values():
            out[category] += nbytes
        out["total"] = sum(out.values())
        out["accelerator"] = self.accelerator
        return out


def model_state_bytes(engine) -> dict[str, int]:
    ledger = Ledger()
    params = list(engine.module.parameters())
    for p in params:                        # first: the flat buffers params are views of
        ledger.add(p.data, "params")
        ledger.add(getattr(p, "ds_tensor", None), "params")
    for p in params:
        ledger.add(p.grad, "grads")

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)   # the client AdamW under DeepSpeed's wrapper
    for state in inner.state.values():
        for value in state.values():
            ledger.add(value, "optimizer")

    def category(name: str) -> str:
        return "grads" if ("grad" in name.lower() or "ipg" in name.lower()) else "optimizer"

    # DeepSpeed's own buffers: fp32 master partitions, gradient partitions and buckets.
    for name, value in vars(opt).items():
        if value is not inner:
            ledger.walk(value, category, name)
    return ledger.totals()


def all_live_tensor_bytes() -> int:
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                s = obj.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        except Exception:   # noqa: BLE001 - odd objects (weakrefs, half-built) are skipped
            continue
    return sum(seen.values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parse_stage(spec: str) -> tuple[int, bool, bool]:
    """``"3-offload"`` -> (3, offload optimizer, offload parameters)."""
    stage, _, mode = spec.partition("-")
    if mode not in ("", "offload") or stage not in "0123" or (mode and stage == "0"):
        raise ValueError(f"stage {spec!r}: expected 0-3, 1-offload, 2-offload or 3-offload")
    return int(stage), bool(mode), bool(mode) and stage == "3"


def rank_main(rank: int, world: int, port: int, stage: str, precision: str, smoke: bool,
              out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")   # before deepspeed is imported
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from melp_ray.config import TrainConfig
    from melp_ray.model.losses import compute_losses
    from melp_ray.model import MELP, count_parameters
    from melp_ray.train.deepspeed_config import deepspeed_config, skip_cpu_shared_memory_op
    from melp_ray.train.optim import param_groups

    rss_before_model = rss_bytes()
    cfg = model_config(smoke)
    torch.manual_seed(0)
    model = MELP(cfg)
    counts = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train = TrainConfig(num_workers=world, global_batch_size=BATCH * world, micro_batch_size=BATCH,
                        precision=precision, max_steps=10)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    if not torch.cuda.is_available():
        skip_cpu_shared_memory_op()   # as training does on CPU: no op built or loaded
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(train, ds_config(stage)),
                                      dist_init_required=False)
    gen = torch.Generator().manual_seed(rank)
    length = cfg.max_text_length
    ecg = torch.rand(BATCH, cfg.ecg_leads, N_SAMPLES, generator=gen)
    if precision == "bf16":
        ecg = ecg.to(torch.bfloat16)          # as the recipe feeds a bf16 engine
    ids = torch.randint(1000, 2000, (BATCH, length), generator=gen)
    mask = torch.ones(BATCH, length, dtype=torch.long)
    sentence_ids = torch.arange(length).repeat(BATCH, 1) % 3
    after_backward, after_step = {}, {}
    for _ in range(2):
        losses = compute_losses(engine(ecg, ids, mask, sentence_ids))
        engine.backward(losses["total"])
        after_backward = model_state_bytes(engine)
        engine.step()
        after_step = model_state_bytes(engine)
    peak = max((after_backward, after_step), key=lambda d: d["total"])
    gc.collect()
    report = {
        "rank": rank, "stage": stage, "precision": precision, "parameters": counts["total"], "trainable": trainable,
        "after_backward": after_backward, "after_step": after_step, "model_states_peak": peak,
        "all_live_tensor_bytes": all_live_tensor_bytes(),
        "rss_before_model": rss_before_model, "rss_end": rss_bytes(),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss": float(losses["total"].detach()),
    }
    Path(out_dir, f"{precision}_stage{stage}_rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def ds_config(spec: str):
    from melp_ray.config import DeepSpeedConfig

    stage, offload_optimizer, offload_param = parse_stage(spec)
    return DeepSpeedConfig(zero_stage=stage, offload_optimizer=offload_optimizer,
                           offload_param=offload_param)


def run_stage(stage: str, precision: str, smoke: bool, out_dir: str, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    from melp_ray.utils.distributed import free_port

    mp.start_processes(rank_main, args=(world, free_port(), stage, precision, smoke, out_dir),
                       nprocs=world, start_method="spawn", join=True)
    return [json.loads(Path(out_dir, f"{precision}_stage{stage}_rank{r}.json").read_text())
            for r in range(world)]


def measure_stages(stages: list[str], precision: str, workers: int, smoke: bool) -> dict:
    per_stage = {}
    with tempfile.TemporaryDirectory(prefix="melp-bench-zero-") as tmp:
        for stage in stages:
            C.log(f"ZeRO-{stage}, {precision}: {workers} ranks")
            ranks = run_stage(stage, precision, smoke, tmp, workers)
            worst = lambda key, sub=None, ranks=ranks: max(  # noqa: E731
                r[key][sub] if sub else r[key] for r in ranks)
            per_stage[stage] = {
                "ranks": ranks,
                "params": worst("model_states_peak", "params"),
                "grads": worst("model_states_peak", "grads"),
                "optimizer": worst("model_states_peak", "optimizer"),
                "model_states": worst("model_states_peak", "total"),
                "accelerator": worst("model_states_peak", "accelerator"),
                "all_live_tensors": worst("all_live_tensor_bytes"),
                "peak_rss": worst("peak_rss"),
                "peak_rss_over_start": max(r["peak_rss"] - r["rss_before_model"] for r in ranks),
            }
    base = per_stage.get("0")
    for row in per_stage.values():
        for key in ("model_states", "all_live_tensors", "peak_rss", "peak_rss_over_start"):
            row[f"{key}_vs_stage0"] = row[key] / base[key] if base else None
    s3 = per_stage.get("3", {}).get("model_states_vs_stage0")
    verdict = C.check(s3, TARGET, higher_is_better=False) if s3 is not None else "n/a"
    return {"stages": {str(k): v for k, v in per_stage.items()}, "stage3_vs_stage0": s3,
            "verdict": verdict}


def stage_table(precision: str, measured: dict) -> str:
    mb = 1 / 2**20
    rows = [[f"ZeRO-{k}", v["params"] * mb, v["grads"] * mb, v["optimizer"] * mb,
             v["model_states"] * mb, v["model_states_vs_stage0"],
             v["accelerator"] * mb if v["accelerator"] else "not run",
             v["all_live_tensors"] * mb,
             v["peak_rss"] * mb, v["peak_rss_vs_stage0"]] for k, v in measured["stages"].items()]
    s3 = measured["stage3_vs_stage0"]
    return (f"{precision}: MiB per worker (the larger rank)\n"
            + C.table(["stage", "params", "grads", "optimizer", "model states", "vs ZeRO-0",
                       "on accelerator",
                       "gc-visible tensors", "peak RSS", "RSS vs ZeRO-0"], rows)
            + f"\n{precision}: ZeRO-3 model states vs ZeRO-0: {s3 if s3 is None else round(s3, 3)} "
              f"(target <= {TARGET}): {measured['verdict']}\n")


def main(argv=None) -> int:
    p = C.parser("zero_memory", __doc__.splitlines()[0])
    p.add_argument("--stages", default="0,1,2,3,2-offload,3-offload")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 (CPU runs), bf16 (GPU runs)")
    p.add_argument("--workers", type=int, default=2, help="ranks (processes) per stage")
    args = p.parse_args(argv)
    info = C.machine()
    stages = args.stages.split(",")
    for spec in stages:
        parse_stage(spec)                     # a bad name fails before any process starts
    precisions = ["fp32"] if args.smoke else args.precisions.split(",")
    measured = {prec: measure_stages(stages, prec, args.workers, args.smoke) for prec in precisions}
    first = next(iter(next(iter(measured.values()))["stages"].values()))["ranks"][0]
    result = {
        "machine": info, "model": "tiny" if args.smoke else "mid", "parameters": first["parameters"],
        "trainable": first["trainable"], "workers": args.workers, "micro_batch": BATCH,
        "precisions": measured, "target": TARGET,
        # The CPU path (fp32) carries the headline verdict; bf16 is reported beside it.
        "stage3_vs_stage0": measured[precisions[0]]["stage3_vs_stage0"],
        "verdict": measured[precisions[0]]["verdict"],
    }
    text = (f"model: {result['model']}, {first['parameters'] / 1e6:.1f} M parameters "
            f"({first['trainable'] / 1e6:.1f} M trainable), {args.workers} workers, "
            f"batch {BATCH}/worker\n")
    text += "\n".join(stage_table(prec, m) for prec, m in measured.items())
    C.finish("zero_memory", args, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
