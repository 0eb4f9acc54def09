"""Issue #34: an elastic run (train.num_workers=[1,3]) resumed on another world size goes on
exactly as a run that never resized: 2 spawned gloo ranks train 2 steps and checkpoint, then
the same checkpoint resumes on 1 rank (this process) and on 3 spawned ranks, through the
recipe's own ``setup`` (DeepSpeed universal checkpoint for ZeRO 1-2, the whole optimizer
state for ZeRO 0), and 2 more steps give the parameters, AdamW moments and LR of the 2 ranks
that went on without a restart. Each step trains the same 12 records at any world size
(``rows.elastic_positions``), split 2 x 2 x 3 accumulation, 1 x 2 x 6 or 3 x 2 x 2.

No Ray: the batches are fed to ``train_micro_batches`` (the recipe's gradient caching runs,
the accumulation differs per world size); the beat loss is weighted 0 as in
tests/test_gradcache.py (its negatives are a micro-batch's, which differ between splits).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from melp_ray.config import PretrainConfig, load_config
from melp_ray.data.ptbxl import read_database
from melp_ray.data.rows import elastic_positions, elastic_slices, epoch_order, ShardRows
from melp_ray.data.sources import bundled_root
from melp_ray.pretraining.recipe import PretrainRecipe
from melp_ray.train.session import LocalSession, single_process_group
from melp_ray.train.stream import finish_batch, stream_spec
from melp_ray.utils.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
GLOBAL, MICRO, STEPS, STAGES = 12, 2, 4, (0, 2)
SMALLER = ["model.text_model=minilm-reports", "model.max_text_length=32", "data.seconds=2.5"]


def config(zero: int, storage: str) -> PretrainConfig:
    return load_config(PretrainConfig, "tiny", [
        "train.num_workers=[1,3]", f"train.global_batch_size={GLOBAL}",
        f"train.micro_batch_size={MICRO}", f"deepspeed.zero_stage={zero}", "data.materialize=false",
        f"train.max_steps={2 * STEPS}", "train.warmup_steps=1", "train.lr=1e-2", "loss.beat=0",
        "data.lead_mask_prob=0", f"run.storage_path={storage}", *SMALLER])


def no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():      # nn.Dropout modules, and the attention's dropout_p of SDPA
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0


def start(zero: int, folder: str) -> PretrainRecipe:
    """The recipe set up as a Ray Train worker would be, on this process group: resumes from
    the newest checkpoint in ``folder/checkpoints`` if there is one."""
    recipe = PretrainRecipe(config(zero, folder),
                            session=LocalSession({}, os.path.join(folder, "checkpoints")))
    recipe.setup()
    no_dropout(recipe.model)
    return recipe


def train_steps(recipe: PretrainRecipe, rows: dict, steps: range) -> None:
    """Steps of the epoch, this rank's records of each (the positions of an elastic epoch),
    through the recipe's training path; the data position advances as in ``train_epoch``."""
    t, world = recipe.cfg.train, recipe.world
    for step in steps:
        span = elastic_positions(len(rows["ecg"]), GLOBAL, world, recipe.rank, step)[0]
        mine = {k: v[span.start:span.stop] for k, v in rows.items()}
        group = [({k: v[i * MICRO:(i + 1) * MICRO] for k, v in mine.items()}, 7)
                 for i in range(t.grad_accum)]
        calls = [group] if recipe.micro_batches_per_call() == len(group) else [[g] for g in group]
        for call in calls:
            recipe.train_micro_batches(call)
        recipe.state.micro_in_epoch += t.grad_accum
        recipe.state.samples_seen += GLOBAL
        recipe.state.step += 1
    assert recipe.engine.global_steps == steps.stop


