"""The sections of a run's config (data, loss, train, deepspeed, run) and their checks.

Each section is a typed dataclass; each ``*_problems`` function lists what is wrong with one
section (an empty list: nothing), so a config can name every problem at once. The whole
config (``melp_ray.config.PretrainConfig``) is put together, loaded and checked across
sections in ``melp_ray/config.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from melp_ray.config_parsing import ConfigError
from melp_ray.utils import storage


@dataclass
class DataConfig:
    root: str | None = None          # prepared shards (with manifest.json) or a raw root; None: bundled PTB-XL
    dataset: str = "auto"            # auto | ptb-xl | mimic-iv-ecg | manifest (for raw roots)
    sample_rate: int = 500           # Hz after resampling
    seconds: float = 10.0
    lead_mask_prob: float = 0.5      # random lead masking (train split only)
    random_shift: bool = False       # roll each training record by a random offset in time (not in the reference)
    val_fraction: float = 0.1        # subject-level split for raw roots
    shuffle_buffer: int = 256        # rows in each worker's local shuffle buffer (0: no shuffle)
    prefetch_batches: int = 4        # micro-batches fetched ahead, across epoch boundaries too
    # Run the read/decode/tokenise pipeline once, before training, and keep its output in
    # Ray's object store (Dataset.materialize): epochs then only re-shuffle. For data that
    # fits the object store many times over (the bundled sample, PTB-XL at 100 Hz).
    materialize: bool = False
    # Shards, streamed (not materialized): each epoch a seeded permutation decides which
    # shard files each worker reads, so no worker sees the same slice of the data every epoch.
    reassign_shards: bool = True
    limit: int | None = None         # smoke runs: first N raw records; shards: one file per worker
    exclude_folds: list[int] = field(default_factory=list)  # PTB-XL strat_folds kept out of train and val


@dataclass
class LossConfig:
    rhythm: float = 1.0   # global ECG-report contrastive
    token: float = 2.0    # captioning
    beat: float = 0.2     # beat-sentence alignment
    # rhythm: ECGs whose reports are identical are positives, not negatives (the reference:
    # False). Repeated reports ("sinus rhythm. normal ecg.") are common in PTB-XL and MIMIC.
    same_report_positives: bool = False


# glibc settings (MALLOC_* environment variables): no memory returned to the OS on free and
# no large block its own mmap, in one arena; see TrainConfig.worker_env.
KEEP_FREED_MEMORY_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(2**34),
                         "MALLOC_TRIM_THRESHOLD_": str(2**34)}


@dataclass
class TrainConfig:
    # A count, or [min, max]: an elastic run (Ray Train's ScalingConfig(num_workers=(min, max)))
    # that starts with as many workers as fit and resizes from its last checkpoint.
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5     # < 1 leaves CPUs for Ray Data on small machines
    # More Ray resources each worker asks for, beside CPU (and GPU with use_gpu), e.g.
    # {"accelerator_type:A100": 0.001}: the workers go only to nodes that have them.
    worker_resources: dict[str, float] = field(default_factory=dict)
    # Environment variables of the training worker processes, set before they start
    # (RunConfig.worker_runtime_env). The default keeps memory glibc would hand back to the
    # OS: every ZeRO 1-2 step builds a flat gradient partition the size of the trainable
    # model, and a fresh mmap of it costs ~200 k page faults per GB, 1-3 s a step on CPU
    # for the paper model (bench/README.md "reference_step.py"). One arena, because the
    # step runs on a worker thread, whose own arena maps such blocks anyway. {}: none.
    worker_env: dict[str, str] = field(default_factory=lambda: dict(KEEP_FREED_MEMORY_ENV))
    # An elastic run: how often Ray Train checks whether more workers fit, and then restarts
    # the group larger from the last checkpoint (ScalingConfig.elastic_resize_monitor_interval_s).
    elastic_resize_interval_s: float = 60.0
    global_batch_size: int = 16      # = micro_batch_size x grad_accum x num_workers
    micro_batch_size: int | None = None  # None: global_batch_size / num_workers
    # With grad_accum > 1, how the rhythm (contrastive) loss sees the batch. cached: one loss
    # over the whole global batch (gradient caching: a no-grad forward of every micro-batch of
    # the step first, ~+1 forward per sample); per_micro_batch: one loss per micro-step, whose
    # negatives are only micro_batch_size x num_workers.
    contrastive_accumulation: str = "cached"
    max_steps: int = 40              # length of the run (and of the LR schedule)
    stop_at_step: int | None = None  # stop early here, as if interrupted; re-run to resume
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.2
    decay_all_parameters: bool = False  # True: decay biases/norms too (the reference does)
    schedule: str = "warmup_cosine"  # warmup_cosine | cosine_restarts (the reference's)
    warmup_steps: int = 5            # warmup_cosine only
    restart_steps: int | None = None  # cosine_restarts period; None: half of max_steps
    grad_clip: float = 1.0           # 0: no clipping (the reference clips nothing)
    precision: str = "auto"          # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    # torch.compile the model's parts (MELP: ECG encoder, poolers, text tower, decoder):
    # fused kernels, far fewer launches a step (bench/step_ops.py); costs compile time at the
    # first step (and at the first validation). ZeRO 0-2 only.
    compile: bool = False
    seed: int = 0
    log_every: int = 5
    val_every: int = 20              # 0: validate only at the end
    val_batches: int = 8             # per worker
    checkpoint_every: int = 20
    keep_checkpoints: int = 2        # with checkpoint_metric: the best N, plus the newest
    # async: Ray Train copies each checkpoint to run.storage_path in a background thread while
    # training goes on (ray.train.report(checkpoint_upload_mode=ASYNC)); sync: the step waits
    # for the copy. A restart resumes from the newest checkpoint whose copy has completed.
    checkpoint_upload: str = "async"
    # On Ray Train's notice that a node of the run is about to be reclaimed (a spot instance;
    # ray.train.get_preemption_info, asked every log_every steps), checkpoint at once, then
    # keep training until Ray restarts the run from that checkpoint.
    checkpoint_on_preemption: bool = True
    # Model selection, as the reference does it: rank checkpoints by a validation metric
    # (every checkpoint is then validated), e.g. val/zeroshot_auroc. None: keep the newest.
    checkpoint_metric: str | None = None
    checkpoint_mode: str = "max"     # max | min
    early_stop_patience: int = 0     # stop after N validations without a better metric; 0: off
    # Start from these weights (a training checkpoint, run folder, export or converted
    # reference folder); step, optimizer and schedule start fresh. Pretraining only.
    init_from: str | None = None

    @property
    def elastic(self) -> bool:
        """Whether ``num_workers`` is a range [min, max] (Ray Train elastic scaling)."""
        return isinstance(self.num_workers, tuple)

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; (n, n) for a fixed count."""
        return self.num_workers if self.elastic else (self.num_workers, self.num_workers)

    def at_world(self, world: int) -> TrainConfig:
        """This config for a run of ``world`` workers: the count fixed, the micro-batch
        (when left out: global / world) and so grad_accum derived for it. An elastic run's
        workers call it at each (re)start with the world size Ray Train gave them."""
        lo, hi = self.worker_range
        if not lo <= world <= hi:
            raise ValueError(f"{world} workers is outside train.num_workers={list(self.worker_range)}")
        micro = self.micro_batch_size if self.micro_batch_size is not None \
            else self.global_batch_size // world
        return dataclasses.replace(self, num_workers=world, micro_batch_size=micro)

    @property
    def grad_accum(self) -> int:
        if self.elastic:
            raise ValueError("an elastic config has no single grad_accum: use at_world(world)")
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def contrastive_negatives(self) -> int:
        """ECG-report pairs one rhythm loss scores together (each pair's negatives are the
        others): the global batch when cached, else one micro-batch of every worker."""
        if self.contrastive_accumulation == "cached":
            return self.global_batch_size
        if self.elastic:
            raise ValueError("an elastic config: contrastive_negatives depends on the world size")
        return self.micro_batch_size * self.num_workers


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    # ZeRO-Offload: optimizer states (fp32 master weights, AdamW moments) and the optimizer
    # step live in host memory (stages 1-3); offload_param also keeps the parameter partitions
    # there between uses (stage 3 only). Trades accelerator memory for host<->device copies.
    offload_optimizer: bool = False
    offload_param: bool = False
    # Elements per gradient-reduction bucket. DeepSpeed's default (5e8) makes ZeRO-3 allocate
    # a 5e8-element buffer per worker (1 GiB in bf16), more than the paper model's 168 M
    # parameters; 5e7 still reduces the paper model in a handful of collectives.
    reduce_bucket_size: int = 50_000_000
    # bf16 only: before each step, look for inf/NaN in every parameter's gradient and skip the
    # step if one has any (DeepSpeed's bf16 default). It costs ~7 operators per parameter
    # tensor (~2,700 kernel launches a step for the paper model, bench/step_ops.py); fp32
    # runs never check, nor does the reference's bf16 training.
    check_grad_overflow: bool = False
    # ZeRO 1-2: DeepSpeed copies each gradient into the reduction bucket and out again (two
    # operators per parameter tensor a step). false: each bucket is flattened once and the
    # gradients are re-pointed at the reduced bucket (melp_ray/train/zero_grads.py), no
    # operator per tensor; with ZeRO-2 on several GPUs the buckets then stay whole until the
    # step (the full gradient, not this rank's partition). Not with offload_optimizer.
    contiguous_gradients: bool = True


