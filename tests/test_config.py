"""Typed configs: YAML + key=value overrides, type coercion, validation before anything runs."""
from __future__ import annotations

import pytest

from melp_ray.config import ConfigError, PretrainConfig, load_config


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 7\n  lr: 1e-3\ndata:\n  prefetch_batches: 2\n")
    cfg = load_config(PretrainConfig, path, ["train.max_steps=9"])
    assert cfg.train.max_steps == 9                 # the override wins over the file
    assert cfg.train.lr == pytest.approx(1e-3)      # YAML 1.1 reads "1e-3" as a string
    assert cfg.data.prefetch_batches == 2


@pytest.mark.parametrize("text, expected", [("50000000", 50_000_000), ("5e7", 50_000_000)])
def test_whole_numbers_written_in_e_notation_are_ints(text, expected):
    cfg = load_config(PretrainConfig, "tiny", [f"deepspeed.reduce_bucket_size={text}"])
    assert cfg.deepspeed.reduce_bucket_size == expected
    assert type(cfg.deepspeed.reduce_bucket_size) is int


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=2.5", "expected int"),
    ("train.max_steps=8.0", "expected int"),       # a float is never silently an int
    ("train.max_steps=2.5e0", "expected int"),
    ("train.max_steps=many", "expected int"),
    ("train.use_gpu=maybe", "expected bool"),
    ("train.max_stepz=3", "unknown config key"),
    ("data.prefetch_batches=0", "prefetch_batches >= 1"),
    ("data.shuffle_buffer=-1", "shuffle_buffer must be >= 0"),
    ("deepspeed.reduce_bucket_size=1000", "reduce_bucket_size must be >= 1e6"),
    ("train", "not of the form key=value"),
    ("train.precision=bf16", "needs train.use_gpu=true"),
    ("train.checkpoint_metric=zeroshot_auroc", "must name a validation metric"),
    ("train.checkpoint_mode=best", "checkpoint_mode must be max or min"),
    ("train.checkpoint_upload=later", "checkpoint_upload must be async or sync"),
    ("train.checkpoint_on_preemption=maybe", "expected bool"),
    ("train.early_stop_patience=3", "needs train.checkpoint_metric"),
    ("train.early_stop_patience=-1", "early_stop_patience must be >= 0"),
    ("deepspeed.offload_param=true", "offload_param needs deepspeed.zero_stage=3"),
    ('train.worker_resources={"GPU":1}', "GPU=1: a custom resource"),
    ('train.worker_resources={"gpu_stand_in":0}', "gpu_stand_in=0: a custom resource with an amount > 0"),
    ("train.elastic_resize_interval_s=-1", "elastic_resize_interval_s must be >= 0"),
    ('train.worker_env={"OMP_NUM_THREADS":2}', "OMP_NUM_THREADS=2: a variable name and a string"),
    ("deepspeed.offload_optimizer=true deepspeed.zero_stage=0", "needs deepspeed.zero_stage >= 1"),
    ("deepspeed.contiguous_gradients=maybe", "expected bool"),
    ("deepspeed.contiguous_gradients=false deepspeed.zero_stage=3", "contiguous_gradients=false needs"),
    ("deepspeed.contiguous_gradients=false deepspeed.offload_optimizer=true", "without offload_optimizer"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "tiny", override.split())


def test_deepspeed_config_carries_our_settings():
    from melp_ray.train.deepspeed_config import deepspeed_config

    cfg = load_config(PretrainConfig, "tiny", ["deepspeed.zero_stage=3", "train.use_gpu=true",
                                               "deepspeed.reduce_bucket_size=2e7"])
    ds = deepspeed_config(cfg.train, cfg.deepspeed)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 20_000_000
    assert "contiguous_gradients" not in ds["zero_optimization"]   # ZeRO-3: DeepSpeed's own
    paper = load_config(PretrainConfig, "paper", [])      # paper.yaml: no copy per gradient
    assert deepspeed_config(paper.train, paper.deepspeed)["zero_optimization"][
        "contiguous_gradients"] is False
    assert ds["bf16"]["enabled"] is True            # precision "auto" on GPUs
    cpu = load_config(PretrainConfig, "tiny", [])
    assert deepspeed_config(cpu.train, cpu.deepspeed)["bf16"]["enabled"] is False
    assert ds["train_batch_size"] == (cfg.train.micro_batch_size * cfg.train.grad_accum
                                      * cfg.train.num_workers)


def test_per_parameter_gradient_checks_are_dropped_only_where_nothing_reads_them():
    from melp_ray.train.deepspeed_config import deepspeed_config

    def zero_and_bf16(*overrides):
        cfg = load_config(PretrainConfig, "tiny", ["train.use_gpu=true", *overrides])
        ds = deepspeed_config(cfg.train, cfg.deepspeed)
        return ds["zero_optimization"], ds["bf16"]

    zero, bf16 = zero_and_bf16("train.grad_clip=0")
    assert zero["compute_grad_norm"] is False and bf16["check_grad_overflow"] is False
    zero, bf16 = zero_and_bf16("train.grad_clip=1.0", "deepspeed.check_grad_overflow=true")
    assert "compute_grad_norm" not in zero and bf16["check_grad_overflow"] is True
    zero, _ = zero_and_bf16("train.grad_clip=0", "deepspeed.zero_stage=3")   # DeepSpeed: 1-2 only
    assert "compute_grad_norm" not in zero
    with pytest.raises(ConfigError, match="train.compile needs deepspeed.zero_stage"):
        load_config(PretrainConfig, "tiny", ["train.compile=true", "deepspeed.zero_stage=3"])


