"""Shared test fixtures: one real local Ray instance per session, the data roots, and the
real tiny pretraining runs and checkpoints that several test files use."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

import ray_head   # tests/fixtures (pyproject's pythonpath)

# Set before ray/deepspeed are imported anywhere in the test session.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Three pytest processes and their Ray workers share CI's 2 cores: a second intra-op thread
# only spins waiting for a core (tests/model + gradcache: 171 -> 132 CPU-s at -n 3). Ray's
# workers, the benchmarks' subprocesses and torch in this process inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ray Train's controller polls its workers every 2 s (Ray's default), so it noticed the end of
# each of the session's tiny runs up to 2 s late. A poll that gets no answer in time is
# waited on in the next one (a worker only counts as hung after 10 minutes), so polling every
# 0.5 s only shortens that delay, for four times as many (tiny) poll calls.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray keeps at most one idle worker process per CPU (2 here) and ends the rest a second after
# they go idle, so every Ray Data pipeline (each split, rank and run) started new task
# workers, each importing torch and transformers again (~5 CPU-s apiece). Keeping up to 8 lets
# the session's runs (and the CLI runs, which inherit this environment) reuse them. The
# preemption watcher (an actor per Ray Train run) has nothing to watch on one machine; the CLI
# turns it off the same way (utils.ray_connect.init_ray).
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A raylet waits a fixed time for its dashboard agent's port file and aborts after that
# ("Timed out waiting for file ...dashboard_agent_listen_port"): seen for the `ray start
# --head` of the job-submission test with the suite's processes busy. Wait up to 2 min.
os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
# Ray starts its worker processes at nice 15. Here they share 2 cores with the other pytest
# processes (nice 0, training in-process), which then take ~96 % of a contended core: a
# multi-node run's workers got 4 % of a core each and did not finish in 10 minutes (CI; the
# same with two busy loops beside it here). At nice 0 every test's work gets a fair share.
os.environ.setdefault("RAY_worker_niceness", "0")

# Ray's local instances use token authentication, with a token that the first `ray.init` of
# a machine writes to ~/.ray/auth_token when there is none. On a fresh machine (CI) both
# pytest-xdist processes start their instance at the same moment: each may write its own
# token, and a process started later (a CLI or benchmark run attaching to that instance)
# reads the other one. One token per pytest process, in the environment that its Ray
# instances and subprocesses inherit, leaves nothing to race on.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex)

# Dummy credentials for the local S3 server of tests/data/test_data_object_store.py. Ray
# workers keep the environment of the moment Ray started, so the session's workers get them
# here; a test sets them in its own process with monkeypatch. No test talks to real S3.
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# Session fixtures cheap enough for each pytest-xdist worker to build its own.
CHEAP_SHARED_FIXTURES = {"ray_local", "bundled_ptbxl", "shared_ptbxl", "fast_overrides",
                         "tiny_cfg", "s3_test_credentials", "make_shards", "challenge_root",
                         "code15_root", "tmp_path_factory", "worker_id", "testrun_uid"}


# tryfirst: pytest-xdist's own hook reads the xdist_group markers, so they must be set before.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test that needs the session's Ray instance (itself or through a fixture that
    trains with it) is marked ``slow``, like the ones marked by hand (subprocess runs,
    benchmark smokes, plain training loops); every other test is ``unit``, so
    ``pytest -m unit`` (the same as ``-m "not slow"``) is the quick suite."""
    for item in items:
        if "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
    group_tests_that_share_costly_fixtures(items)