def full_state(recipe: PretrainRecipe) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 weights and AdamW moments, whole (a collective), and the LR."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = recipe.engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19.8 links the moments to the parameters after the first param
        # group's first step only; relink so the second group's are found too.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {"lr": torch.tensor(recipe.scheduler.get_last_lr())}
    for name, p in recipe.model.named_parameters():
        if not p.requires_grad:       # frozen (the text tower's embeddings): no optimizer state
            continue
        if recipe.cfg.deepspeed.zero_stage == 0:      # the plain AdamW holds them whole
            moments = optimizer.state[p]
            whole = {name: p.detach().clone(), f"{name}.exp_avg": moments["exp_avg"].clone(),
                     f"{name}.exp_avg_sq": moments["exp_avg_sq"].clone()}
        else:
            whole = {name: safe_get_full_fp32_param(p).clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                whole[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).clone()
        out |= {k: without_key_bias(name, v) for k, v in whole.items()}
    return {k: v for k, v in out.items() if v.numel()}


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` less its attention key bias. Softmax ignores a bias added to every key
    (each query's scores shift by one constant), so its true gradient is 0 and it steps on
    rounding noise alone, which AdamW's m/sqrt(v) scales up to ~lr: 1 or 3 ranks, summing
    in another order than 2, moved it by up to 5.8e-5 (measured), every other value by at
    most 4.6e-6."""
    if name.endswith(("k_proj.bias", "self.key.bias")):
        return tensor[:0]
    if name.endswith("in_proj_bias"):            # [query | key | value] biases
        third = tensor.numel() // 3
        return torch.cat([tensor[:third], tensor[2 * third:]])
    return tensor


def join_world(rank: int, world: int, port: int) -> None:
    for key, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world),
                       ("LOCAL_WORLD_SIZE", world), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", port)):
        os.environ[key] = str(value)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)


def two_ranks_checkpoint_and_go_on(rank: int, port: int, root: str, rows: dict) -> None:
    join_world(rank, 2, port)
    for zero in STAGES:
        recipe = start(zero, f"{root}/z{zero}")
        train_steps(recipe, rows, range(0, 2))
        recipe.save_checkpoint({"step": 2})
        train_steps(recipe, rows, range(2, STEPS))      # the run that never resized
        state = full_state(recipe)
        if rank == 0:
            torch.save(state, f"{root}/z{zero}/never_resized.pt")
        recipe.engine.destroy()
    dist.destroy_process_group()


def resume_and_go_on(zero: int, root: str, rows: dict, name: str) -> int:
    """Resume stage ``zero``'s checkpoint on this world, train the last steps; rank 0 saves
    the state as ``name``. Returns the position the resume restored (micro-batches)."""
    recipe = start(zero, f"{root}/z{zero}")
    position = recipe.state.micro_in_epoch
    assert recipe.state.step == 2 and recipe.state.samples_seen == 2 * GLOBAL
    train_steps(recipe, rows, range(2, STEPS))
    state = full_state(recipe)
    if recipe.rank == 0:
        torch.save(state, f"{root}/z{zero}/{name}.pt")
    recipe.engine.destroy()
    return position


def three_ranks_resume(rank: int, port: int, root: str, rows: dict) -> None:
    join_world(rank, 3, port)
    for zero in STAGES:
        assert resume_and_go_on(zero, root, rows, "resumed_on_3") == 2 * 2   # 2 steps x accum 2
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rows():
    """STEPS x 12 records: distinct real reports of the bundled sample, random ECGs."""
    spec = stream_spec(config(2, "/tmp"))
    n = STEPS * GLOBAL
    reports = [r for r in read_database(bundled_root())["report"] if str(r).strip()][:n]
    ecg = np.random.default_rng(0).normal(size=(n, 12, spec.n_samples)).astype(np.float32)
    return {k: torch.as_tensor(v) for k, v in finish_batch(ecg, reports, [[] for _ in reports],
                                                           spec).items()}


def test_resume_on_1_and_3_ranks_equals_a_run_that_never_resized(tmp_path, rows, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))     # the spawned ranks import this module
    root = str(tmp_path)
    mp.spawn(two_ranks_checkpoint_and_go_on, args=(free_port(), root, rows), nprocs=2, join=True)
    for zero in STAGES:     # the checkpoint of step 2 only: the resumes start from it
        folder = f"{root}/z{zero}/checkpoints"
        assert sorted(os.listdir(folder)) == ["checkpoint_step_000002"]
    mp.spawn(three_ranks_resume, args=(free_port(), root, rows), nprocs=3, join=True)
    single_process_group()
    for zero in STAGES:
        assert resume_and_go_on(zero, root, rows, "resumed_on_1") == 2 * 6   # accum 6
    for zero in STAGES:
        expected = torch.load(f"{root}/z{zero}/never_resized.pt")
        for world in (1, 3):
            got = torch.load(f"{root}/z{zero}/resumed_on_{world}.pt")
            assert got.keys() == expected.keys()
            for key in expected:
                where = f"ZeRO {zero}, {world} ranks, {key}"
                # atol: AdamW's m/sqrt(v) scales the rounding of reductions in another
                # order up (measured <= 4.6e-6); a wrong restore is far off: ~lr = 1e-2 a
                # step, 2e-3 for DeepSpeed's ZeRO-3 universal load (docs/cluster.md).
                torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-4,
                                           msg=lambda m, w=where: f"{w}: {m}")
        assert float(expected["lr"][0]) > 0 and any(
            float(v.abs().max()) > 0 for k, v in expected.items() if k.endswith("exp_avg_sq"))


def test_an_elastic_epoch_reads_every_record_once_across_resizes():
    """Positions and row slices: 2 workers for 3 steps, then 3 workers, then 1: each step
    trains the same records as without a resize, and the epoch reads every record once but
    the last (total mod global batch), which no world size reads."""
    files = [ShardRows("a", 10, tuple(range(10))), ShardRows("b", 9, (0, 1, 2, 4, 5, 6, 7, 8)),
             ShardRows("c", 25, tuple(range(25)))]
    order = epoch_order(files, epoch=3, seed=0)
    total = len(order)                                      # 43 rows kept, 3 full steps of 12
    assert total == 43 and epoch_order(files, 3, 0) == order != epoch_order(files, 4, 0)

    def step_records(world: int, step: int) -> list:
        out = []
        for rank in range(world):
            span = elastic_positions(total, GLOBAL, world, rank, step)[0]
            out += [order[i] for i in span]
        return out

    for step in range(total // GLOBAL):                     # the same records at any world size
        assert sorted(step_records(1, step)) == sorted(step_records(2, step)) \
            == sorted(step_records(3, step)) == sorted(step_records(4, step))
    seen = step_records(2, 0) + step_records(3, 1) + step_records(1, 2)
    assert len(seen) == len(set(seen)) == 36 and set(seen) == set(order[:36])
    with pytest.raises(ValueError, match="cannot be split over 5 workers"):
        elastic_positions(total, GLOBAL, 5, 0)
    # The slices a rank reads hold exactly its positions' rows (held-out row 3 of "b" dropped
    # on reading), one slice per run of one file.
    positions = elastic_positions(total, GLOBAL, 3, 1)
    rows = [(s.path, r) for s in elastic_slices(order, positions) for r in range(s.start, s.stop)
            if not (s.path == "b" and r == 3)]
    assert rows == [order[i] for span in positions for i in span]