@dataclass
class RunConfig:
    name: str = "melp-tiny"
    storage_path: str = "~/ray_results/melp_ray"
    max_failures: int = 0
    wandb: bool = False
    wandb_project: str = "melp_ray"
    wandb_group: str | None = None   # W&B run group (a Tune sweep sets its name: one group a sweep)
    # TensorBoard event files of the same scalars as metrics.jsonl, in <run dir>/tensorboard.
    tensorboard: bool = False
    # True: the libraries (Ray Train/Data, DeepSpeed, transformers) print at their own default
    # levels; False: only their warnings and errors (melp_ray/utils/console.py). CLI: --verbose.
    verbose: bool = False


def check_data_root(data: DataConfig) -> None:
    """Fail on a missing or malformed ``data.root`` before Ray starts (a URI must hold a
    manifest.json of prepared shards, read with the driver's credentials)."""
    from melp_ray.data.sources import DataRootError, detect_layout

    if data.root is None:
        return
    try:
        detect_layout(data.root)
    except DataRootError as err:
        raise ConfigError(f"data.root: {err}") from None


def data_has_labels(data: DataConfig) -> bool | None:
    """Whether validation records carry PTB-XL labels (the manifest says, for shards)."""
    from melp_ray.data.sources import DataRootError, detect_layout

    if data.root is None:
        return True                               # the bundled PTB-XL sample
    try:
        layout = data.dataset if data.dataset != "auto" else detect_layout(data.root)
        if layout == "shards":
            from melp_ray.data.shards import load_manifest

            layout = load_manifest(data.root).get("dataset")
    except (DataRootError, OSError, ValueError, KeyError) as err:
        raise ConfigError(f"data.root: {err}") from None
    return layout == "ptb-xl"


def raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def train_problems(t: TrainConfig) -> list[str]:
    """Checks shared by every recipe; also fills micro_batch_size when it was left out
    (a fixed worker count only: an elastic run derives it at each (re)start)."""
    problems = worker_range_problems(t)
    if not problems:
        lo, hi = t.worker_range
        if lo == hi:
            t.num_workers = lo        # [n, n] is the fixed count n
        for world in range(lo, hi + 1):
            problems += batch_split_problems(t, world)
        if not t.elastic and t.micro_batch_size is None and not problems:
            t.micro_batch_size = t.global_batch_size // t.num_workers
    if t.global_batch_size < 2:
        problems.append("train.global_batch_size must be >= 2 (contrastive loss needs negatives)")
    if t.max_steps < 1:
        problems.append("train.max_steps must be >= 1")
    if t.stop_at_step is not None and not 1 <= t.stop_at_step <= t.max_steps:
        problems.append("train.stop_at_step must be between 1 and train.max_steps")
    if t.contrastive_accumulation not in ("cached", "per_micro_batch"):
        problems.append("train.contrastive_accumulation must be cached or per_micro_batch, got "
                        f"{t.contrastive_accumulation!r}")
    if t.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"train.precision must be auto, bf16 or fp32, got {t.precision!r}")
    if t.precision == "bf16" and not t.use_gpu:
        problems.append("train.precision=bf16 needs train.use_gpu=true (CPU runs are fp32)")
    if t.cpus_per_worker <= 0:
        problems.append("train.cpus_per_worker must be > 0")
    for name, amount in t.worker_resources.items():
        if name in ("CPU", "GPU") or not isinstance(amount, (int, float)) or amount <= 0:
            problems.append(f"train.worker_resources: {name}={amount!r}: a custom resource "
                            f"with an amount > 0 (CPU and GPU: train.cpus_per_worker, train.use_gpu)")
    for name, value in t.worker_env.items():
        if not isinstance(value, str) or not name or "=" in name:
            problems.append(f"train.worker_env: {name}={value!r}: a variable name and a string "
                            f"value (quote numbers)")
    if t.elastic_resize_interval_s < 0:
        problems.append("train.elastic_resize_interval_s must be >= 0")
    if t.lr <= 0:
        problems.append("train.lr must be > 0")
    if t.schedule not in ("warmup_cosine", "cosine_restarts"):
        problems.append(f"train.schedule must be warmup_cosine or cosine_restarts, got {t.schedule!r}")
    if t.restart_steps is not None and t.restart_steps < 1:
        problems.append("train.restart_steps must be >= 1 (or null: half of train.max_steps)")
    if t.grad_clip < 0:
        problems.append("train.grad_clip must be >= 0 (0: no clipping)")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name} must be >= 1")
    if t.checkpoint_upload not in ("async", "sync"):
        problems.append(f"train.checkpoint_upload must be async or sync, got {t.checkpoint_upload!r}")
    return problems + model_selection_problems(t)


