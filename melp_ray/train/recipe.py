"""One training worker: DeepSpeed engine, deterministic data, logging, checkpoints, resume.

A subclass says *what* to train (``build_model``, ``compute_losses``, ``validate``); this says *how*:

    recipe = MyRecipe(cfg); recipe.setup(); recipe.train(); recipe.cleanup()

Determinism (exact resume): each rank reads its own fixed slice of the data in a fixed
order (``melp_ray.data.rows``), every random draw of a micro-step is seeded from
(seed, step, micro-step, rank), and a checkpoint records the data position
(epoch, micro-batches consumed in it). Resuming replays nothing and skips exactly that.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from melp_ray.hub.checkpoint import CHECKPOINT_TAG, RUN_CONFIG, TRAINER_STATE, UNIVERSAL_TAG
from melp_ray.config import to_dict
from melp_ray.utils.distributed import mean_over_ranks
from melp_ray.train.deepspeed_config import deepspeed_config, skip_cpu_shared_memory_op, use_bf16
from melp_ray.train.augment import seeded_draws
from melp_ray.train.elastic import dataset_name, resized_checkpoint, saved_world_size
from melp_ray.train.metrics import MetricsLogger, Window, worker_print
from melp_ray.train.optim import lr_schedule, param_groups
from melp_ray.train.prefetch import EpochPrefetcher
from melp_ray.train.zero_grads import initialize_engine
from melp_ray.train.session import RayTrainSession


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0       # micro-batches of this epoch already consumed
    samples_seen: int = 0         # global samples
    # Model selection (train.checkpoint_metric): the best score so far, its step, how many
    # validations since, and whether early stopping ended the run.
    best_score: float | None = None
    best_step: int | None = None
    validations_since_best: int = 0
    stopped_early: bool = False


class DeepSpeedRecipe:
    dataset_prefix = "train"      # datasets are named f"{prefix}_r{rank}"

    def __init__(self, cfg, session=None):
        self.cfg = cfg
        self.launch_cfg = cfg     # setup() re-derives cfg.train for an elastic run's world size
        self.state = TrainState()
        self.pending: list[tuple[dict[str, torch.Tensor], int]] = []  # read, not yet trained
        # Ray Train's worker (the default, created in setup) or a LocalSession (this process).
        self.session = session
        # train.checkpoint_on_preemption: this attempt has checkpointed on a preemption notice
        # (not part of the saved state: a restarted run may be told of a later preemption).
        self.preemption_checkpointed = False

    # ---------------------------------------------------------------- hooks
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def compute_losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                       ) -> dict[str, torch.Tensor]:
        """Loss dict with a "total" key; ``generator`` seeds any augmentation."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        return {}

    def extra_metrics(self) -> dict[str, float]:
        nodes = self.session.cluster_nodes() if self.rank == 0 else None   # only rank 0 logs
        return {} if nodes is None else {"cluster_nodes": nodes}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        if self.session is None:
            self.session = RayTrainSession(self.cfg.train.checkpoint_upload)
        self.rank, self.world, self.device = self.session.rank, self.session.world, self.session.device
        self.launch_cfg = self.cfg        # as given: an elastic run's range, saved in checkpoints
        if self.cfg.train.elastic:        # this (re)start's split of the global batch
            self.cfg = replace(self.cfg, train=self.cfg.train.at_world(self.world))
        world = self.world if self.launch_cfg.train.elastic else None
        self.train_data = self.session.dataset(dataset_name(self.dataset_prefix, self.rank, world))
        self.val_data = self.session.dataset(dataset_name("val", self.rank, world))
        self.logger = MetricsLogger(self.cfg, self.rank)
        with self.session.resume_folder() as folder:
            saved_world = saved_world_size(folder) if folder is not None else None
            with resized_checkpoint(folder, saved_world, self.world) as (load_dir, tag):
                self.build_engine(universal=tag == UNIVERSAL_TAG)
                if folder is not None:
                    self.load_checkpoint(folder, load_dir, tag)

    def build_engine(self, universal: bool = False) -> None:
        """The model, AdamW, the LR schedule and the DeepSpeed engine around them (the
        process group must exist: Ray Train's, or bench/gpu_step.py's own). ``universal``:
        the engine will load a universal checkpoint (a resume on another world size)."""
        if not self.cfg.train.use_gpu:
            skip_cpu_shared_memory_op()
        self.bf16 = use_bf16(self.cfg.train)
        torch.manual_seed(self.cfg.train.seed)    # identical initial weights on every rank
        model = self.build_model()
        t = self.cfg.train
        if t.compile:
            self.compile_model(model)
        optimizer = self.build_optimizer(model)
        scheduler = lr_schedule(optimizer, t)
        config = deepspeed_config(self.cfg.train, self.cfg.deepspeed)
        if universal:
            config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, self.scheduler = initialize_engine(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        # fused: one kernel over each of ZeRO's flat fp32 partitions; the for-each AdamW makes
        # temporaries the size of the partition every step (its denominator, the update).
        return torch.optim.AdamW(param_groups(model, t.weight_decay, t.decay_all_parameters),
                                 lr=t.lr, betas=tuple(t.betas), fused=True)

    def compile_model(self, model: torch.nn.Module) -> None:
        """``train.compile``: compile in place (``nn.Module.compile``: parameter names, hence
        checkpoints, stay as they are). A recipe may compile only some parts."""
        model.compile()

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    # ---------------------------------------------------------------- data
    def train_dataset(self, epoch: int):
        """What this rank trains on in ``epoch``: its Ray Train dataset shard (a recipe may
        build one per epoch instead)."""
        return self.train_data

    def epoch_batches(self, epoch: int) -> Iterable[dict[str, torch.Tensor]]:
        t = self.cfg.train
        # An elastic run's order is its seeded epoch order: a rank's local shuffle would
        # make what it consumed depend on the world size.
        shuffle = None if self.launch_cfg.train.elastic else (self.cfg.data.shuffle_buffer or None)
        return self.train_dataset(epoch).iter_torch_batches(
            batch_size=t.micro_batch_size, drop_last=True, device=self.device,
            local_shuffle_buffer_size=shuffle,
            local_shuffle_seed=(t.seed * 10_007 + epoch) if shuffle else None)

    def next_batch_everywhere(self, batches: Iterator) -> dict | None:
        return self.batch_everywhere(next(batches, None))

    def batch_everywhere(self, batch: dict | None) -> dict | None:
        """``batch``, or None on *every* rank once *any* rank has run out of batches.

        Ranks may hold a few rows more or less (shards, rejected records); agreeing here
        keeps all ranks stepping together instead of hanging in a collective.
        """
        have = torch.tensor([0 if batch is None else 1], device=self.device)
        if self.world > 1:
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
        return batch if have.item() == 1 else None

    # ---------------------------------------------------------------- training
    def train(self) -> dict[str, Any]:
        t = self.cfg.train
        stop_at = min(t.max_steps, t.stop_at_step or t.max_steps)
        window = Window()
        empty_epochs = 0
        # Epoch after epoch, a few batches ahead; a resume skips what was already consumed.
        batches = EpochPrefetcher(self.epoch_batches, self.state.epoch, self.state.micro_in_epoch,
                                  depth=self.cfg.data.prefetch_batches)
        try:
            while self.steps_left(stop_at):
                empty_epochs = self.train_epoch(batches, window, stop_at, empty_epochs)
        finally:
            batches.close()
        return self.finish()

    def train_epoch(self, batches: EpochPrefetcher, window: Window, stop_at: int,
                    empty_epochs: int) -> int:
        """Train until this epoch's data or the step budget ends; returns how many epochs in a
        row have yielded no micro-batch (two in a row is an error)."""
        t = self.cfg.train
        consumed_this_epoch = 0
        group = self.micro_batches_per_call()
        while self.steps_left(stop_at):
            wait_start = time.perf_counter()
            batch = self.batch_everywhere(batches.next(self.state.epoch))
            window.input_wait += time.perf_counter() - wait_start
            if batch is None:
                break
            # The seed of a micro-batch depends on where it was read, not when it is trained.
            self.pending.append((batch, self.micro_seed()))
            self.state.micro_in_epoch += 1
            self.state.samples_seen += t.micro_batch_size * self.world
            consumed_this_epoch += 1
            if len(self.pending) < group:   # a cached step needs all its micro-batches first
                continue
            todo, self.pending = self.pending, []
            steps_before = self.engine.global_steps
            for losses in self.train_micro_batches(todo):
                window.add(losses, t.micro_batch_size * self.world)
            if self.engine.global_steps == steps_before:   # gradients still accumulating
                continue
            self.state.step += 1
            self.after_optimizer_step(window, stop_at)
        if consumed_this_epoch == 0:
            empty_epochs += 1
            if empty_epochs >= 2:
                raise RuntimeError(f"rank {self.rank}: the training data yields no full "
                                   f"micro-batch of {t.micro_batch_size}")
        else:
            empty_epochs = 0
        if self.steps_left(stop_at):
            self.state.epoch += 1
            self.state.micro_in_epoch = 0
        return empty_epochs

    def steps_left(self, stop_at: int) -> bool:
        """Whether training goes on: steps remain and early stopping has not ended the run."""
        return self.state.step < stop_at and not self.state.stopped_early

    def micro_batches_per_call(self) -> int:
        """How many micro-batches ``train_micro_batches`` takes at once: 1, or a whole
        optimizer step's (a recipe whose loss couples the micro-batches of a step)."""
        return 1

    def train_micro_batches(self, group: list[tuple[dict[str, torch.Tensor], int]]
                            ) -> list[dict[str, float]]:
        """Forward, backward and ``engine.step`` for (batch, seed) pairs; their loss dicts."""
        return [self.micro_step(batch, seed) for batch, seed in group]

    def micro_step(self, batch: dict[str, torch.Tensor], seed: int | None = None
                   ) -> dict[str, float]:
        generator = seeded_draws(self.micro_seed() if seed is None else seed)
        self.engine.train()
        losses = self.compute_losses(batch, generator)
        self.engine.backward(losses["total"])
        self.engine.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def micro_seed(self) -> int:
        """A seed unique to (seed, epoch, micro-batch, rank): a resumed run draws the same."""
        import numpy as np

        s = self.state
        key = [self.cfg.train.seed, s.epoch, s.micro_in_epoch, self.rank]
        return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)

    def after_optimizer_step(self, window: Window, stop_at: int) -> None:
        t = self.cfg.train
        step = self.state.step
        last = step >= stop_at
        # Ray is asked for a preemption notice at log steps only: a round trip to its
        # synchronization actor (bench/checkpoint_upload.py), like the report made there.
        preempted = step % t.log_every == 0 and self.preemption_checkpoint_due()
        want_ckpt = step % t.checkpoint_every == 0 or last or preempted
        want_val = ((t.val_every and step % t.val_every == 0) or step == t.max_steps
                    or (want_ckpt and t.checkpoint_metric is not None))  # each checkpoint is scored
        want_log = step % t.log_every == 0 or want_ckpt or want_val
        if not want_log:
            return
        metrics = window.summary(step, self.scheduler.get_last_lr()[0])
        # Loss means of the whole world (each rank only saw its own micro-batches).
        metrics |= mean_over_ranks({k: v for k, v in metrics.items() if k.startswith("loss/")},
                                   self.device)
        metrics.update(self.extra_metrics())
        if want_val:
            metrics.update({f"val/{k}": v for k, v in self.validate().items()})
            if t.checkpoint_metric is not None:
                self.track_best(metrics)
                want_ckpt = want_ckpt or self.state.stopped_early   # the run ends here
        metrics.update(epoch=self.state.epoch, samples_seen=self.state.samples_seen, world_size=self.world)
        if getattr(self, "resumed_from_step", None) is not None:
            metrics["resumed_from_step"] = self.resumed_from_step
            self.resumed_from_step = None
        self.logger.log(metrics)
        self.last_metrics = metrics
        if want_ckpt:
            self.save_checkpoint(metrics)
            self.logger.sync()    # a restart resumes from a checkpoint: its history is stored
        else:
            self.session.report(metrics)
        window.reset()

    def preemption_checkpoint_due(self) -> bool:
        """``train.checkpoint_on_preemption``: True at the first log step after Ray Train's
        notice that a node of this run is being reclaimed (the checkpoint then leaves before
        the node does; Ray restarts the run from it). A collective: every rank asks at the
        same steps."""
        if not self.cfg.train.checkpoint_on_preemption or self.preemption_checkpointed:
            return False
        if (notice := self.preemption_notice()) is None:
            return False
        self.preemption_checkpointed = True
        if self.rank == 0:
            worker_print(f"[melp_ray] preemption notice at step {self.state.step} (ranks "
                         f"{notice.preempted_ranks}, deadline_ms {notice.deadline_ms}): "
                         f"checkpointing now")
        return True

    def preemption_notice(self):
        return self.session.preemption_notice()

    def track_best(self, metrics: dict[str, Any]) -> None:
        """Update the best score (all ranks see the same mean) and the early-stopping count."""
        t = self.cfg.train
        if t.checkpoint_metric not in metrics:
            val_keys = sorted(k for k in metrics if k.startswith("val/"))
            raise RuntimeError(f"train.checkpoint_metric={t.checkpoint_metric!r} is not among "
                               f"this run's validation metrics {val_keys}")
        score, s = float(metrics[t.checkpoint_metric]), self.state
        better = s.best_score is None or (score > s.best_score if t.checkpoint_mode == "max"
                                          else score < s.best_score)
        if better:
            s.best_score, s.best_step, s.validations_since_best = score, s.step, 0
        else:
            s.validations_since_best += 1
        if t.early_stop_patience and s.validations_since_best >= t.early_stop_patience:
            s.stopped_early = True
            if self.rank == 0:
                worker_print(f"[melp_ray] early stop at step {s.step}: {t.checkpoint_metric} has not "
                             f"improved on {s.best_score:.4f} (step {s.best_step}) in "
                             f"{s.validations_since_best} validations")

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Every rank writes its DeepSpeed shard into a local folder of its own; Ray (or the
        LocalSession) merges them into one checkpoint folder and then deletes the local one
        (with ``train.checkpoint_upload=async`` after the step has moved on)."""
        tmp = tempfile.mkdtemp(prefix="melp_ckpt_")
        try:
            self.engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
            if self.rank == 0:
                with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                    json.dump({**asdict(self.state), "world_size": self.world,
                               "micro_batch_size": self.cfg.train.micro_batch_size,
                               "zero_stage": self.cfg.deepspeed.zero_stage, "metrics": metrics}, f, indent=2)
                with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
                    json.dump(to_dict(self.launch_cfg), f, indent=2)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.session.report(metrics, checkpoint_folder=tmp)

    def load_checkpoint(self, path: str, load_dir: str | None = None,
                        tag: str = CHECKPOINT_TAG) -> None:
        """Resume from the checkpoint folder ``path``: weights, optimizer, schedule, state. ``load_dir``/
        ``tag``: where DeepSpeed reads the engine state instead (``path`` converted to universal)."""
        load_path, _ = self.engine.load_checkpoint(load_dir or path, tag=tag,
                                                   load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")
        with open(os.path.join(path, TRAINER_STATE)) as f:
            saved = json.load(f)
        defaults = asdict(TrainState())
        self.state = TrainState(**{k: saved.get(k, v) for k, v in defaults.items()})
        self.last_metrics = saved.get("metrics", {})   # what finish() reports if no step is left
        saved_world = saved.get("world_size", self.world)
        if saved_world != self.world:
            self.state.micro_in_epoch = self.resized_position(saved)
        self.resumed_from_step = self.state.step   # logged once, so restarts show in metrics
        if self.rank == 0:
            resized = f", resized from {saved_world} to {self.world} workers" \
                if saved_world != self.world else ""
            worker_print(f"[melp_ray] resumed from step {self.state.step} (epoch "
                         f"{self.state.epoch}, {self.state.micro_in_epoch} micro-batches into it"
                         f"{resized})")

    def resized_position(self, saved: dict[str, Any]) -> int:
        """After a resume on another number of workers: the micro-batches of the current
        epoch already consumed, counted in this world size's micro-batches. A checkpoint
        falls between optimizer steps, so that is the epoch's steps done x this world's
        accumulation steps (an elastic run deals each step's records the same way at any
        world size: ``rows.elastic_positions``)."""
        if not self.launch_cfg.train.elastic:
            raise RuntimeError(f"a checkpoint of {saved['world_size']} workers cannot resume a "
                               f"run of a fixed {self.world}: give train.num_workers a range")
        old = saved.get("micro_batch_size")
        samples = self.state.micro_in_epoch * old * saved["world_size"]
        steps_in_epoch, rest = divmod(samples, self.cfg.train.global_batch_size)
        if old is None or rest:
            raise RuntimeError(f"checkpoint at step {self.state.step} is not between two optimizer "
                               f"steps of this run's global batch: cannot resize it")
        return steps_in_epoch * self.cfg.train.grad_accum

    def finish(self) -> dict[str, Any]:
        s = self.state
        return {"step": s.step, "world_size": self.world, "zero_stage": self.cfg.deepspeed.zero_stage,
                "metrics": getattr(self, "last_metrics", {}), "stopped_early": s.stopped_early,
                "best_step": s.best_step, "best_score": s.best_score,
                # as the worker process saw them (train.worker_env): None where not set
                "worker_env": {k: os.environ.get(k) for k in self.cfg.train.worker_env}}

    def cleanup(self) -> None:
        self.logger.close()
