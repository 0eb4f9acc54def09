"""Importing the official MELP weights: reference-layout tensors -> our MELP, strictly.

The reference state dicts are built here from the reference code's names and shapes
(HKU-MedAI/MELP's MELPModel / ECGFMModel / MultimodalTransformer, fairseq-signals'
Wav2Vec2-CMSC; heart_bert as transformers' BertLMHeadModel), with random values.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from melp_ray.convert import main
from melp_ray.hub.convert import build_model
from melp_ray.hub.reference_files import ConversionError, ReferenceWeights, read_reference

WORDS = ["sinus", "rhythm", "normal", "ecg", "left", "axis", "deviation", "atrial",
         "fibrillation", "block", "bundle", "branch", "right", "ventricular", "##s", "rate"]

PAPER = dict(conv_layers=4, channels=256, width=768, layers=8, ffn=3072, pos_kernel=128,
             pos_groups=16, beat_queries=12, beat_width=256, embed_dim=256,
             caption_queries=128, text_hidden=768, text_layers=12, text_heads=12,
             text_ffn=3072, decoder_layers=6)
SMALL = dict(conv_layers=2, channels=32, width=128, layers=2, ffn=256, pos_kernel=16,
             pos_groups=4, beat_queries=4, beat_width=32, embed_dim=32, caption_queries=8,
             text_hidden=64, text_layers=2, text_heads=4, text_ffn=128, decoder_layers=2)
MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
BACKBONE = "ecg_encoder.ecg_encoder."


# ---------------------------------------------------------------- reference-layout fixtures

def write_text_folder(folder: Path, s: dict) -> Path:
    """A BERT config of the given size + a WordPiece vocabulary (the --text-model folder)."""
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(folder)
    BertConfig(vocab_size=len(WORDS) + 6, hidden_size=s["text_hidden"],
               num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
               intermediate_size=s["text_ffn"], max_position_embeddings=128).save_pretrained(folder)
    return folder


def _mha(prefix: str, width: int, context: int) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention's parameter names, as the reference's AttentionalPooler and
    open_clip blocks hold them."""
    return {prefix + k: v for k, v in nn.MultiheadAttention(width, 8 if width % 8 == 0 else 4,
                                                            kdim=context, vdim=context,
                                                            batch_first=True).state_dict().items()}