def group_tests_that_share_costly_fixtures(items) -> None:
    """``pytest -n 3`` (pyproject's addopts) runs tests on three worker processes
    (``--dist loadgroup``): tests that share a module- or session-scoped fixture that trains
    or prepares something go to the same worker (one ``xdist_group``), so each such fixture
    is still built once per run. Connected through any shared fixture (union-find)."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    keys_of = {}
    for item in items:
        keys = []
        for name in item.fixturenames:
            defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
            scope = defs[-1].scope if defs else "function"
            if scope == "module":
                keys.append(f"{item.nodeid.split('::')[0]}::{name}")
            elif scope == "session" and name not in CHEAP_SHARED_FIXTURES:
                keys.append(name)
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
        keys_of[item] = keys
    for item, keys in keys_of.items():
        if keys:
            item.add_marker(pytest.mark.xdist_group(root(keys[0])))


def pytest_configure(config):
    # The first pytest process of a run (pytest-xdist's controller, or pytest with -n 0)
    # owns the run's shared Ray head (tests/fixtures/ray_head.py); its workers inherit that.
    config.owns_ray_head = ray_head.claim_run_dir()


def pytest_unconfigure(config):
    if getattr(config, "owns_ray_head", False):
        ray_head.stop_head()


@pytest.fixture(scope="session")
def ray_local():
    """The test run's one real Ray instance (2 CPUs per pytest-xdist process: what each
    sizes its work for), shared by every test of every process that needs one. Its
    processes keep the environment of the moment it started (the settings above, and the
    S3 credentials only for them): no runtime_env, which costs each worker start ~1 s."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.head_address(S3_TEST_CREDENTIALS), configure_logging=False)
    yield ray
    # Attached, not owned: the run's owner stops the head at the end (pytest_unconfigure).


@pytest.fixture(scope="session")
def bundled_ptbxl() -> Path:
    """The PTB-XL sample shipped inside the package (always present)."""
    from melp_ray.data.sources import bundled_root

    return Path(bundled_root())


@pytest.fixture(scope="session")
def shared_ptbxl() -> Path:
    """The larger ../shared/data/ptb-xl set when the checkout has it, else the bundled one."""
    root = SHARED_DATA / "ptb-xl"
    if root.is_dir():
        return root
    from melp_ray.data.sources import bundled_root

    return Path(bundled_root())


# ---------------------------------------------------------------- tiny pretraining runs

# Small and quick: 96 bundled records, global batch 8 (4 per worker), a handful of steps.
FAST = ["data.limit=96", "data.val_fraction=0.2", "data.shuffle_buffer=16",
        "train.global_batch_size=8", "train.max_steps=6", "train.warmup_steps=1", "train.lr=1e-3",
        "train.log_every=2", "train.val_every=6", "train.val_batches=2",
        "train.checkpoint_every=3", "run.max_failures=0"]
LIVE_WEIGHTS = "live_weights.safetensors"


@pytest.fixture(scope="session")
def fast_overrides() -> list[str]:
    """The tiny config's overrides for a 6-step, 96-record run (``FAST``)."""
    return list(FAST)


@pytest.fixture(scope="session")
def tiny_cfg():
    """``tiny_cfg(storage_path, name, *overrides)``: the tiny config with ``FAST`` applied."""
    from melp_ray.config import PretrainConfig, load_config

    def make(storage_path, name: str, *overrides: str):
        return load_config(PretrainConfig, "tiny", [*FAST, f"run.storage_path={storage_path}",
                                                     f"run.name={name}", *overrides])
    return make


def _live_weights_recipe():
    """PretrainRecipe that also writes the final *live* weights beside the run (rank 0):
    gathered from the DeepSpeed engine on every rank, not read from the checkpoint files,
    so weights rebuilt from a checkpoint can be checked against an independent source."""
    from melp_ray.utils import storage
    from melp_ray.pretraining.recipe import PretrainRecipe

    class LiveWeightsRecipe(PretrainRecipe):
        def finish(self):
            import os
            import tempfile

            from safetensors.torch import save_file
            from melp_ray.hub.checkpoint import gathered_state_dict
            from melp_ray.train.metrics import run_dir

            state = gathered_state_dict(self.engine.module)   # collective: every rank
            if self.rank == 0:
                fs, path = storage.filesystem_and_path(storage.join(run_dir(self.cfg), LIVE_WEIGHTS))
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, LIVE_WEIGHTS)
                    save_file({k: v.contiguous() for k, v in state.items()}, local)
                    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
                        dst.write(src.read())
            return super().finish()

    return LiveWeightsRecipe