def test_exclude_folds_defaults_to_none_and_takes_a_list():
    assert load_config(PretrainConfig, "tiny").data.exclude_folds == []
    assert load_config(PretrainConfig, "tiny", ["data.exclude_folds=[8, 9]"]).data.exclude_folds == [8, 9]


@pytest.mark.parametrize("value, message", [
    ("[0]", r"exclude_folds must list fold numbers \(ints >= 1\), got \[0\]"),
    ("[-1, 8]", r"got \[-1\]"),
    ("[eight]", "exclude_folds: expected int"),
    ("[8.5]", "exclude_folds: expected int"),
    ("8", "exclude_folds: expected a list"),
])
def test_bad_exclude_folds_are_named(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "tiny", [f"data.exclude_folds={value}"])


def test_configs_load_without_transformers_and_hf_registers_the_auto_classes():
    """Every Ray process that unpickles a config imports melp_ray: transformers (seconds) must
    not come with it; ``import melp_ray.hub.hf`` is what registers model_type "melp_ray"."""
    import subprocess
    import sys

    code = ("import sys; from melp_ray.config import PretrainConfig, load_config; "
            "load_config(PretrainConfig, 'small'); print('transformers' in sys.modules); "
            "import melp_ray.hub.hf; from transformers import AutoConfig; "
            "print(type(AutoConfig.for_model('melp_ray')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "MELPHFConfig"]


@pytest.mark.parametrize("typed", ["off", "on", "yes", "no", "007", "1.10", "True"])
def test_string_keys_keep_the_text_as_typed(tmp_path, typed):
    # YAML 1.1 reads off/yes/007/1.10 as bool/int/float; a str key keeps what the user typed
    assert load_config(PretrainConfig, "tiny", [f"run.name={typed}"]).run.name == typed
    path = tmp_path / "run.yaml"
    path.write_text(f"run:\n  name: {typed}\n  wandb: yes\n")
    cfg = load_config(PretrainConfig, path)
    assert cfg.run.name == typed
    assert cfg.run.wandb is True                    # bool keys still read YAML 1.1 booleans


# ---------------------------------------------------------------- elastic runs (#34)

def test_num_workers_range_is_elastic_and_derives_the_split_per_world():
    cfg = load_config(PretrainConfig, "tiny", ["train.num_workers=[1,4]", "train.global_batch_size=24",
                                               "train.micro_batch_size=2"])
    t = cfg.train
    assert t.elastic and t.worker_range == (1, 4)
    # micro-batch x grad_accum x workers is the global batch at every count of the range
    assert [(w, t.at_world(w).grad_accum) for w in (1, 2, 3, 4)] == [(1, 12), (2, 6), (3, 4), (4, 3)]
    auto = load_config(PretrainConfig, "tiny", ["train.num_workers=[2,4]", "train.global_batch_size=24"])
    assert auto.train.micro_batch_size is None        # global / world at each (re)start
    assert [auto.train.at_world(w).micro_batch_size for w in (2, 3, 4)] == [12, 8, 6]
    with pytest.raises(ValueError, match="outside"):
        auto.train.at_world(5)
    fixed = load_config(PretrainConfig, "tiny", ["train.num_workers=[3,3]", "train.global_batch_size=24"])
    assert fixed.train.num_workers == 3 and not fixed.train.elastic and fixed.train.grad_accum == 1


@pytest.mark.parametrize("overrides, message", [
    # 3 workers cannot make 16: every count of the range is checked
    (["train.num_workers=[2,4]", "train.global_batch_size=16"],
     r"global_batch_size=16 is not divisible by 3 workers \(within train.num_workers=\[2, 4\]\)"),
    (["train.num_workers=[1,3]", "train.global_batch_size=12", "train.micro_batch_size=4"],
     r"micro-batch 4 x 2 workers \(within train.num_workers=\[1, 3\]\) does not divide it"),
    (["train.num_workers=[4,2]"], r"needs 1 <= min <= max"),
    (["train.num_workers=[0,2]"], r"needs 1 <= min <= max"),
    (["train.num_workers=[1,2,3]"], "expected a list of 2 values"),
    (["train.num_workers=0"], "num_workers must be >= 1"),
])
def test_impossible_worker_ranges_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "tiny", overrides)


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage=3 cannot resize"),
    (["deepspeed.offload_optimizer=true"], "offload_optimizer is not supported"),
    (["data.materialize=true"], "add data.materialize=false"),
])
def test_what_cannot_resize_is_a_config_error_with_a_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "tiny", ["train.num_workers=[1,2]", *overrides])
    load_config(PretrainConfig, "tiny", ["train.num_workers=2", *overrides])   # fixed: fine


def test_elastic_ranges_are_for_pretraining_runs_only():
    from melp_ray.text_mlm.config import TextPretrainConfig

    with pytest.raises(ConfigError, match="pretraining only"):
        load_config(TextPretrainConfig, "text_tiny", ["train.num_workers=[1,2]"])
