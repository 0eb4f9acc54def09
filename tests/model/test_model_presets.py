"""Parameter counts of the `paper` preset against the spec, and the pretrained MiniLM text tower."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from melp_ray.model import MELP, count_parameters, model_config_from_preset
from melp_ray.model.text_tower import TextTower
from melp_ray.text.models import resolve_text_model_path


BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)


@pytest.fixture(scope="module")
def paper_on_meta():
    """The full paper-size model on the meta device: shapes only, no memory, no init cost.

    The text tower gets heart_bert's shape (BERT-base: 12 layers, hidden 768), so the
    decoder and caption pooler have the reference's 768 width.
    """
    cfg = model_config_from_preset("paper", text_pretrained=False, text_overrides=BERT_BASE)
    with torch.device("meta"):
        return MELP(cfg)


def test_paper_preset_parameter_counts_match_the_spec(paper_on_meta):
    counts = count_parameters(paper_on_meta)
    print("paper preset parameter counts:", {k: f"{v / 1e6:.2f} M" for k, v in counts.items()})
    # Spec: ECG encoder + heads "about 65 M".
    ecg_side = counts["ecg_encoder"] + counts["beat_pooler"] + counts["caption_pooler"] \
        + sum(p.numel() for p in paper_on_meta.beat_proj.parameters())
    assert ecg_side == pytest.approx(65e6, rel=0.03)

    # Encoder geometry: 8 post-LN layers, width 768, 312 frames for 12 x 5000 samples.
    encoder = paper_on_meta.ecg_encoder
    assert len(encoder.layers) == 8 and encoder.width == 768
    assert encoder.layers[0].fc1.out_features == 3072
    assert encoder.feature_grad_mult == 0.1 and encoder.dropout_input.p == 0.1
    assert tuple(encoder.pos_conv.weight_v.shape) == (768, 768 // 16, 128)
    with torch.device("meta"):
        frames = encoder(torch.empty(2, 12, 5000, device="meta"))
    assert tuple(frames.shape) == (2, 312, 768)

    # Decoder: 6 layers of (self-attention block, cross-attention block), 768 wide, MLP x4.
    decoder = paper_on_meta.decoder
    assert len(decoder.resblocks) == len(decoder.cross_attn) == 6
    block = decoder.cross_attn[0]
    assert block.attn.embed_dim == 768 and block.attn.num_heads == 8
    assert block.mlp.c_fc.out_features == 4 * 768
    per_layer = sum(p.numel() for p in decoder.resblocks[0].parameters()) \
        + sum(p.numel() for p in block.parameters())
    assert per_layer == pytest.approx(24 * 768 ** 2, rel=0.01)  # 2 x (4 attention + 8 MLP) d^2
    assert tuple(decoder.text_projection.weight.shape) == (30523, 768)   # vocab + [BOS]

    # Poolers: 12 beat queries of width 256, 128 caption queries of width 768.
    assert tuple(paper_on_meta.beat_pooler.query.shape) == (12, 256)
    assert tuple(paper_on_meta.caption_pooler.query.shape) == (128, 768)
    assert paper_on_meta.beat_pooler.attn.num_heads == 8

    # Text tower: first 6 of 12 layers frozen, embeddings (with the [BOS] row) trainable.
    layers = paper_on_meta.text.backbone.encoder.layer
    assert [any(p.requires_grad for p in layer.parameters()) for layer in layers] == [False] * 6 + [True] * 6
    embeddings = paper_on_meta.text.backbone.embeddings
    assert embeddings.word_embeddings.weight.requires_grad
    assert embeddings.word_embeddings.num_embeddings == 30523


def test_paper_text_tower_loads_pretrained_minilm_from_the_local_folder():
    cfg = model_config_from_preset("paper")
    assert cfg.text_pretrained and cfg.text_model == "minilm"
    with pytest.warns(UserWarning, match="freezes all 6 layers"):
        tower = TextTower(cfg)  # the spec freezes 6 of BERT's 12; MiniLM has only 6
    assert tower.hidden_size == 384 and tower.backbone.config.is_decoder
    assert tower.report_head[0].in_features == 384 and tower.sentence_proj.in_features == 384
    # The weights really are the checkpoint's, not a random init.
    stored = load_file(f"{resolve_text_model_path('minilm')}/model.safetensors")
    key = next(k for k in stored if k.endswith("embeddings.word_embeddings.weight"))
    table = tower.backbone.embeddings.word_embeddings.weight
    assert table.shape[0] == stored[key].shape[0] + 1          # + the [BOS] row
    torch.testing.assert_close(table[:-1], stored[key])


def test_text_tower_hidden_size_comes_from_the_loaded_config():
    cfg = model_config_from_preset("tiny", text_overrides=dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96),
        text_frozen_layers=2)
    model = MELP(cfg)
    assert model.text.hidden_size == 48
    assert model.decoder.ln_final.normalized_shape == (48,)
    assert model.caption_pooler.query.shape[1] == 48
    assert model.text.report_head[0].in_features == 48
    assert count_parameters(model)["text_tower_trainable"] > 0


def test_small_preset_report_embeddings_differ_per_report_at_init():
    """The contrastive loss can only start learning if different reports embed differently.

    MiniLM's last-position ([CLS]) state, run causally, carries the report's content (mean
    pairwise cosine ~0.78 over these reports); a random-init tower (``tiny``) or MiniLM cut
    to its first 3 layers gives ~0.9999, and the rhythm loss then stays at ln(batch).
    """
    reports = ["sinus rhythm. normal ecg.", "sinusrhythmus linkstyp", "atrial fibrillation",
               "left bundle branch block", "sinusrhythmus normales ekg", "normal ecg"]
    torch.manual_seed(0)
    model = MELP(model_config_from_preset("small")).eval()
    assert len(model.tokenizer) < 2000          # the pruned report vocabulary (+ [BOS])
    with torch.no_grad():
        emb = model.encode_reports(reports)
    off_diagonal = ~torch.eye(len(reports), dtype=torch.bool)
    assert (emb @ emb.T)[off_diagonal].mean() < 0.95
