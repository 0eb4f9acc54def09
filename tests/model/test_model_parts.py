"""Shapes, dtypes, causality, freezing and gradient coverage of the tiny MELP model."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from melp_ray.text import report_ids
from melp_ray.model.losses import compute_losses
from melp_ray.model import MELP, count_parameters, model_config_from_preset
from melp_ray.model.ecg_encoder import ConvPositionalEmbedding, ECGEncoder
from melp_ray.model.layers import MultiheadAttention
from melp_ray.model.pooler import AttentionalPooler
from melp_ray.model import text_tower
from melp_ray.model.text_tower import TEXT_WIDTH_MULTIPLE, text_columns, transformer_layers

REPORTS = [
    "sinus rhythm. normal ecg.",
    "sinus bradycardia. left axis deviation. otherwise normal.",
    "atrial fibrillation with rapid ventricular response.",
    "",  # a report with no sentence at all
    "sinus tachycardia. st depression in v5 v6.",
    "left bundle branch block",
    "pacemaker rhythm. no further analysis.",
    "abnormal t waves. possible inferior infarct, age undetermined.",
]


@pytest.fixture(scope="module")
def cfg():
    return model_config_from_preset("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return MELP(cfg)


@pytest.fixture(scope="module")
def batch(cfg, model):
    arrays = report_ids.encode_reports(model.tokenizer, REPORTS, cfg.max_text_length)
    torch.manual_seed(1)
    return {"ecg": torch.rand(len(REPORTS), 12, 1000),
            **{k: torch.from_numpy(v) for k, v in arrays.items()}}


def test_forward_output_shapes_and_dtypes(cfg, model, batch):
    model.train()
    out = model(**batch)
    b, length = batch["input_ids"].shape
    d, k = cfg.embed_dim, cfg.num_beat_queries
    n_sentences = int(batch["sentence_ids"].max()) + 1
    expected = {
        "ecg_emb": ((b, d), torch.float32),
        "text_emb": ((b, d), torch.float32),
        "beat_emb": ((b, k, d), torch.float32),
        "sentence_emb": ((b, n_sentences, d), torch.float32),
        "sentence_mask": ((b, n_sentences), torch.bool),
        # The text runs on the batch's longest report and the [CLS] (text_columns).
        "logits": ((b, len(text_columns(batch["attention_mask"])) - 2, model.text.vocab_size),
                   torch.float32),
        "labels": ((b, length - 2), torch.int64),
        "logit_scale": ((1,), torch.float32),
    }
    assert set(out) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(out[key].shape) == shape, key
        assert out[key].dtype == dtype, key
    for key in ("ecg_emb", "text_emb"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(b))
    # The rhythm embedding is the normalised mean of the beat embeddings.
    torch.testing.assert_close(out["ecg_emb"],
                               torch.nn.functional.normalize(out["beat_emb"].mean(1), dim=-1))
    # Labels: the next token of the text part (never the trailing [CLS]), padding -> -100.
    # The empty report still has [BOS] -> [SEP].
    ids, mask = batch["input_ids"][:, 1:-1], batch["attention_mask"][:, 1:-1]
    assert torch.equal(out["labels"][mask == 1], ids[mask == 1])
    assert (out["labels"][mask == 0] == -100).all()
    assert (out["labels"] == model.tokenizer.sep_token_id).sum() == b
    # Sentence mask: one real sentence per sentence id in each report.
    for row in range(b):
        n_real = len(set(batch["sentence_ids"][row].tolist()) - {-1})
        assert out["sentence_mask"][row].sum().item() == n_real
    assert not out["sentence_mask"][REPORTS.index("")].any()


def test_logit_scale_is_a_1d_parameter_clamped_in_use(model):
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    assert model.logit_scale.shape == (1,)  # a 0-dim parameter crashes DeepSpeed
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    try:
        ecg = torch.rand(2, 12, 1000)
        ids = torch.tensor([[model.tokenizer.bos_token_id, 2023, 102, 101]] * 2)
        out = model(ecg, ids, torch.ones_like(ids), torch.tensor([[-1, 0, -1, -1]] * 2))
        assert out["logit_scale"].item() == pytest.approx(100.0, rel=1e-5)
    finally:
        with torch.no_grad():
            model.logit_scale.fill_(model.cfg.logit_scale_init)


def test_encode_helpers_shapes(cfg, model, batch):
    model.eval()
    b = batch["ecg"].shape[0]
    with torch.no_grad():
        ecg_emb = model.encode_ecg(batch["ecg"])
        assert ecg_emb.shape == (b, cfg.embed_dim)
        torch.testing.assert_close(ecg_emb.norm(dim=-1), torch.ones(b))
        assert model.encode_ecg(batch["ecg"], normalize=False).norm(dim=-1).sub(1).abs().max() > 1e-3
        assert model.ecg_features(batch["ecg"]).shape == (b, cfg.beat_width)
        text_emb = model.encode_text(batch["input_ids"], batch["attention_mask"])
        assert text_emb.shape == (b, cfg.embed_dim)
        # encode_reports tokenises the same way as the data layer -> same embeddings.
        torch.testing.assert_close(model.encode_reports(REPORTS), text_emb)
        # forward() and the encoders agree (eval mode: no dropout).
        out = model(**batch)
        torch.testing.assert_close(out["ecg_emb"], ecg_emb)
        torch.testing.assert_close(out["text_emb"], text_emb)


def test_ecg_encoder_accepts_any_length(cfg):
    encoder = ECGEncoder(cfg).eval()
    def frames(t: int) -> int:
        for _ in range(cfg.conv_layers):
            t = (t - cfg.conv_kernel) // cfg.conv_stride + 1
        return t
    for samples in (1000, 5000, 2500, 999, 64):
        out = encoder(torch.rand(2, 12, samples))
        assert out.shape == (2, frames(samples), cfg.ecg_width)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("kernel", [16, 15])
def test_conv_positional_embedding_keeps_length_and_is_weight_normed(kernel):
    pos = ConvPositionalEmbedding(width=32, kernel=kernel, groups=4)
    x = torch.rand(2, 37, 32)
    before = pos(x)
    assert before.shape == x.shape
    # Weight norm over dim 2: one gain per kernel tap, and the direction's scale is irrelevant.
    assert tuple(pos.weight_g.shape) == (1, 1, kernel)
    with torch.no_grad():
        pos.weight_v.mul_(7.0)
    torch.testing.assert_close(pos(x), before)


def test_conv_extractor_is_the_reference_default_mode(cfg):
    """Bias-free convs, GELU after each, one GroupNorm(C groups) after the first conv only."""
    encoder = ECGEncoder(cfg)
    blocks = encoder.feature_extractor.conv_layers
    assert len(blocks) == cfg.conv_layers
    for i, block in enumerate(blocks):
        conv = block[0]
        assert isinstance(conv, torch.nn.Conv1d) and conv.bias is None
        assert (conv.kernel_size, conv.stride) == ((cfg.conv_kernel,), (cfg.conv_stride,))
        norms = [m for m in block if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        if i == 0:
            assert len(norms) == 1 and norms[0].num_groups == norms[0].num_channels == cfg.conv_channels
        else:
            assert not norms
        assert isinstance(block[-1], torch.nn.GELU)
    # A constant offset added to every sample of a lead is removed by the GroupNorm over time.
    encoder.eval()
    x = torch.rand(2, 12, 1000)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x + 0.7), encoder(x), rtol=1e-4, atol=1e-4)


def test_feature_grad_mult_scales_only_the_conv_gradient(cfg):
    grads = {}
    for mult in (1.0, 0.1):
        torch.manual_seed(0)
        encoder = ECGEncoder(replace(cfg, feature_grad_mult=mult, dropout=0.0,
                                     attention_dropout=0.0, dropout_input=0.0))
        torch.manual_seed(1)
        encoder(torch.rand(2, 12, 1000)).pow(2).sum().backward()
        grads[mult] = (encoder.feature_extractor.conv_layers[0][0].weight.grad,
                       encoder.post_extract_proj.weight.grad)
    torch.testing.assert_close(grads[0.1][0], 0.1 * grads[1.0][0])
    torch.testing.assert_close(grads[0.1][1], grads[1.0][1])


def test_encoder_transformer_is_post_ln(cfg):
    """Post-LN: every layer ends in a LayerNorm, so the output frames are normalised."""
    encoder = ECGEncoder(cfg).eval()
    layer = encoder.layers[0]
    assert {"self_attn_layer_norm", "final_layer_norm", "fc1", "fc2"} <= {n for n, _ in layer.named_children()}
    with torch.no_grad():
        out = encoder(torch.rand(2, 12, 1000))
    torch.testing.assert_close(out.mean(-1), torch.zeros(out.shape[:2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones(out.shape[:2]), atol=1e-2, rtol=0)


def test_attentional_pooler_has_open_clip_semantics():
    torch.manual_seed(0)
    pooler = AttentionalPooler(width=32, context_dim=48, num_queries=5, heads=4)
    assert pooler.query.std().item() == pytest.approx(1.0, abs=0.35)   # queries ~ N(0, 1)
    frames = torch.rand(3, 7, 48)
    # torch's own nn.MultiheadAttention forward on the pooler's weights
    expected = nn.MultiheadAttention.forward(
        pooler.attn, pooler.ln_q(pooler.query).expand(3, -1, -1), pooler.ln_k(frames),
        pooler.ln_k(frames), need_weights=False)[0]
    torch.testing.assert_close(pooler(frames), expected, rtol=0, atol=1e-6)
    for n_frames in (1, 250):
        assert pooler(torch.rand(3, n_frames, 48)).shape == (3, 5, 32)


@pytest.mark.parametrize("case", ["self", "causal", "cross_packed", "cross_kdim"])
def test_sdpa_attention_equals_torch_multihead_attention(case):
    """layers.MultiheadAttention: nn.MultiheadAttention's weights and state dict, its forward
    through SDPA, equal to torch's forward in fp32, dropout included (same random draws: both
    end in SDPA)."""
    torch.manual_seed(0)
    kdim = 24 if case == "cross_kdim" else None
    ours = MultiheadAttention(32, 4, kdim=kdim, vdim=kdim)
    theirs = nn.MultiheadAttention(32, 4, kdim=kdim, vdim=kdim, batch_first=True)
    theirs.load_state_dict(ours.state_dict())   # the same parameter names and shapes
    x = torch.randn(3, 9, 32, requires_grad=True)
    memory = torch.randn(3, 5, kdim or 32, requires_grad=True)
    kv = x if case in ("self", "causal") else memory
    causal = case == "causal"
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1) if causal else None
    for module in (ours, theirs):
        module.eval()
    got = ours(x, kv, kv, is_causal=causal)
    want = theirs(x, kv, kv, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), [x, memory, *m.parameters()], allow_unused=True)
             for out, m in ((got, ours), (want, theirs))]
    for g, h in zip(*grads):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, rtol=0, atol=1e-5)


def test_beat_and_caption_heads(cfg, model):
    assert model.beat_proj.bias is None
    assert tuple(model.beat_proj.weight.shape) == (cfg.embed_dim, cfg.beat_width)
    assert model.caption_pooler.query.shape[1] == model.text.hidden_size
    decoder = model.decoder
    assert len(decoder.resblocks) == len(decoder.cross_attn) == cfg.decoder_layers
    assert all(b.ln_1_kv is None for b in decoder.resblocks)
    assert all(b.ln_1_kv is not None for b in decoder.cross_attn)
    assert decoder.text_projection.bias is None
    weight = decoder.text_projection.weight
    assert torch.isfinite(weight).all()
    assert weight.std().item() == pytest.approx(model.text.hidden_size ** -0.5, rel=0.05)


def test_text_tower_is_causal(model):
    model.eval()
    ids = torch.tensor([[101, 7128, 6348, 1012, 3671, 14925, 1012, 102]])
    changed = ids.clone()
    changed[0, 5] = 2731  # change a later token
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model.text.token_states(ids, mask)
        after = model.text.token_states(changed, mask)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-6)
    assert (before[:, 5:] - after[:, 5:]).abs().max() > 1e-3  # later states do see the change
    assert model.text.backbone.config.is_decoder


def test_decoder_logits_are_causal(model):
    model.eval()
    ecg = torch.rand(1, 12, 1000)
    ids = torch.tensor([[30522, 7128, 6348, 1012, 3671, 14925, 1012, 102, 101]])
    changed = ids.clone()
    changed[0, 4] = 2731
    mask = torch.ones_like(ids)
    sentences = torch.full_like(ids, -1)
    with torch.no_grad():
        a = model(ecg, ids, mask, sentences)["logits"]
        b = model(ecg, changed, mask, sentences)["logits"]
    # logits[:, t] predicts token t + 1 from tokens 0..t: positions < 4 must not move.
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-5)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_text_columns_keep_the_longest_report_and_the_cls_position():
    mask = torch.zeros(3, 32, dtype=torch.long)
    mask[:, -1] = 1                          # [CLS]
    for longest, width in ((5, 8), (7, 8), (8, 16), (31, 32)):
        mask[1, :longest] = 1
        assert text_columns(mask).tolist() == list(range(width - 1)) + [31]
    assert TEXT_WIDTH_MULTIPLE == 8


def test_trimming_the_padding_changes_no_output_loss_or_gradient(cfg, batch, monkeypatch):
    """The model runs the text on the batch's longest report and the [CLS] only; running
    every padded column (the reference's way) gives the same outputs, losses and gradients."""
    assert len(text_columns(batch["attention_mask"])) < batch["input_ids"].shape[1] / 2

    def run() -> tuple[dict, dict, dict]:
        torch.manual_seed(0)
        model = MELP(cfg).eval()   # eval: no dropout draws, whose count follows the shape
        out = model(**batch)
        losses = compute_losses(out, same_report_positives=True)
        losses["total"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out, losses, grads

    out, losses, grads = run()
    monkeypatch.setattr(text_tower, "text_columns", lambda mask: torch.arange(mask.shape[1]))
    full_out, full_losses, full_grads = run()

    assert out["logits"].shape[1] < full_out["logits"].shape[1]
    for key in ("ecg_emb", "text_emb", "beat_emb", "sentence_emb", "labels"):
        torch.testing.assert_close(out[key], full_out[key], rtol=1e-5, atol=1e-6)
    for key in ("rhythm", "token", "beat", "total"):
        torch.testing.assert_close(losses[key], full_losses[key], rtol=1e-5, atol=1e-6)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_layers_and_every_trainable_parameter_gets_a_gradient(cfg, batch):
    torch.manual_seed(0)
    model = MELP(cfg).train()
    layers = transformer_layers(model.text.backbone)
    for layer in list(layers)[: cfg.text_frozen_layers]:
        assert not any(p.requires_grad for p in layer.parameters())
    for layer in list(layers)[cfg.text_frozen_layers:]:
        assert all(p.requires_grad for p in layer.parameters())
    # The reference trains the embeddings (the new [BOS] row included).
    assert all(p.requires_grad for p in model.text.backbone.embeddings.parameters())

    losses = compute_losses(model(**batch))
    assert set(losses) == {"total", "rhythm", "token", "beat"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    losses["total"].backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().max() > 0, f"{name} got an all-zero gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"

    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["text_tower_frozen"] > 0 and counts["text_tower_trainable"] > 0
    parts = ("ecg_encoder", "beat_pooler", "caption_pooler", "text_tower_trainable",
             "text_tower_frozen", "decoder", "heads")
    assert sum(counts[p] for p in parts) == counts["total"]


def test_tiny_step_is_cheap_on_cpu(cfg, batch):
    """Forward + backward of the tiny preset at batch 8, 12 x 1000 samples.

    The budget is asserted in FLOPs, not seconds: these CPUs are shared, so wall time
    depends on the neighbours. ~9 GFLOP is ~0.3-0.4 s on 2 idle cores (printed below).
    """
    torch.manual_seed(0)
    model = MELP(cfg).train()
    with FlopCounterMode(display=False) as counter:
        compute_losses(model(**batch))["total"].backward()
    gflops = counter.get_total_flops() / 1e9
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        compute_losses(model(**batch))["total"].backward()
        timings.append(time.perf_counter() - start)
    print(f"tiny forward+backward, batch 8, 12x1000: {gflops:.1f} GFLOP, best {min(timings):.3f} s")
    assert gflops < 12


def test_generate_returns_one_string_per_ecg(model):
    model.train()
    texts = model.generate(torch.rand(3, 12, 1000), max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 3
    assert all(isinstance(t, str) and len(t.split()) <= 4 for t in texts)  # a token is at most a word
    assert model.training  # the mode is restored