@pytest.fixture(scope="session")
def tiny_runs(ray_local, tiny_cfg, tmp_path_factory) -> dict:
    """Two real 6-step pretraining runs (2 workers, ``FAST``), shared by the pretraining,
    resume and export tests: ``"zero2"`` into a local folder, ``"zero3"`` into a
    ``file://`` URI (it goes through ``pyarrow.fs.FileSystem.from_uri`` exactly like
    ``s3://``/``gs://``, with the local disk standing in for the bucket).
    Each value is ``(summary, live_weights)``; ``"bucket"`` is the URI's local folder."""
    from safetensors.torch import load_file
    from melp_ray.utils import storage
    from melp_ray.pretraining.run import run

    bucket = tmp_path_factory.mktemp("bucket")
    out = {"bucket": bucket}
    for key, storage_path, stage in (("zero2", tmp_path_factory.mktemp("runs_local"), 2),
                                     ("zero3", f"file://{bucket}/melp", 3)):
        cfg = tiny_cfg(storage_path, f"tiny-{key}", f"deepspeed.zero_stage={stage}")
        summary = run(cfg, recipe_cls=_live_weights_recipe())
        fs, path = storage.filesystem_and_path(storage.join(summary["run_dir"], LIVE_WEIGHTS))
        local = tmp_path_factory.mktemp(f"live_{key}") / LIVE_WEIGHTS
        with fs.open_input_stream(path) as src:
            local.write_bytes(src.read())
        out[key] = (summary, load_file(str(local)))
    return out


# ---------------------------------------------------------------- evaluation

@pytest.fixture(scope="session")
def tiny_checkpoint(ray_local, tmp_path_factory) -> str:
    """A real 30-step tiny pretraining checkpoint (96 bundled records, one worker), shared by
    tests/test_evaluate.py and the evaluation library tests in tests/eval/."""
    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.pretraining.run import run

    tmp = tmp_path_factory.mktemp("eval_run")
    summary = run(load_config(PretrainConfig, "tiny", [
        "data.limit=96", "data.val_fraction=0.2", "train.global_batch_size=8",
        "train.max_steps=30", "train.val_every=30", "train.checkpoint_every=30",
        "train.log_every=10", "train.num_workers=1", f"run.storage_path={tmp}", "run.name=eval"]),
        in_process=True)   # one worker in this process: the checkpoint is what matters here
    return summary["last_checkpoint"]


