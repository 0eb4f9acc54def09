"""Stage 1 (cardiology text model) end to end: a real 2-worker Ray Train + DeepSpeed MLM run,
the exported Hugging Face folder, a ZeRO-3 run that continues from it (in this process), and
stage 2 using that folder. The tokenizer and the masking have their own tests (tests/text/).

Real Ray, real DeepSpeed (ZeRO-2 and ZeRO-3), real tokenizers and transformers; no mocks.
"""
from __future__ import annotations

import math

import pytest
import torch

from melp_ray.config import PretrainConfig, load_config
from melp_ray.hub.checkpoint import consolidated_state_dict
from melp_ray.pretrain_text import run
from melp_ray.text_mlm.config import TextPretrainConfig


# ---------------------------------------------------------------- training runs

def text_config(storage, name, *overrides) -> TextPretrainConfig:
    return load_config(TextPretrainConfig, "text_tiny", [
        f"run.storage_path={storage}", f"run.name={name}", "run.max_failures=0",
        "train.max_steps=16", "train.val_every=0", "train.checkpoint_every=16",
        "train.log_every=8", "train.lr=2.0e-3", *overrides])


@pytest.fixture(scope="module")
def scratch_run(ray_local, tmp_path_factory):
    """A tiny BERT trained from scratch on 2 CPU workers (ZeRO-2), exported to a HF folder."""
    storage = tmp_path_factory.mktemp("text_runs")
    cfg = text_config(storage, "scratch")
    summary = run(cfg, out=str(storage / "hf_scratch"))
    return summary


def test_scratch_mlm_run_lowers_held_out_loss(scratch_run):
    s = scratch_run
    assert s["steps"] == 16 and s["world_size"] == 2 and s["text_init"] == "scratch"
    val = s["validation"]
    assert val["masked_tokens"] == val["initial_masked_tokens"] > 20  # same held-out masks
    # Untrained: about ln(vocab); trained for 16 steps: clearly lower, and it predicts tokens.
    assert abs(val["initial_mlm_loss"] - math.log(s["vocab_size"])) < 1.0
    assert val["mlm_loss"] < val["initial_mlm_loss"] - 0.3
    assert val["masked_accuracy"] > val["initial_masked_accuracy"]
    assert math.isfinite(s["losses"]["mlm"])


def test_exported_folder_loads_with_auto_classes(scratch_run):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    folder = scratch_run["hf_text_model"]
    encoder = AutoModel.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(encoder).__name__ == "BertModel" and len(tok) == scratch_run["vocab_size"]
    # The encoder holds the trained weights of the final checkpoint, not a fresh init.
    trained = consolidated_state_dict(scratch_run["last_checkpoint"])
    assert torch.equal(encoder.embeddings.word_embeddings.weight,
                       trained["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(encoder.encoder.layer[1].output.dense.weight,
                       trained["bert.encoder.layer.1.output.dense.weight"])
    # The MLM head is saved too, so the folder can be trained further (text.init=pretrained).
    mlm = AutoModelForMaskedLM.from_pretrained(folder)
    assert torch.equal(mlm.cls.predictions.transform.dense.weight,
                       trained["cls.predictions.transform.dense.weight"])


def test_stage_two_uses_the_exported_folder(scratch_run, ray_local, tmp_path):
    from melp_ray.model.config import model_config_from_preset
    from melp_ray.model.text_tower import TextTower
    from melp_ray.pretraining.run import run as pretrain_run
    from transformers import AutoModel

    folder = scratch_run["hf_text_model"]
    # The text tower of the tiny MELP preset loads these weights (no shape override needed).
    tower = TextTower(model_config_from_preset("tiny", text_model=folder, text_pretrained=True))
    exported = AutoModel.from_pretrained(folder).embeddings.word_embeddings.weight
    loaded = tower.backbone.embeddings.word_embeddings.weight
    # Every exported row is loaded; the report tokenizer's added [BOS] is the one new row.
    assert loaded.shape[0] == tower.vocab_size == exported.shape[0] + 1
    assert torch.equal(loaded[: exported.shape[0]], exported)
    assert tower.backbone.config.is_decoder       # run causally, as stage 2 does

    cfg = load_config(PretrainConfig, "tiny", [
        f"model.text_model={folder}", "model.text_pretrained=true", "train.max_steps=2",
        "train.val_every=0", "train.checkpoint_every=2", "data.limit=64", "run.max_failures=0",
        "train.num_workers=1", f"run.storage_path={tmp_path}", "run.name=stage2"])
    summary = pretrain_run(cfg, in_process=True)     # one worker, in this process
    assert summary["steps"] == 2
    assert all(math.isfinite(v) for v in summary["losses"].values())


def test_pretrained_init_continues_from_a_folder_under_zero3(scratch_run, ray_local, tmp_path):
    """text.init=pretrained from the stage-1 folder (weights and MLM head), ZeRO-3 export.
    One worker in this process (``in_process``): the scratch run above is the Ray Train one."""
    from transformers import AutoModelForMaskedLM

    folder = scratch_run["hf_text_model"]
    cfg = text_config(tmp_path, "continued", "text.init=pretrained", f"text.model={folder}",
                      "deepspeed.zero_stage=3", "train.max_steps=2", "train.checkpoint_every=2",
                      "train.warmup_steps=1", "train.num_workers=1")
    s = run(cfg, out=str(tmp_path / "hf_continued"), in_process=True)
    assert s["steps"] == 2 and s["zero_stage"] == 3 and s["text_init"] == "pretrained"
    # It starts where the first run ended: on held-out masks of its own (one worker deals
    # and masks them unlike two), the trained level, not the untrained one (~ln(vocab)).
    val, scratch_val = s["validation"], scratch_run["validation"]
    assert val["initial_mlm_loss"] < scratch_val["initial_mlm_loss"] - 0.3
    assert val["initial_masked_accuracy"] > scratch_val["initial_masked_accuracy"]
    # The ZeRO-3 checkpoint was consolidated into whole tensors and moved by two steps of
    # about lr each: nowhere near as far as a fresh init would be from the trained weights.
    before = AutoModelForMaskedLM.from_pretrained(folder)
    after = AutoModelForMaskedLM.from_pretrained(s["hf_text_model"])
    for name, p in after.named_parameters():
        assert p.shape == dict(before.named_parameters())[name].shape, name
    moved = (after.bert.embeddings.word_embeddings.weight
             - before.bert.embeddings.word_embeddings.weight).abs().max().item()
    assert 0 < moved < 5 * 2 * cfg.train.lr, moved
