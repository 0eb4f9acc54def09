"""Stage 1 (cardiology text model): tokenizer training, MLM masking, a real 2-worker Ray Train
+ DeepSpeed MLM run, the exported Hugging Face folder, and stage 2 using that folder.

Real Ray, real DeepSpeed (ZeRO-2 and ZeRO-3), real tokenizers and transformers; no mocks.
"""
from __future__ import annotations

import math

import pytest
import torch

from melp_ray.config import PretrainConfig, load_config
from melp_ray.data.sources import bundled_root, scan_records, split_for_subject
from melp_ray.checkpoint import consolidated_state_dict
from melp_ray.pretrain_text import (IGNORE, TextPretrainConfig,
                                    mask_tokens, run)
from melp_ray.text.wordpiece import (ALPHABET, SPECIAL_TOKENS, nfc, save_tokenizer,
                                     train_wordpiece, unk_rate, words)


def bundled_reports() -> dict[str, list[str]]:
    """The bundled PTB-XL reports, split by subject exactly as the recipes split them."""
    out = {"train": [], "val": []}
    for ref in scan_records("ptb-xl", bundled_root()).refs:
        out[split_for_subject(ref.subject_id, 0.1, 0)].append(ref.report)
    return out


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def reports():
    return bundled_reports()


@pytest.fixture(scope="module")
def trained_tokenizer(reports, tmp_path_factory):
    """Trained on the train split, saved, and reloaded the way stage 2 will load it."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_tokenizer(train_wordpiece(reports["train"], vocab_size=8000, min_frequency=2), str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def test_tokenizer_round_trips_every_report(trained_tokenizer, reports):
    tok = trained_tokenizer
    texts = reports["train"] + reports["val"]
    assert len(texts) > 200
    for text in texts:
        decoded = tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
        # Exactly the normalised text, word-split by the pre-tokenizer (decoder spacing rules) ...
        assert decoded == tok.backend_tokenizer.decoder.decode(words(tok, text)), text
        # ... and, spaces aside, the lower-cased original: nothing lost, no accent stripped.
        assert decoded.replace(" ", "") == "".join(nfc(text).lower().split()), text


def test_tokenizer_keeps_german_and_swedish_letters(trained_tokenizer, reports):
    tok = trained_tokenizer
    sample = "Sinusrytm VÄNSTER el-axel. ÜBERDREHTER Linkstyp, fÖrÄndring, sÅsom vid ischämie."
    decoded = tok.decode(tok(sample)["input_ids"], skip_special_tokens=True)
    assert decoded == ("sinusrytm vänster el - axel. überdrehter linkstyp, förändring, "
                       "såsom vid ischämie.")
    assert "vänster" in tok.get_vocab()        # a frequent Swedish word became one token
    # Decomposed input (a + combining diaeresis) is composed before tokenising.
    assert tok.decode(tok(nfc("va\u0308nster"))["input_ids"], skip_special_tokens=True) == "vänster"
    # Held-out reports: no unknown tokens at all (the alphabet is in the vocabulary).
    assert unk_rate(tok, reports["val"]) == 0.0
    assert tok.convert_tokens_to_ids(["##" + c for c in "äöåü"]) != [tok.unk_token_id] * 4
    assert all(tok.convert_tokens_to_ids(c) != tok.unk_token_id for c in ALPHABET)


def test_tokenizer_has_what_stage_two_needs(trained_tokenizer):
    tok = trained_tokenizer
    assert type(tok).__name__ == "BertTokenizer"     # AutoTokenizer resolves the saved class
    for name in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token"):
        assert getattr(tok, name) in SPECIAL_TOKENS
    assert tok.convert_tokens_to_ids(".") != tok.unk_token_id     # sentence splitting needs '.'
    ids = tok("sinus rhythm. normal ecg.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert 200 < len(tok) <= 8000


# ---------------------------------------------------------------- masking

def test_mlm_masking_is_bert_style_and_seeded():
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (64, 128))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False            # [CLS] / [SEP] never predicted
    a_in, a_lab = mask_tokens(ids, maskable, 0.15, 4, 1000, torch.Generator().manual_seed(7))
    b_in, b_lab = mask_tokens(ids, maskable, 0.15, 4, 1000, torch.Generator().manual_seed(7))
    assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)  # same seed, same masks
    c_in, _ = mask_tokens(ids, maskable, 0.15, 4, 1000, torch.Generator().manual_seed(8))
    assert not torch.equal(a_in, c_in)

    selected = a_lab != IGNORE
    n = int(selected.sum())
    assert abs(n / int(maskable.sum()) - 0.15) < 0.01
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert torch.equal(a_lab[selected], ids[selected])            # labels = original tokens
    assert torch.equal(a_in[~selected], ids[~selected])           # unselected untouched
    masked = (a_in == 4) & selected
    kept = (a_in == ids) & selected
    assert abs(int(masked.sum()) / n - 0.8) < 0.03
    # 10% kept + the few random draws that hit the original token again
    assert abs(int(kept.sum()) / n - 0.1) < 0.03
    assert abs((n - int(masked.sum()) - int(kept.sum())) / n - 0.1) < 0.03


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
    from melp_ray.pretrain import run as pretrain_run
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
        f"run.storage_path={tmp_path}", "run.name=stage2"])
    summary = pretrain_run(cfg)
    assert summary["steps"] == 2
    assert all(math.isfinite(v) for v in summary["losses"].values())


def test_pretrained_init_continues_from_a_folder_under_zero3(scratch_run, ray_local, tmp_path):
    """text.init=pretrained from the stage-1 folder (weights and MLM head), ZeRO-3 export."""
    from transformers import AutoModelForMaskedLM

    folder = scratch_run["hf_text_model"]
    cfg = text_config(tmp_path, "continued", "text.init=pretrained", f"text.model={folder}",
                      "deepspeed.zero_stage=3", "train.max_steps=2", "train.checkpoint_every=2",
                      "train.warmup_steps=1")
    s = run(cfg, out=str(tmp_path / "hf_continued"))
    assert s["steps"] == 2 and s["zero_stage"] == 3 and s["text_init"] == "pretrained"
    # The same model on the same held-out masks: it starts where the first run ended.
    assert s["validation"]["initial_mlm_loss"] == pytest.approx(
        scratch_run["validation"]["mlm_loss"], abs=1e-4)
    # The ZeRO-3 checkpoint was consolidated into whole tensors and moved by two steps.
    before = AutoModelForMaskedLM.from_pretrained(folder)
    after = AutoModelForMaskedLM.from_pretrained(s["hf_text_model"])
    for name, p in after.named_parameters():
        assert p.shape == dict(before.named_parameters())[name].shape, name
    assert not torch.equal(after.bert.embeddings.word_embeddings.weight,
                           before.bert.embeddings.word_embeddings.weight)
