"""Issue #35: with gradient accumulation the rhythm loss still spans the whole global batch
(gradient caching), and one optimizer step equals the one-big-batch step, through the real
DeepSpeed engine (ZeRO 1 and 2) on 1 and 2 gloo processes.

The optimizer is plain SGD (lr 1, no decay, no clipping), so a parameter's update is minus
its gradient: AdamW's first step, m/sqrt(v), is about sign(gradient) and would hide a wrong
gradient scale. The beat loss is weighted 0 in the total: it is local to a micro-batch by
design (its negatives are the micro-batch's), so it differs between the splits.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import numpy as np

from melp_ray.config import ConfigError, PretrainConfig, load_config
from melp_ray.data.ptbxl import read_database
from melp_ray.data.sources import bundled_root
from melp_ray.train.stream import finish_batch
from melp_ray.utils.distributed import free_port
from melp_ray.model.losses import compute_losses, rhythm_loss
from melp_ray.model import MELP
from melp_ray.pretraining.recipe import PretrainRecipe
from melp_ray.pretraining.run import batch_banner, contrastive_summary
from melp_ray.train.stream import stream_spec
from melp_ray.train.session import single_process_group

REPO = Path(__file__).resolve().parents[1]

GLOBAL = 32
SEEDS = [101, 102, 103, 104]        # one per micro-batch of the step (dropout draws)
# The tiny preset made ~5x cheaper a step (the file runs in seconds, 2 spawned ranks included):
# the pruned vocabulary shrinks the token head, and shorter reports and ECGs the rest.
SMALLER = ["model.text_model=minilm-reports", "model.max_text_length=32", "data.seconds=2.5"]


class SGDRecipe(PretrainRecipe):
    def build_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.cfg.train.lr)


def config(workers: int, micro: int, zero: int, mode: str = "cached") -> PretrainConfig:
    return load_config(PretrainConfig, "tiny", [
        f"train.num_workers={workers}", f"train.global_batch_size={GLOBAL}",
        f"train.micro_batch_size={micro}", f"deepspeed.zero_stage={zero}",
        f"train.contrastive_accumulation={mode}", "train.lr=1.0", "train.warmup_steps=0",
        "train.grad_clip=0", "train.weight_decay=0", "loss.beat=0", "data.lead_mask_prob=0",
        *SMALLER])


def build(cfg: PretrainConfig, dropout: bool) -> SGDRecipe:
    recipe = SGDRecipe(cfg)
    recipe.rank, recipe.world = dist.get_rank(), dist.get_world_size()
    recipe.device = torch.device("cpu")
    recipe.build_engine()
    recipe.loss_fn = recipe.build_loss()
    if not dropout:   # nn.Dropout modules, and the attention's dropout_p of SDPA
        for m in recipe.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            elif isinstance(getattr(m, "dropout", None), float):
                m.dropout = 0.0
    return recipe


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def one_step(workers: int, micro: int, zero: int, batch: dict, mode: str = "cached",
             dropout: bool = False) -> dict:
    """This rank's micro-batches of the 32 rows (rank-major, as the data shards deal them)
    through ``train_micro_batches``: the step's mean losses and the parameter update."""
    cfg = config(workers, micro, zero, mode)
    recipe = build(cfg, dropout)
    rows = GLOBAL // workers
    k = cfg.train.grad_accum
    group = [({key: v[recipe.rank * rows + i * micro: recipe.rank * rows + (i + 1) * micro]
               for key, v in batch.items()}, SEEDS[i]) for i in range(k)]
    before = flat_params(recipe.model)
    calls = [recipe.train_micro_batches(group)] if recipe.micro_batches_per_call() == k \
        else [recipe.train_micro_batches([g]) for g in group]
    logged = [losses for call in calls for losses in call]
    assert recipe.engine.global_steps == 1
    losses = {key: sum(d[key] for d in logged) / len(logged) for key in logged[0]}
    out = {"losses": losses, "update": flat_params(recipe.model) - before}
    recipe.engine.destroy()
    return out


