"""train.init_from: a fresh run that starts from another model's weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from melp_ray.config import ConfigError, PretrainConfig, load_config
from melp_ray.train.init_from import check_init_from

INITIAL_WEIGHTS = "initial_weights.safetensors"


def tiny_model_config(*overrides: str):
    return load_config(PretrainConfig, "tiny", list(overrides)).model


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """An export folder of a tiny MELP initialised with another seed than any run's."""
    from melp_ray.hub.hf import MELPHFModel
    from melp_ray.model import MELP

    out = tmp_path_factory.mktemp("init_from") / "exported"
    torch.manual_seed(123)
    MELPHFModel.from_melp(MELP(tiny_model_config()), sample_rate=100, seconds=10.0).save_pretrained(out)
    return out


def test_matching_model_config_passes_and_training_behaviour_may_differ(tiny_export):
    check_init_from(str(tiny_export), tiny_model_config())
    check_init_from(str(tiny_export), tiny_model_config("model.dropout=0.3",
                                                        "model.text_frozen_layers=0"))
    check_init_from(None, tiny_model_config())


def test_other_sizes_are_named_before_ray(tiny_export):
    with pytest.raises(ConfigError, match=r"model\.ecg_layers: 3 != 2") as err:
        check_init_from(str(tiny_export), tiny_model_config("model.ecg_layers=3"))
    assert "model.embed_dim" not in str(err.value)
    with pytest.raises(ConfigError, match="text model vocabulary_size"):
        check_init_from(str(tiny_export), tiny_model_config("model.text_model=minilm-reports"))


def test_missing_source_fails_in_the_config_checks(tmp_path, capsys):
    from melp_ray.pretrain import main

    with pytest.raises(ConfigError, match="does not exist"):
        check_init_from(str(tmp_path / "absent"), tiny_model_config())
    with pytest.raises(ConfigError, match="not a training checkpoint, run folder or export"):
        check_init_from(str(tmp_path), tiny_model_config())
    # The CLI stops there with exit code 2, before any Ray resource is asked for.
    assert main(["--config", "tiny", f"train.init_from={tmp_path / 'absent'}"]) == 2
    assert "train.init_from" in capsys.readouterr().err


def test_text_stage_refuses_init_from():
    from melp_ray.text_mlm.config import TextPretrainConfig

    with pytest.raises(ConfigError, match="train.init_from is for ECG-language pretraining"):
        load_config(TextPretrainConfig, "text_tiny", ["train.init_from=/somewhere"])


def _initial_weights_recipe():
    """PretrainRecipe that writes the weights the engine holds before its first step."""
    from melp_ray.utils import storage
    from melp_ray.pretraining.recipe import PretrainRecipe

    class InitialWeightsRecipe(PretrainRecipe):
        def setup(self):
            super().setup()
            from safetensors.torch import save_file

            from melp_ray.hub.checkpoint import gathered_state_dict
            from melp_ray.train.metrics import run_dir

            state = gathered_state_dict(self.engine.module)   # collective: every rank
            if self.rank == 0:
                _, path = storage.filesystem_and_path(storage.join(run_dir(self.cfg), INITIAL_WEIGHTS))
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in state.items()}, path)

    return InitialWeightsRecipe


def test_run_starts_from_the_export_weights_with_a_fresh_step(ray_local, tiny_cfg, tmp_path,
                                                               tiny_export):
    from safetensors.torch import load_file

    from melp_ray.hub.checkpoint import load_model
    from melp_ray.model import MELP
    from melp_ray.pretraining.run import run

    # One step: only the weights before it are checked.
    cfg = tiny_cfg(tmp_path, "init-from", "train.max_steps=1", "train.val_every=1",
                   "train.checkpoint_every=1", "train.num_workers=1",
                   f"train.init_from={tiny_export}")
    summary = run(cfg, recipe_cls=_initial_weights_recipe(), in_process=True)

    assert summary["init_from"] == str(tiny_export) and summary["steps"] == 1
    initial = load_file(str(Path(summary["run_dir"]) / INITIAL_WEIGHTS))
    source = load_model(str(tiny_export)).state_dict()
    assert set(initial) == set(source)
    for name, tensor in source.items():
        assert torch.equal(initial[name], tensor), name
    # Without init_from the run would have started elsewhere (its own seed's init).
    torch.manual_seed(cfg.train.seed)
    fresh = MELP(cfg.model).state_dict()
    assert not torch.equal(fresh["ecg_encoder.layers.0.fc1.weight"],
                           source["ecg_encoder.layers.0.fc1.weight"])