@pytest.fixture
def config_only_export(tmp_path) -> Path:
    """A folder that ``checkpoint_info`` takes for an export (config.json, model_type melp_ray)
    at 100 Hz, 10 s. It has no weights: only for ``build_plan``, which reads none."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "melp_ray", "sample_rate": 100, "seconds": 10, "melp": {}}))
    return folder


def _challenge_writer():
    """The Challenge-format writer of tests/eval/test_eval_physionet.py (MAT v4 + .hea)."""
    import importlib.util

    path = Path(__file__).parent / "eval" / "test_eval_physionet.py"
    spec = importlib.util.spec_from_file_location("_physionet_fixture_writer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# PTB-XL statement -> the SNOMED code a Challenge release uses for it.
SNOMED_OF_SCP = {"NORM": "426783006", "AFIB": "164889003", "CRBBB": "713427006",
                 "CLBBB": "733534002", "1AVB": "270492004", "PVC": "427172004",
                 "PAC": "284470004", "STD_": "429622005", "STE_": "164931005",
                 "SR": "426783006", "STACH": "427084000", "SBRAD": "426177001",
                 "LAFB": "445118002", "IRBBB": "713426002", "LVH": "164873001"}


@pytest.fixture(scope="session")
def challenge_root(tmp_path_factory, bundled_ptbxl):
    """60 real PTB-XL waveforms in the Challenge layout, Dx from their SCP codes, plus one
    too-short and one all-zero record that must be rejected and named."""
    import numpy as np

    from melp_ray.data.ptbxl import parse_scp_codes, read_database

    writer = _challenge_writer()
    root = tmp_path_factory.mktemp("challenge")
    (root / "g1").mkdir()
    database = read_database(bundled_ptbxl).head(60)
    for row in database.to_dict("records"):
        ecg_id = int(row["ecg_id"])
        adc, _, fs = writer._ptbxl_adc(bundled_ptbxl, ecg_id)
        codes = sorted({SNOMED_OF_SCP[c] for c in parse_scp_codes(row["scp_codes"])
                        if c in SNOMED_OF_SCP}) or ["164934002"]  # T wave abnormal
        writer._write_challenge_record(root / "g1", f"A{ecg_id:04d}", adc, fs,
                                       ["#Age: 60", "#Sex: Male", f"#Dx: {','.join(codes)}"])
    adc, _, fs = writer._ptbxl_adc(bundled_ptbxl, int(database["ecg_id"].iloc[0]))
    writer._write_challenge_record(root / "g1", "SHORT", adc[:, :500], fs,
                                   ["#Dx: 426783006"])  # 5 s < the model's 10 s
    writer._write_challenge_record(root / "g1", "ZERO", np.zeros_like(adc), fs,
                                   ["#Dx: 426783006"])  # every lead flat
    return root


@pytest.fixture(scope="session")
def code15_root(tmp_path_factory, bundled_ptbxl) -> dict:
    """A CODE-15% root (tests/fixtures/code15_fixture.py): 12 real exams, a NaN and an
    all-zero exam to be rejected by name, two exams of a part not downloaded."""
    from code15_fixture import write_code15

    return write_code15(tmp_path_factory.mktemp("code15"), bundled_ptbxl)


@pytest.fixture(scope="session")
def s3_test_credentials() -> dict[str, str]:
    """The dummy credentials the session's Ray workers have (``S3_TEST_CREDENTIALS``)."""
    return dict(S3_TEST_CREDENTIALS)


# ---------------------------------------------------------------- hand-made shard folders

@pytest.fixture(scope="session")
def make_shards(bundled_ptbxl):
    """``make_shards(out, train=[16, 16], val=[1])``: a prepared-shards folder, written
    without Ray from the bundled records (100 Hz): one shard file per number, that many
    rows each, train rows first, no record twice. Returns ``out``."""
    from melp_ray.data import shards
    from melp_ray.data.records import load_signal
    from melp_ray.data.sources import list_records

    refs = list_records("ptb-xl", str(bundled_ptbxl), sample_rate=100)

    def make(out: Path, train: list[int], val: list[int]) -> Path:
        listed, at = [], 0
        for split, sizes in (("train", train), ("val", val)):
            for index, size in enumerate(sizes):
                rows = [shards.shard_row(ref, split, load_signal(ref, str(bundled_ptbxl), 100, 10))
                        for ref in refs[at:at + size]]
                at += size
                shards.write_shard(rows, out / shards.shard_relpath(split, index))
                listed.append({"path": shards.shard_relpath(split, index), "split": split,
                               "rows": size})
        splits = {s: {"records": sum(x["rows"] for x in listed if x["split"] == s),
                      "shards": sum(x["split"] == s for x in listed)} for s in shards.SPLITS}
        manifest = {"dataset": "ptb-xl", "sample_rate": 100, "seconds": 10, "n_samples": 1000,
                    "ecg_encoding": "float32", "shards": listed, "splits": splits}
        (out / shards.MANIFEST_NAME).write_text(json.dumps(manifest))
        return out
    return make