def _ln(prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {prefix + "weight": 1 + 0.1 * torch.randn(width), prefix + "bias": 0.1 * torch.randn(width)}


def _linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict[str, torch.Tensor]:
    out = {prefix + "weight": torch.randn(n_out, n_in) / n_in ** 0.5}
    if bias:
        out[prefix + "bias"] = 0.1 * torch.randn(n_out)
    return out


def ecgfm_state(s: dict) -> dict[str, torch.Tensor]:
    """The reference's ECG-FM wrapper (ECGFMModel), keys as in the full model."""
    c, w, b = s["channels"], s["width"], BACKBONE
    st: dict[str, torch.Tensor] = {}
    for i in range(s["conv_layers"]):
        st[f"{b}feature_extractor.conv_layers.{i}.0.weight"] = torch.randn(c, 12 if i == 0 else c, 2) / 4
    st.update(_ln(f"{b}feature_extractor.conv_layers.0.2.", c))      # GroupNorm after a Dropout
    st.update(_ln(f"{b}layer_norm.", c))
    st.update(_linear(f"{b}post_extract_proj.", c, w))
    pos = f"{b}conv_pos.pos_conv.0."
    st[pos + "bias"] = 0.1 * torch.randn(w)
    st[pos + "parametrizations.weight.original0"] = 1 + torch.rand(1, 1, s["pos_kernel"])
    st[pos + "parametrizations.weight.original1"] = torch.randn(w, w // s["pos_groups"], s["pos_kernel"])
    st.update(_ln(f"{b}encoder.layer_norm.", w))
    for layer in range(s["layers"]):
        p = f"{b}encoder.layers.{layer}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            st.update(_linear(f"{p}self_attn.{proj}.", w, w))
        st.update(_ln(p + "self_attn_layer_norm.", w))
        st.update(_linear(p + "fc1.", w, s["ffn"]))
        st.update(_linear(p + "fc2.", s["ffn"], w))
        st.update(_ln(p + "final_layer_norm.", w))
    # ECG-FM pretraining parts MELP never uses.
    st[b + "mask_emb"] = torch.rand(w)
    st[b + "quantizer.vars"] = torch.rand(1, 640, 128)
    st.update(_linear(b + "quantizer.weight_proj.", c, 640))
    st.update(_linear(b + "project_q.", 256, 256))
    st.update(_linear(b + "final_proj.", w, 256))
    st["ecg_encoder.logit_scale"] = torch.tensor(2.0)
    st["ecg_encoder.bn.running_mean"] = torch.zeros(768)
    st["ecg_encoder.bn.running_var"] = torch.ones(768)
    st["ecg_encoder.bn.num_batches_tracked"] = torch.tensor(5)
    # Poolers and heads.
    st["ecg_encoder.attn_pool_contrast.query"] = torch.randn(s["beat_queries"], s["beat_width"])
    st.update(_mha("ecg_encoder.attn_pool_contrast.attn.", s["beat_width"], w))
    st.update(_ln("ecg_encoder.attn_pool_contrast.ln_q.", s["beat_width"]))
    st.update(_ln("ecg_encoder.attn_pool_contrast.ln_k.", w))
    st.update(_ln("ecg_encoder.ln_contrast.", s["beat_width"]))
    st["ecg_encoder.proj_contrast"] = torch.randn(s["beat_width"], s["embed_dim"]) / 16
    st["ecg_encoder.attn_pool_caption.query"] = torch.randn(s["caption_queries"], s["text_hidden"])
    st.update(_mha("ecg_encoder.attn_pool_caption.attn.", s["text_hidden"], w))
    st.update(_ln("ecg_encoder.attn_pool_caption.ln_q.", s["text_hidden"]))
    st.update(_ln("ecg_encoder.attn_pool_caption.ln_k.", w))
    st.update(_ln("ecg_encoder.ln_caption.", s["text_hidden"]))
    return st


def melp_state(s: dict, text_folder: Path) -> dict[str, torch.Tensor]:
    """The full reference MELPModel: ECG-FM + heart_bert (with the [BOS] row) + heads + decoder."""
    from transformers import BertConfig, BertLMHeadModel

    rows = len(WORDS) + 6 + 1                       # heart_bert's vocabulary + [BOS]
    h = s["text_hidden"]
    config = BertConfig.from_pretrained(text_folder, vocab_size=rows, is_decoder=True)
    st = ecgfm_state(s)
    st.update({"lm_model." + k: v for k, v in BertLMHeadModel(config).state_dict().items()})
    st.update(_linear("proj_t.0.", h, s["embed_dim"]))
    st.update(_linear("proj_t.2.", s["embed_dim"], s["embed_dim"]))
    st.update(_linear("sent_proj.", h, s["embed_dim"]))
    for layer in range(s["decoder_layers"]):
        for block in ("resblocks", "cross_attn"):
            p = f"text_decoder.{block}.{layer}."
            st.update(_ln(p + "ln_1.", h))
            st.update({p + "attn." + k: v for k, v in
                       nn.MultiheadAttention(h, 8 if h % 8 == 0 else 4, batch_first=True).state_dict().items()})
            if block == "cross_attn":
                st.update(_ln(p + "ln_1_kv.", h))
            st.update(_ln(p + "ln_2.", h))
            st.update(_linear(p + "mlp.c_fc.", h, 4 * h))
            st.update(_linear(p + "mlp.c_proj.", 4 * h, h))
    st.update(_ln("text_decoder.ln_final.", h))
    st["text_decoder.text_projection"] = torch.randn(h, rows) / h ** 0.5
    st["logit_scale"] = torch.tensor(np.log(1 / 0.07), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in st.items()}


def write_lightning_ckpt(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """As Lightning saves it: the state dict beside epoch/step and hyper-parameters that
    hold a numpy scalar (the reference's init_logit_scale = np.log(1 / 0.07))."""
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
                "state_dict": state,
                "hyper_parameters": {"lr": 2e-4, "init_logit_scale": np.log(1 / 0.07),
                                     "text_encoder_name": "fuyingw/heart_bert"}}, path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small reference-layout checkpoint, its text folder and its conversion."""
    tmp = tmp_path_factory.mktemp("convert_small")
    text = write_text_folder(tmp / "heart_bert", SMALL)
    state = melp_state(SMALL, text)
    ckpt = write_lightning_ckpt(tmp / "melp.ckpt", state)
    out = tmp / "converted"
    assert main(["--reference", str(ckpt), "--text-model", str(text), "--out", str(out),
                 "--set", "ecg_heads=4"]) == 0
    return {"tmp": tmp, "text": text, "state": state, "ckpt": ckpt, "out": out}


def _convert_error(capsys, ckpt: Path, text: Path, out: Path) -> str:
    assert main(["--reference", str(ckpt), "--text-model", str(text), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


# ---------------------------------------------------------------- the full checkpoint

@pytest.mark.slow   # a 235 M-parameter reference state dict and model (minutes on 2 CPUs)
def test_paper_size_checkpoint_fills_every_key_strictly(tmp_path):
    text = write_text_folder(tmp_path / "heart_bert", PAPER)
    ref = ReferenceWeights("lightning", "paper-in-memory", melp_state(PAPER, text))
    model, filled, vocabulary = build_model(ref, str(text), {}, seed=0)

    assert filled == sorted(model.state_dict())                    # every key of ours
    cfg = model.cfg
    assert (cfg.ecg_width, cfg.ecg_layers, cfg.ecg_heads, cfg.ecg_ffn, cfg.conv_layers,
            cfg.num_beat_queries, cfg.num_caption_queries, cfg.decoder_layers,
            cfg.text_frozen_layers) == (768, 8, 12, 3072, 4, 12, 128, 6, 6)
    from melp_ray.hub.reference_weights import matching_preset
    assert matching_preset(cfg) == "paper"
    assert vocabulary == {"embedding_rows": len(WORDS) + 7, "bos_row": len(WORDS) + 6}
    ours = model.state_dict()
    assert torch.equal(ours["ecg_encoder.feature_extractor.conv_layers.0.1.weight"],
                       ref.state[BACKBONE + "feature_extractor.conv_layers.0.2.weight"])
    assert torch.equal(ours["text.backbone.encoder.layer.11.output.dense.weight"],
                       ref.state["lm_model.bert.encoder.layer.11.output.dense.weight"])
    assert torch.equal(ours["logit_scale"], ref.state["logit_scale"].reshape(1))


def test_small_checkpoint_converts_to_a_loadable_export_folder(small):
    from melp_ray.hub.checkpoint import is_exported_folder, load_model

    out = small["out"]
    assert is_exported_folder(str(out))
    record = json.loads((out / "conversion.json").read_text())
    assert record["kind"] == "lightning" and record["source"] == str(small["ckpt"])
    assert record["parts_from_our_init"] == []
    assert "text" in record["parts_from_reference"] and "decoder" in record["parts_from_reference"]
    assert record["lead_permutation"]["our_channel_from_reference_channel"] == \
        [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]
    assert "lm_model.cls.predictions.transform.dense.weight" in record["unused_reference_keys"]
    model = load_model(str(out))
    assert model.cfg.ecg_heads == 4 and model.cfg.ecg_width == SMALL["width"]
    assert record["keys_mapped"] == len(model.state_dict())
    ref = small["state"]
    ours = model.state_dict()
    assert torch.equal(ours["decoder.text_projection.weight"], ref["text_decoder.text_projection"].T)
    assert torch.equal(ours["text.backbone.embeddings.word_embeddings.weight"],
                       ref["lm_model.bert.embeddings.word_embeddings.weight"])
    # The [BOS] row is the last row in both, and our tokenizer puts [BOS] there.
    assert model.tokenizer.bos_token_id == ref["lm_model.bert.embeddings.word_embeddings.weight"].shape[0] - 1


def test_canonical_leads_give_the_reference_output_of_mimic_ordered_leads(small):
    from melp_ray.hub.checkpoint import load_model

    model = load_model(str(small["out"]))
    reference_conv = small["state"][BACKBONE + "feature_extractor.conv_layers.0.0.weight"]
    torch.manual_seed(1)
    canonical = torch.rand(3, 12, 512)
    from melp_ray.data.leads import LEADS
    mimic = canonical[:, [LEADS.index(name) for name in MIMIC_ORDER]]

    # The first conv, computed the reference's way from its own tensor on MIMIC order.
    ours = model.ecg_encoder.feature_extractor.conv_layers[0][0](canonical)
    assert torch.allclose(ours, F.conv1d(mimic, reference_conv, stride=2), atol=1e-5)

    # Whole embeddings: the same model with the reference's (unpermuted) first conv, fed
    # MIMIC order, gives our embedding of canonical order; fed canonical order, it does not.
    with torch.no_grad():
        expected = model.encode_ecg(canonical)
        model.ecg_encoder.feature_extractor.conv_layers[0][0].weight.copy_(reference_conv)
        assert torch.allclose(model.encode_ecg(mimic), expected, atol=1e-5)
        assert not torch.allclose(model.encode_ecg(canonical), expected, atol=1e-3)


def test_transposed_reference_matrices_act_as_the_reference_uses_them(small):
    from melp_ray.hub.checkpoint import load_model

    model = load_model(str(small["out"]))
    ref = small["state"]
    x = torch.randn(2, 5, SMALL["beat_width"])
    with torch.no_grad():
        assert torch.allclose(model.beat_proj(x), x @ ref["ecg_encoder.proj_contrast"], atol=1e-5)
        h = torch.randn(2, 5, SMALL["text_hidden"])
        assert torch.allclose(model.decoder.text_projection(h), h @ ref["text_decoder.text_projection"],
                              atol=1e-5)


def test_leftover_reference_key_is_named(small, tmp_path, capsys):
    state = dict(small["state"], **{BACKBONE + "encoder.extra_norm.weight": torch.ones(4)})
    ckpt = write_lightning_ckpt(tmp_path / "extra.ckpt", state)
    err = _convert_error(capsys, ckpt, small["text"], tmp_path / "out")
    assert "'ecg_encoder.ecg_encoder.encoder.extra_norm.weight'" in err and "maps to nothing" in err


def test_wrong_shape_is_named(small, tmp_path, capsys):
    key = BACKBONE + "encoder.layers.1.fc1.weight"
    state = dict(small["state"], **{key: torch.zeros(SMALL["ffn"] + 1, SMALL["width"])})
    ckpt = write_lightning_ckpt(tmp_path / "shape.ckpt", state)
    err = _convert_error(capsys, ckpt, small["text"], tmp_path / "out")
    assert "shape mismatch" in err and repr(key) in err and "ecg_encoder.layers.1.fc1.weight" in err


def test_missing_reference_key_is_named(small, tmp_path, capsys):
    state = {k: v for k, v in small["state"].items() if k != "sent_proj.bias"}
    ckpt = write_lightning_ckpt(tmp_path / "missing.ckpt", state)
    err = _convert_error(capsys, ckpt, small["text"], tmp_path / "out")
    assert "'text.sentence_proj.bias'" in err and "'sent_proj.bias' is missing" in err


def test_embedding_table_without_the_bos_row_is_refused(small, tmp_path, capsys):
    state = dict(small["state"])
    for key in ("lm_model.bert.embeddings.word_embeddings.weight",
                "lm_model.cls.predictions.decoder.weight"):
        state[key] = state[key][:-1]
    ckpt = write_lightning_ckpt(tmp_path / "nobos.ckpt", state)
    err = _convert_error(capsys, ckpt, small["text"], tmp_path / "out")
    assert "vocabulary mismatch" in err and "[BOS]" in err


def test_checkpoint_needing_unsafe_unpickling_is_refused(small, tmp_path, capsys):
    ckpt = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": small["state"], "saved_at": datetime.datetime(2025, 1, 1)}, ckpt)
    err = _convert_error(capsys, ckpt, small["text"], tmp_path / "out")
    assert "weights_only=True" in err and "datetime" in err


def as_numpy1_pickle(ckpt: Path) -> Path:
    """Rewrite a torch.save zip so its pickle names numpy's scalar as numpy 1 did
    (``numpy.core.multiarray.scalar``; numpy 2 writes ``numpy._core``): what a checkpoint
    saved by the reference code under numpy 1 holds."""
    import zipfile

    with zipfile.ZipFile(ckpt) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    renamed = ckpt.with_name("numpy1-" + ckpt.name)
    with zipfile.ZipFile(renamed, "w", zipfile.ZIP_STORED) as zout:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert b"cnumpy._core.multiarray\nscalar\n" in data   # protocol 2: GLOBAL by text
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            zout.writestr(info, data)
    return renamed


def test_lightning_checkpoint_pickled_under_numpy1_converts(small, tmp_path):
    """The numpy scalar in ``hyper_parameters`` under its numpy-1 module path is allowed
    (exactly the numpy globals, still weights_only=True), and converts to the same model."""
    from melp_ray.hub.checkpoint import load_model

    ckpt = as_numpy1_pickle(small["ckpt"])
    out = tmp_path / "converted"
    assert main(["--reference", str(ckpt), "--text-model", str(small["text"]), "--out", str(out),
                 "--set", "ecg_heads=4"]) == 0
    ours, expected = load_model(str(out)).state_dict(), load_model(str(small["out"])).state_dict()
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_missing_reference_path_exits_2(small, tmp_path, capsys):
    err = _convert_error(capsys, tmp_path / "nothing.ckpt", small["text"], tmp_path / "out")
    assert "no such file or folder" in err


# ---------------------------------------------------------------- the encoder-only folder

def test_melp_encoder_folder_converts_the_ecg_side(tmp_path):
    from safetensors.torch import save_file

    from melp_ray.hub.checkpoint import load_model
    from melp_ray.hub.reference_weights import ECG_PARTS

    folder = tmp_path / "MELP_Encoder"
    folder.mkdir()
    state = ecgfm_state(SMALL)
    # Published in bf16, named as the ECG-FM wrapper names its tensors.
    save_file({k[len("ecg_encoder."):]: v.to(torch.bfloat16) if v.is_floating_point() else v
               for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"encoder_attention_heads": 4}))
    text = write_text_folder(tmp_path / "bert", SMALL)
    out = tmp_path / "converted"
    assert main(["--reference", str(folder), "--text-model", str(text), "--out", str(out)]) == 0

    record = json.loads((out / "conversion.json").read_text())
    assert record["kind"] == "encoder"
    assert record["parts_from_reference"] == sorted(ECG_PARTS)
    assert record["parts_from_our_init"] == ["decoder", "logit_scale", "text"]
    model = load_model(str(out))
    assert model.cfg.ecg_heads == 4
    ours = model.state_dict()
    bf16 = state[BACKBONE + "encoder.layers.1.fc2.weight"].to(torch.bfloat16).float()
    assert torch.equal(ours["ecg_encoder.layers.1.fc2.weight"], bf16)
    conv = state[BACKBONE + "feature_extractor.conv_layers.0.0.weight"].to(torch.bfloat16).float()
    assert torch.equal(ours["ecg_encoder.feature_extractor.conv_layers.0.0.weight"][:, 4], conv[:, 5])


def test_encoder_folder_with_a_text_model_of_another_width_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tmp_path / "MELP_Encoder"
    folder.mkdir()
    save_file({k[len("ecg_encoder."):]: v for k, v in ecgfm_state(SMALL).items()},
              folder / "model.safetensors")
    text = write_text_folder(tmp_path / "bert", dict(SMALL, text_hidden=48, text_heads=4))
    err = _convert_error(capsys, folder, text, tmp_path / "out")
    assert "caption pooler" in err


def test_reading_the_encoder_folder_strips_a_wrapper_prefix(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "MELP_Encoder"
    folder.mkdir()
    state = ecgfm_state(SMALL)
    save_file({"model." + k[len("ecg_encoder."):]: v for k, v in state.items()},
              folder / "model.safetensors")
    ref = read_reference(str(folder))
    assert ref.prefix == "model." and set(ref.state) == set(state)
    with pytest.raises(ConversionError, match="no such file or folder"):
        read_reference(str(tmp_path / "absent"))


# ---------------------------------------------------------------- continuing from it

def test_converted_folder_is_an_init_from_source_for_a_run_of_its_sizes(small):
    from melp_ray.config import ConfigError, PretrainConfig, load_config
    from melp_ray.train.init_from import check_init_from

    out = small["out"]
    sizes = ["model.conv_layers=2", "model.conv_channels=32", "model.ecg_width=128",
             "model.ecg_layers=2", "model.ecg_ffn=256", "model.pos_conv_kernel=16",
             "model.pos_conv_groups=4", "model.num_beat_queries=4", "model.beat_width=32",
             "model.embed_dim=32", "model.num_caption_queries=8", "model.decoder_layers=2",
             f"model.text_model={out}/text_model", "model.text_pretrained=false"]
    # As README shows it: the paper config, the converted text tower, init_from.
    cfg = load_config(PretrainConfig, "paper", [*sizes, "model.ecg_heads=4"])
    check_init_from(str(out), cfg.model)
    other = load_config(PretrainConfig, "paper", [*sizes, "model.ecg_heads=2"])
    with pytest.raises(ConfigError, match=r"model\.ecg_heads: 2 != 4"):
        check_init_from(str(out), other.model)


def test_legacy_weight_norm_names_are_read(small):
    """Older torch saves the positional conv's weight norm as weight_g / weight_v."""
    state = dict(small["state"])
    pos = BACKBONE + "conv_pos.pos_conv.0."
    state[pos + "weight_g"] = state.pop(pos + "parametrizations.weight.original0")
    state[pos + "weight_v"] = state.pop(pos + "parametrizations.weight.original1")
    model, filled, _ = build_model(ReferenceWeights("lightning", "legacy", state),
                                   str(small["text"]), {"ecg_heads": 4}, seed=0)
    assert filled == sorted(model.state_dict())
    assert torch.equal(model.state_dict()["ecg_encoder.pos_conv.weight_v"], state[pos + "weight_v"])