def worker_range_problems(t: TrainConfig) -> list[str]:
    """``train.num_workers``: a count >= 1, or [min, max] with 1 <= min <= max."""
    lo, hi = t.worker_range
    if t.elastic and not 1 <= lo <= hi:
        return [f"train.num_workers=[{lo}, {hi}]: an elastic range needs 1 <= min <= max"]
    if not t.elastic and lo < 1:
        return ["train.num_workers must be >= 1"]
    return []


def batch_split_problems(t: TrainConfig, world: int) -> list[str]:
    """Whether ``world`` workers can make the global batch: micro-batch x grad_accum x world
    = global_batch_size (micro-batch left out: global / world, no accumulation)."""
    where = (f"{world} workers (within train.num_workers={list(t.worker_range)})" if t.elastic
             else f"train.num_workers={world}")
    if t.micro_batch_size is None:
        if t.global_batch_size % world:
            return [f"train.global_batch_size={t.global_batch_size} is not divisible by {where}"]
        return []
    per_step = t.micro_batch_size * world
    if t.micro_batch_size < 1 or t.global_batch_size % per_step:
        return [f"train.global_batch_size={t.global_batch_size} must equal micro_batch_size x "
                f"grad_accum x num_workers; micro-batch {t.micro_batch_size} x {where} does "
                f"not divide it"]
    return []


def model_selection_problems(t: TrainConfig) -> list[str]:
    problems = []
    if t.checkpoint_metric is not None and not t.checkpoint_metric.startswith("val/"):
        problems.append(f"train.checkpoint_metric must name a validation metric (val/...), "
                        f"got {t.checkpoint_metric!r}")
    if t.checkpoint_mode not in ("max", "min"):
        problems.append(f"train.checkpoint_mode must be max or min, got {t.checkpoint_mode!r}")
    if t.early_stop_patience < 0:
        problems.append("train.early_stop_patience must be >= 0 (0: off)")
    if t.early_stop_patience and t.checkpoint_metric is None:
        problems.append("train.early_stop_patience needs train.checkpoint_metric (what to watch)")
    return problems


def deepspeed_problems(ds: DeepSpeedConfig) -> list[str]:
    problems = []
    if ds.zero_stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.reduce_bucket_size < 1_000_000:
        problems.append(f"deepspeed.reduce_bucket_size must be >= 1e6 elements, "
                        f"got {ds.reduce_bucket_size}")
    if ds.offload_optimizer and ds.zero_stage == 0:
        problems.append("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    if ds.offload_param and ds.zero_stage != 3:
        problems.append("deepspeed.offload_param needs deepspeed.zero_stage=3 "
                        "(only ZeRO-3 partitions parameters)")
    if not ds.contiguous_gradients and (ds.zero_stage not in (1, 2) or ds.offload_optimizer):
        problems.append("deepspeed.contiguous_gradients=false needs deepspeed.zero_stage 1 or 2 "
                        "without offload_optimizer (DeepSpeed's offload copies regardless)")
    return problems


def loss_problems(loss: LossConfig) -> list[str]:
    problems = [f"loss.{n} must be >= 0" for n in ("rhythm", "token", "beat")
                if getattr(loss, n) < 0]
    if not any(getattr(loss, n) > 0 for n in ("rhythm", "token", "beat")):
        problems.append("at least one loss weight must be > 0")
    return problems


def data_problems(d: DataConfig) -> list[str]:
    problems = []
    if not 0 <= d.lead_mask_prob < 1:
        problems.append("data.lead_mask_prob must be in [0, 1)")
    if d.sample_rate < 50 or d.seconds <= 0:
        problems.append("data.sample_rate must be >= 50 Hz and data.seconds > 0")
    if d.dataset not in ("auto", "ptb-xl", "mimic-iv-ecg", "manifest"):
        problems.append(f"data.dataset must be auto, ptb-xl, mimic-iv-ecg or manifest, got {d.dataset!r}")
    if not 0 <= d.val_fraction < 1:
        problems.append("data.val_fraction must be in [0, 1)")
    if d.shuffle_buffer < 0 or d.prefetch_batches < 1:
        problems.append("data.shuffle_buffer must be >= 0 and data.prefetch_batches >= 1")
    if d.root is not None and not storage.is_uri(d.root) and not Path(d.root).expanduser().exists():
        problems.append(f"data.root {d.root!r} does not exist")
    bad_folds = [f for f in d.exclude_folds if isinstance(f, bool) or not isinstance(f, int) or f < 1]
    if bad_folds:
        problems.append(f"data.exclude_folds must list fold numbers (ints >= 1), got {bad_folds}")
    return problems


def run_problems(run: RunConfig) -> list[str]:
    if not run.name or "/" in run.name:
        return ["run.name must be a non-empty name without '/'"]
    return []