def two_worker_runs(rank: int, port: int, folder: str, batch: dict) -> None:
    for key, value in (("RANK", str(rank)), ("LOCAL_RANK", str(rank)), ("WORLD_SIZE", "2"),
                       ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ[key] = value
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    # The one-big-batch step once (ZeRO-2): the reference of the split steps of both stages.
    results = {f"{micro}_z{zero}": one_step(2, micro, zero, batch)
               for micro, zero in ((16, 2), (4, 1), (4, 2))}
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def mean_over_ranks(ranks: list[dict], name: str) -> dict:
    losses = {key: sum(r[name]["losses"][key] for r in ranks) / len(ranks)
              for key in ranks[0][name]["losses"]}
    return {"losses": losses, "update": ranks[0][name]["update"]}


@pytest.fixture(scope="module")
def batch():
    """32 rows: distinct real reports of the bundled sample, random ECGs."""
    spec = stream_spec(config(1, 8, 2))
    reports = [r for r in read_database(bundled_root())["report"] if str(r).strip()][:GLOBAL]
    ecg = np.random.default_rng(0).normal(size=(GLOBAL, 12, spec.n_samples)).astype(np.float32)
    rows = finish_batch(ecg, reports, [[] for _ in reports], spec)
    return {key: torch.as_tensor(v) for key, v in rows.items()}


def assert_same_step(a: dict, b: dict) -> None:
    for key in ("rhythm", "token", "total"):
        assert a["losses"][key] == pytest.approx(b["losses"][key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(a["update"], b["update"], rtol=1e-4, atol=2e-6)


def test_cached_step_equals_one_big_batch_step(tmp_path, batch, monkeypatch):
    """(2 workers x 16, accum 1) == (2 x 4, accum 4) == (1 x 8, accum 4), the split steps
    under ZeRO 1 and 2."""
    # The spawned ranks unpickle ``two_worker_runs`` as tests.test_gradcache (pytest's
    # importlib mode) with this process's sys.path: the repository root must be on it.
    monkeypatch.syspath_prepend(str(REPO))
    mp.spawn(two_worker_runs, args=(free_port(), str(tmp_path), batch), nprocs=2, join=True)
    single_process_group()
    alone = {zero: one_step(1, 8, zero, batch) for zero in (1, 2)}
    # Without caching, 1 x 8 x 4 has 8 negatives per loss, not 32: another loss.
    per_micro = one_step(1, 8, 2, batch, mode="per_micro_batch")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Both ranks apply the same update (ZeRO gathers the stepped partitions).
    torch.testing.assert_close(ranks[0]["16_z2"]["update"], ranks[1]["16_z2"]["update"])
    big = mean_over_ranks(ranks, "16_z2")
    assert big["update"].abs().max() > 1e-4                # the step moved the weights
    for zero in (1, 2):
        assert_same_step(mean_over_ranks(ranks, f"4_z{zero}"), big)
        assert_same_step(alone[zero], big)
    assert abs(per_micro["losses"]["rhythm"] - big["losses"]["rhythm"]) > 1e-3


def test_cached_step_with_dropout_reuses_the_draws(batch):
    """Dropout on: the cached step equals the plain-torch gradient of the step's loss built
    from the very forwards of its micro-batches (same seeds), which only holds when the
    no-grad pass and the gradient pass draw the same dropout masks."""
    single_process_group()
    cached = one_step(1, 8, 2, batch, dropout=True)

    # The reference: a plain model (no DeepSpeed) with the same initial weights (train.seed).
    cfg = config(1, 8, 2)
    torch.manual_seed(cfg.train.seed)
    model = MELP(cfg.model).train()
    outs = []
    for i, seed in enumerate(SEEDS):
        micro = {key: v[i * 8:(i + 1) * 8] for key, v in batch.items()}
        torch.manual_seed(seed)     # lead masking is off: the ECG goes in as it is
        outs.append(model(micro["ecg"], micro["input_ids"], micro["attention_mask"],
                          micro["sentence_ids"]))
    joined = {key: torch.cat([o[key] for o in outs]) for key in ("ecg_emb", "text_emb", "labels")}
    rhythm = rhythm_loss(joined["ecg_emb"], joined["text_emb"], outs[0]["logit_scale"])
    count = joined["labels"].ne(-100).sum().float()
    token = sum(compute_losses(o, token_count=count, rhythm_value=rhythm)["token"] for o in outs)
    w = cfg.loss
    (w.rhythm * rhythm + w.token * token).backward()
    expected = -torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                           for p in model.parameters()])     # frozen ones: no update
    assert cached["losses"]["rhythm"] == pytest.approx(rhythm.item(), rel=1e-5)
    torch.testing.assert_close(cached["update"], expected, rtol=1e-4, atol=2e-6)
    # The dropout really draws: the same micro-batch, another seed, another embedding.
    torch.manual_seed(SEEDS[1])
    with torch.no_grad():
        again = model(*(batch[key][:8] for key in ("ecg", "input_ids", "attention_mask",
                                                   "sentence_ids")))
    assert (again["ecg_emb"] - outs[0]["ecg_emb"]).abs().max() > 1e-4


def test_contrastive_accumulation_is_validated_and_announced():
    """A bad mode is a config error; the start banner and summary.json say how many pairs
    one rhythm loss scores together (``test_resume_is_exact`` reads summary.json's)."""
    with pytest.raises(ConfigError, match="contrastive_accumulation"):
        load_config(PretrainConfig, "tiny", ["train.contrastive_accumulation=big"])
    cfg = load_config(PretrainConfig, "tiny", ["train.num_workers=2", "train.micro_batch_size=2",
                                               "train.global_batch_size=16"])
    assert cfg.train.contrastive_negatives == 16
    assert batch_banner(cfg) == (
        "[melp_ray] batch: 16 a step = 2 workers x micro-batch 2 x 4 accumulation steps; "
        "rhythm loss over 16 pairs at once (train.contrastive_accumulation=cached)")
    cfg.train.contrastive_accumulation = "per_micro_batch"
    assert cfg.train.contrastive_negatives == 4
    assert "over 4 pairs at once, 4 times a step" in batch_banner(cfg)
    assert contrastive_summary(cfg) == {"contrastive_accumulation": "per_micro_batch",
                                        "contrastive_negatives": 4}
