"""End-to-end pretraining: real Ray Train workers running real DeepSpeed engines on gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from console_noise import assert_console_is_quiet   # tests/fixtures
from ray_head import stop_group
from weights_fixture import assert_same_weights
from melp_ray.config import PretrainConfig
from melp_ray.config_sections import KEEP_FREED_MEMORY_ENV
from melp_ray.hub.checkpoint import consolidated_state_dict
from melp_ray.utils.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def local(path_or_uri: str) -> Path:
    """A run folder or checkpoint as a local path (the ZeRO-3 run lives behind file://)."""
    return Path(path_or_uri.removeprefix("file://"))


def metrics_of(summary: dict) -> list[dict]:
    path = local(summary["run_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(cfg: PretrainConfig, **kwargs) -> dict:
    from melp_ray.pretraining.run import run as pretrain_run

    return pretrain_run(cfg, **kwargs)


def run_in_process(cfg: PretrainConfig, **kwargs) -> dict:
    """The recipe with one worker in this process (``fit_in_process``): same data pipeline,
    DeepSpeed engine and checkpoints as a Ray Train worker, without starting one."""
    return run(cfg, in_process=True, **kwargs)


@pytest.fixture(scope="module")
def zero2_run(tiny_runs):
    """One uninterrupted 6-step ZeRO-2 run (conftest): the ZeRO, exact-resume and export
    tests share it."""
    return tiny_runs["zero2"][0]


# ---------------------------------------------------------------- configs fail before Ray

BAD_CONFIGS = {
    "unknown key": (["train.max_stepz=3"], "unknown config key"),
    "batch not divisible": (["train.global_batch_size=15"], "not divisible"),
    "zero stage 4": (["deepspeed.zero_stage=4"], "zero_stage must be 0, 1, 2 or 3"),
    "missing data root": (["data.root=/no/such/folder"], "does not exist"),
    "data root of unknown layout": (["data.root=docs"], "is not a known layout"),  # a real folder
    "bad type": (["train.max_steps=many"], "expected int"),
    "no prefetch": (["data.prefetch_batches=0"], "prefetch_batches >= 1"),
    # an elastic range: every world size in it must make the global batch (3 cannot make 32)
    "elastic range with an impossible split": (["train.num_workers=[2,4]"],
                                               "not divisible by 3 workers"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_fails_fast_without_touching_ray(case):
    overrides, message = BAD_CONFIGS[case]
    code = ("import sys; from melp_ray.pretrain import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_zero_shot_model_selection_on_unlabelled_data_fails_fast(tmp_path):
    """MIMIC-IV-ECG has no labels: selecting checkpoints by zero-shot AUROC is a config error
    before Ray starts, not a failure at the run's first validation."""
    from mimic_fixture import write_mimic_fixture

    root = write_mimic_fixture(tmp_path / "mimic", n_studies=3).root
    code = ("import sys; from melp_ray.pretrain import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, f"data.root={root}",
                           "train.checkpoint_metric=val/zeroshot_auroc"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "needs PTB-XL labels" in proc.stderr


# ---------------------------------------------------------------- ZeRO stages

def assert_trained(summary: dict, stage: int, world_size: int = 2) -> None:
    assert summary["steps"] == 6 and summary["world_size"] == world_size
    assert summary["zero_stage"] == stage
    logged = metrics_of(summary)
    assert [m["step"] for m in logged] == [2, 3, 4, 6]
    for m in logged:
        for k in ("loss/total", "loss/rhythm", "loss/token", "loss/beat", "lr",
                  "samples_per_s", "input_wait_frac", "logit_scale"):
            assert torch.isfinite(torch.tensor(m[k])), (k, m[k])
    assert logged[-1]["loss/token"] < logged[0]["loss/token"]
    assert logged[-1]["loss/total"] < logged[0]["loss/total"]
    assert {"val/recall_at_1", "val/recall_at_10", "val/loss_total"} <= set(logged[-1])
    assert local(summary["curves"]).read_bytes()[:4] == b"\x89PNG"   # curves.png, drawn at the end
    # Each recall is reported beside its chance level k / N (N validation pairs).
    val = summary["validation"]
    n_pairs = round(1 / val["recall_at_1_chance"])
    assert n_pairs >= 2 and val["recall_at_10_chance"] == min(10, n_pairs) / n_pairs
    checkpoint = local(summary["last_checkpoint"])
    assert checkpoint.name == "checkpoint_step_000006"     # named by step (Ray's: a timestamp)
    assert (checkpoint / "trainer_state.json").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 6
    state = consolidated_state_dict(str(checkpoint))   # fp32 weights from any stage
    assert "logit_scale" in state and all(torch.isfinite(v).all() for v in state.values())


def test_zero2_trains_checkpoints_and_summarises(zero2_run):
    assert_trained(zero2_run, 2)
    # The workers started with train.worker_env (glibc keeps freed memory, one arena).
    assert zero2_run["worker_env"] == KEEP_FREED_MEMORY_ENV
    summary_file = local(zero2_run["run_dir"]) / "summary.json"
    on_disk = json.loads(summary_file.read_text())
    assert on_disk["last_checkpoint"] == zero2_run["last_checkpoint"]
    assert set(on_disk["losses"]) >= {"rhythm", "token", "beat", "total"}
    assert on_disk["samples_per_s"] > 0


def test_zero3_trains_and_checkpoints_to_uri_storage(tiny_runs):
    assert_trained(tiny_runs["zero3"][0], 3)     # run.storage_path=file://... (conftest)


# ---------------------------------------------------------------- resume and faults

def _preemption_notice_recipe():
    """PretrainRecipe told from step 2 on, at every step of every attempt, that its node is
    being reclaimed: what ``ray.train.get_preemption_info`` returns once Ray Train's watcher
    sees the node drain (a spot reclaim), which no process on this machine can be given."""
    from ray.train import PreemptionInfo

    from melp_ray.pretraining.recipe import PretrainRecipe

    class PreemptionNotice(PretrainRecipe):
        def preemption_notice(self):
            if self.state.step < 2:
                return None
            return PreemptionInfo(deadline_ms=int(time.time() * 1000) + 30_000,
                                  preempted_node_to_ranks={"node-a": [0]})

    return PreemptionNotice


def test_zero1_trains_and_resumes_exactly(ray_local, tiny_cfg, tmp_path):
    """ZeRO-1 trains and checkpoints; stopped at step 3 and resumed to 6 == the uninterrupted
    6-step run (one worker, in process; ZeRO-2 across Ray Train restarts and two workers:
    ``tests/test_multinode.py``, a whole node lost mid-run).

    With gradient accumulation (2 micro-batches of 4 a step) and its default cached rhythm
    loss over the whole batch of 8 (#35). The interrupted run reads materialized datasets
    (``data.materialize``), the reference streams: caching the pipeline must change nothing
    either. And it is told of a preemption from step 2 on (``train.checkpoint_on_preemption``):
    each attempt checkpoints once at the first notice, changing nothing else.
    """
    one = ("train.num_workers=1", "train.micro_batch_size=4", "deepspeed.zero_stage=1")
    reference = run_in_process(tiny_cfg(tmp_path, "reference", *one))
    assert_trained(reference, 1, world_size=1)
    cached = (*one, "data.materialize=true")
    preempted = _preemption_notice_recipe()
    first = run_in_process(tiny_cfg(tmp_path, "resumed", *cached, "train.stop_at_step=3"),
                           recipe_cls=preempted)
    assert first["steps"] == 3
    second = run_in_process(tiny_cfg(tmp_path, "resumed", *cached), recipe_cls=preempted)
    assert second["steps"] == 6
    # Checkpoints every 3 steps, plus one at the first notice of each attempt (2 and 4); the
    # folders are named by step, so they sort in training order.
    folders = sorted(p.name for p in local(second["run_dir"]).glob("checkpoint_*") if p.is_dir())
    assert folders == [f"checkpoint_step_{s:06d}" for s in (2, 3, 4, 6)]
    for name in folders:
        state = json.loads((local(second["run_dir"]) / name / "trainer_state.json").read_text())
        assert state["step"] == int(name.rsplit("_", 1)[1])
    assert_same_weights(second["last_checkpoint"], reference["last_checkpoint"])
    # And the run did not start over: step 4 onwards was trained once, after the resume.
    steps = [m["step"] for m in metrics_of(second)]
    assert steps == [2, 3, 4, 6]
    assert metrics_of(second)[2]["resumed_from_step"] == 3
    written = json.loads((local(second["run_dir"]) / "summary.json").read_text())
    assert (written["contrastive_accumulation"], written["contrastive_negatives"]) == ("cached", 8)
    # Started again once finished (a Tune trial restored after its end): nothing is trained,
    # and the summary still holds the final checkpoint's losses and validation.
    again = run_in_process(tiny_cfg(tmp_path, "resumed", *cached))
    assert again["steps"] == 6 and len(metrics_of(again)) == 4
    assert again["validation"] == second["validation"] and "recall_at_10" in again["validation"]
    assert again["losses"] == second["losses"]


@pytest.fixture(scope="module")
def dealt_shards(tmp_path_factory, ray_local, bundled_ptbxl) -> Path:
    """Small shards (5 records each), so each epoch deals several files to each worker."""
    from melp_ray.data.prepare import PrepareSettings, prepare

    out = tmp_path_factory.mktemp("dealt") / "shards"
    prepare(PrepareSettings(dataset="ptb-xl", root=str(bundled_ptbxl), out=str(out),
                            sample_rate=100, shard_size=5, limit=50, val_fraction=0.2))
    return out


def test_resume_is_exact_when_each_epoch_deals_the_shards_anew(ray_local, tiny_cfg, tmp_path,
                                                                dealt_shards):
    """Streamed shards with ``data.reassign_shards`` (each epoch a new seeded deal of files
    to workers): stopped at step 3 and resumed == uninterrupted, across epoch boundaries.
    One worker, in process: each epoch still permutes which files come when."""
    args = (f"data.root={dealt_shards}", "data.limit=null", "train.max_steps=9",
            "train.val_every=9", "train.num_workers=1")
    reference = run_in_process(tiny_cfg(tmp_path, "dealt-reference", *args))
    assert len({m["epoch"] for m in metrics_of(reference)}) >= 2   # it crossed epochs
    first = run_in_process(tiny_cfg(tmp_path, "dealt", *args, "train.stop_at_step=3"))
    assert first["steps"] == 3
    second = run_in_process(tiny_cfg(tmp_path, "dealt", *args))
    assert second["steps"] == 9
    assert_same_weights(second["last_checkpoint"], reference["last_checkpoint"])


def _records_seen_recipe():
    """PretrainRecipe that appends, per rank, the epoch and the fingerprints of the records of
    every training micro-batch it consumes to ``seen_rank<r>.jsonl`` in the run folder."""
    from melp_ray.pretraining.recipe import PretrainRecipe
    from melp_ray.train.metrics import run_dir

    class RecordsSeen(PretrainRecipe):
        def micro_step(self, batch, seed=None):
            line = {"epoch": self.state.epoch, "ecg": fingerprints(batch["ecg"].cpu().numpy())}
            with open(os.path.join(run_dir(self.cfg), f"seen_rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
            return super().micro_step(batch, seed)

    return RecordsSeen


def fingerprints(ecg) -> list[str]:
    """One digest per model-ready record (its exact float32 bytes)."""
    import hashlib

    return [hashlib.sha1(row.tobytes()).hexdigest() for row in ecg]


def dealt_fingerprints(root: Path, world: int, rank: int, epoch: int, seed: int) -> list[str]:
    """What ``deal_rows`` gives ``rank`` in ``epoch``, read from the shard files here."""
    from melp_ray.data.rows import deal_rows, read_row_range, shard_files, shard_rows

    slices = deal_rows(shard_rows(shard_files(str(root), "train")), world, rank, epoch, seed)
    return [d for s in slices
            for d in fingerprints(normalised_ecg(read_row_range(s.path, s.start, s.stop, ["ecg"])))]


def normalised_ecg(rows) -> np.ndarray:
    """The model-ready signals of shard rows (a table with an ``ecg`` column)."""
    from melp_ray.data.records import minmax_normalise
    from melp_ray.data.shards import decode_ecg

    return minmax_normalise(np.stack([decode_ecg(b) for b in rows["ecg"].to_pylist()]))


# Nothing random in a step: no lead masking, no shuffle, no dropout (text tower: see below).
NO_RANDOMNESS = ["data.lead_mask_prob=0", "data.shuffle_buffer=0", "model.dropout=0.0",
                 "model.dropout_input=0.0", "model.attention_dropout=0.0"]


def deterministic_cfg(tiny_cfg, storage_path, name: str, *overrides: str) -> PretrainConfig:
    cfg = tiny_cfg(storage_path, name, *NO_RANDOMNESS, *overrides)
    cfg.model.text_overrides.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cfg


@pytest.fixture(scope="module")
def uneven_shards_run(ray_local, tiny_cfg, tmp_path_factory, make_shards) -> tuple[Path, PretrainConfig, dict]:
    """One real 2-worker Ray Train run on 3 train shard files of uneven sizes and a
    validation split of 1 record, nothing random in it, recording what each rank trained on
    (``seen_rank<r>.jsonl``): the dealing, validation and worker-count tests below share it."""
    tmp = tmp_path_factory.mktemp("uneven")
    root = make_shards(tmp / "shards", train=[10, 6, 8], val=[1])
    cfg = deterministic_cfg(tiny_cfg, tmp, "dealt-2", f"data.root={root}", "data.limit=null",
                            "train.max_steps=6", "train.val_every=3", "train.checkpoint_every=6",
                            "train.log_every=1")
    return root, cfg, run(cfg, recipe_cls=_records_seen_recipe())


def seen_by_rank_and_epoch(summary: dict) -> dict[tuple[int, int], list[list[str]]]:
    """(rank, epoch) -> the fingerprints of each micro-batch that rank trained on, in order."""
    seen = {(rank, epoch): [] for rank in (0, 1) for epoch in (0, 1)}
    for rank in (0, 1):
        for line in (local(summary["run_dir"]) / f"seen_rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            seen[rank, record["epoch"]].append(record["ecg"])
    return seen


def test_three_shards_two_workers_read_every_record_once_per_epoch_and_validate_one_record(
        uneven_shards_run):
    """3 train shard files of uneven sizes for 2 Ray Train workers: each epoch every record is
    trained on exactly once, each rank reading the rows ``deal_rows`` gives it; a validation
    split of 1 record (one rank has no row) still validates, over that one pair."""
    root, cfg, summary = uneven_shards_run
    assert summary["steps"] == 6 and summary["world_size"] == 2
    # 24 records, 12 a worker, 3 micro-batches of 4 a worker: steps 1-3 epoch 0, 4-6 epoch 1.
    seen = {key: [d for batch in batches for d in batch]
            for key, batches in seen_by_rank_and_epoch(summary).items()}
    everything = sorted(dealt_fingerprints(root, 1, 0, None, 0))
    assert len(set(everything)) == 24
    for epoch in (0, 1):
        assert sorted(seen[0, epoch] + seen[1, epoch]) == everything   # each record once
        for rank in (0, 1):
            assert sorted(seen[rank, epoch]) == sorted(
                dealt_fingerprints(root, 2, rank, epoch, cfg.train.seed))
    assert set(seen[0, 0]) != set(seen[0, 1])                          # dealt anew
    val = summary["validation"]
    assert val["recall_at_1_chance"] == 1.0 and val["recall_at_1"] == 1.0   # the one pair
    assert summary["data"]["train_records"] == 24 and summary["data"]["val_records"] == 1


def first_rows_dealt(root: Path, world: int, rank: int, seed: int, n: int):
    """The first ``n`` rows (every column) that ``deal_rows`` gives ``rank`` in epoch 0."""
    import pyarrow as pa

    from melp_ray.data.rows import deal_rows, read_row_range, shard_files, shard_rows

    tables = []
    for s in deal_rows(shard_rows(shard_files(str(root), "train")), world, rank, 0, seed):
        take = min(n - sum(t.num_rows for t in tables), s.stop - s.start)
        tables.append(read_row_range(s.path, s.start, s.start + take, None))
        if sum(t.num_rows for t in tables) == n:
            return pa.concat_tables(tables)
    raise AssertionError(f"rank {rank} was dealt fewer than {n} rows")


def write_one_shard_root(rows, like: Path, out: Path) -> Path:
    """A shards folder holding ``rows`` as its one train shard and ``like``'s validation."""
    import shutil

    from melp_ray.data import shards

    shards.write_shard(rows.to_pylist(), out / shards.shard_relpath("train", 0))
    manifest = json.loads((like / shards.MANIFEST_NAME).read_text())
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    for shard in val:
        (out / shard["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(like / shard["path"], out / shard["path"])
    manifest["shards"] = [{"path": shards.shard_relpath("train", 0), "split": "train",
                           "rows": rows.num_rows}, *val]
    manifest["splits"]["train"] = {"records": rows.num_rows, "shards": 1}
    (out / shards.MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def test_same_global_batch_same_first_loss_with_1_and_2_workers(uneven_shards_run, tiny_cfg,
                                                               tmp_path):
    """The global (gathered) contrastive loss and the captioning loss do not depend on how
    the global batch is split over workers (the beat loss is per worker by design): the
    first step of the 2-worker run against one worker, in this process, on exactly the 8
    records the two ranks trained on in that step."""
    import pyarrow as pa

    root, cfg, summary = uneven_shards_run
    per_rank = [first_rows_dealt(root, 2, rank, cfg.train.seed, 4) for rank in (0, 1)]
    step_one = [seen_by_rank_and_epoch(summary)[rank, 0][0] for rank in (0, 1)]
    for rows, seen in zip(per_rank, step_one):       # these are the rows of that first step
        assert fingerprints(normalised_ecg(rows)) == seen
    one_shard = write_one_shard_root(pa.concat_tables(per_rank), root, tmp_path / "step1")
    single = run_in_process(deterministic_cfg(
        tiny_cfg, tmp_path, "w1", f"data.root={one_shard}", "data.limit=null",
        "train.num_workers=1", "train.max_steps=1", "train.log_every=1", "train.val_every=0",
        "train.checkpoint_every=1"))
    first_single, first_pair = metrics_of(single)[0], metrics_of(summary)[0]
    assert first_single["step"] == first_pair["step"] == 1
    for key in ("loss/rhythm", "loss/token"):
        assert first_single[key] == pytest.approx(first_pair[key], rel=1e-4), key


# ---------------------------------------------------------------- ray job submit

@pytest.mark.slow
def test_ray_job_submit_against_a_running_head(tmp_path, fast_overrides):
    """`ray start --head` + `ray job submit -- python -m melp_ray.pretrain` writes summary.json,
    and the console it streams says only what matters (``console_noise``)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    bin_dir = Path(sys.executable).parent
    storage = tmp_path / "runs"
    # A head on a 2-core machine at load average ~20 has twice exited before the job was in
    # (CI: its dashboard dropped the upload, then refused connections): then one new head,
    # with the first one's end as a warning. A head that dies again fails the test.
    for attempt in (1, 2):
        head, address, log = start_head_with_dashboard(tmp_path / f"head{attempt}", env, bin_dir)
        try:
            job = submit_job(address, head, env, bin_dir, fast_overrides, storage)
            if job is not None:
                break
            died = head_diagnosis(head, log)
            if attempt == 2:
                pytest.fail(f"the Ray head exited before the job was submitted, twice:\n{died}")
            warnings.warn(f"Ray head exited before the job was submitted; starting another:\n{died}", stacklevel=1)
        finally:
            stop_head(head)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((storage / "job" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1   # one worker: the submission is under test
    assert "succeeded" in job.stdout.lower()
    # The job's console (the driver's and its workers' lines, as `ray job submit` streams
    # them): progress once per step, the end table, none of the libraries' chatter.
    lines = job.stdout.splitlines()
    assert sum("[melp_ray] step 1 " in line for line in lines) == 1, job.stdout[-6000:]
    assert_console_is_quiet(lines)


def start_head_with_dashboard(work: Path, env: dict, bin_dir: Path
                              ) -> tuple[subprocess.Popen, str, Path]:
    """`ray start --head --block` with a dashboard on free ports (other Ray instances on this
    machine, the test session's own, hold the defaults); returns it, its job address and
    the file its own output goes to."""
    work.mkdir(parents=True)
    dashboard, log = free_port(), work / "ray_start.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={free_port()}",
             "--num-cpus=2", "--include-dashboard=true", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--dashboard-host=127.0.0.1",
             f"--temp-dir={Path('/tmp') / f'melp_job_{os.getpid()}_{work.name}'}",
             "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address, head)
    except BaseException:
        stop_head(head)
        raise
    return head, address, log


def submit_job(address: str, head: subprocess.Popen, env: dict, bin_dir: Path,
               fast_overrides: list[str], storage: Path) -> subprocess.CompletedProcess | None:
    """`ray job submit -- python -m melp_ray.pretrain ...` until the head takes it (its job
    agent can come up a little after its dashboard); None if the head exited first."""
    submit = [str(bin_dir / "ray"), "job", "submit", f"--address={address}", "--working-dir",
              ".", "--", "python", "-m", "melp_ray.pretrain", *fast_overrides, "train.max_steps=2",
              "train.checkpoint_every=2", "train.val_every=2", "train.log_every=1",
              "train.num_workers=1", f"run.storage_path={storage}", "run.name=job"]
    for _ in range(30):
        job = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if "submitted successfully" in job.stdout:   # the job ran: its result is the test's
            return job
        if head.poll() is not None:
            return None
        if not any(sign in job.stderr for sign in TRANSIENT_SUBMIT_ERRORS):
            return job
        time.sleep(4)
    return job


def head_diagnosis(head: subprocess.Popen, log: Path) -> str:
    return f"`ray start` exit {head.poll()}; its output:\n{log.read_text()[-3000:]}"


def stop_head(head: subprocess.Popen) -> None:
    stop_group(head.pid)   # its own session: the group id is its pid
    head.wait()


TRANSIENT_SUBMIT_ERRORS = ("No available agent", "Connection aborted", "Connection refused")


def wait_for_dashboard(address: str, head: subprocess.Popen) -> None:
    """Until the head's job API answers (what `ray job list` asks, without a new Python
    process with Ray's imports every poll)."""
    deadline = time.time() + 120
    while time.time() < deadline and head.poll() is None:
        try:
            with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:   # not listening yet, or reset while it starts
            pass
        time.sleep(1)
    if head.poll() is None:
        raise TimeoutError(f"Ray head at {address} did not come up")
