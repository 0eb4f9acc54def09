"""MELP: ties the ECG encoder, the two poolers, the causal text tower and the decoder together.

    ecg (B, leads, T) ─ ECGEncoder ─ frames ─┬─ beat pooler (K queries) ─ LN ─ W (no bias) ─ beat_emb (B, K, D)
                                             │                                     mean ─ ecg_emb (rhythm)
                                             └─ caption pooler (Q queries) ─ LN ─ memory ─┐
    input_ids ─ TextTower (causal) ─ token states ─┬─ last ([CLS]) state ─ MLP ─ text_emb │
                                                   ├─ per-sentence mean ─ Linear ─ sentence_emb
                                                   └─ MultimodalDecoder (reads memory) ─ logits

The three losses that use these outputs live in ``melp_ray.model.losses``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from melp_ray.model.config import ModelConfig
from melp_ray.model.decoder import MultimodalDecoder
from melp_ray.model.ecg_encoder import ECGEncoder
from melp_ray.model.pooler import AttentionalPooler
from melp_ray.model.text_tower import TextTower
from melp_ray.text.report_ids import encode_reports, load_report_tokenizer, special_ids

IGNORE_INDEX = -100  # label of padding positions (torch's cross-entropy default)


class MELP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.ecg_encoder = ECGEncoder(cfg)
        self.text = TextTower(cfg)
        text_width = self.text.hidden_size
        self.beat_pooler = AttentionalPooler(
            cfg.beat_width, cfg.ecg_width, cfg.num_beat_queries, cfg.pooler_heads)
        self.beat_norm = nn.LayerNorm(cfg.beat_width)
        self.beat_proj = nn.Linear(cfg.beat_width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.beat_proj.weight, std=cfg.ecg_width ** -0.5)
        self.caption_pooler = AttentionalPooler(
            text_width, cfg.ecg_width, cfg.num_caption_queries, cfg.pooler_heads)
        self.caption_norm = nn.LayerNorm(text_width)
        self.decoder = MultimodalDecoder(cfg, text_width, self.text.vocab_size)
        # Shape [1], not a scalar: DeepSpeed cannot start with a 0-dim parameter.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.logit_scale_init))

    def compile_parts(self, **options) -> None:
        """``torch.compile`` the ECG encoder, both poolers, the text tower's Hugging Face model
        and the multimodal decoder in place (``train.compile``; ``options`` go to
        ``nn.Module.compile``, e.g. ``backend``). Not ``forward`` itself, whose sentence count
        is data-dependent. The text model compiles to one graph (causal + padding mask
        included, frozen layers without gradients); the text runs at the batch's width
        (``text_columns``: a multiple of 8), and dynamo makes that length dynamic once it has
        seen a second one, as for ``generate``'s growing prefix. Numerics: eager's to float
        rounding (tests/model/test_model_compile.py)."""
        for part in (self.ecg_encoder, self.beat_pooler, self.caption_pooler, self.text.backbone,
                     self.decoder):
            part.compile(**options)

    @property
    def tokenizer(self):
        return load_report_tokenizer(self.cfg.text_model)  # cached per process

    # ----- ECG side -----
    def _beats(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, K, beat_width): the beat queries' pooled, LayerNorm-ed features."""
        return self.beat_norm(self.beat_pooler(frames))

    def _caption_memory(self, frames: torch.Tensor) -> torch.Tensor:
        return self.caption_norm(self.caption_pooler(frames))

    def ecg_features(self, ecg: torch.Tensor) -> torch.Tensor:
        """(B, beat_width): mean beat feature before the projection (the linear-probe input)."""
        return self._beats(self.ecg_encoder(ecg)).mean(dim=1)

    def encode_ecg(self, ecg: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, embed_dim) rhythm embedding: the mean of the beat embeddings."""
        rhythm = self.beat_proj(self._beats(self.ecg_encoder(ecg))).mean(dim=1)
        return F.normalize(rhythm, dim=-1) if normalize else rhythm

    # ----- text side -----
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    normalize: bool = True) -> torch.Tensor:
        """(B, embed_dim) report embedding from the trailing [CLS] state."""
        report = self.text.report_embedding(self.text.row_states(input_ids, attention_mask)[0])
        return F.normalize(report, dim=-1) if normalize else report

    def encode_reports(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Tokenise raw report strings and embed them: (len(texts), embed_dim)."""
        # report_ids.encode_reports: the same token layout as training
        batch = encode_reports(self.tokenizer, list(texts), self.cfg.max_text_length)
        device = self.logit_scale.device
        return self.encode_text(torch.from_numpy(batch["input_ids"]).to(device),
                                torch.from_numpy(batch["attention_mask"]).to(device), normalize)

    # ----- training forward -----
    def forward(self, ecg: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                sentence_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        frames = self.ecg_encoder(ecg)
        beat_emb = self.beat_proj(self._beats(frames))                # (B, K, D)

        # Teacher forcing over the text part (all but the trailing [CLS]): the causal state
        # at position t predicts token t + 1; padding is ignored. The labels keep the rows'
        # full width, so that they compare across micro-batches and ranks (report keys,
        # token counts); the logits cover the trimmed columns only (``token_loss``).
        labels = input_ids[:, 1:-1].masked_fill(attention_mask[:, 1:-1] == 0, IGNORE_INDEX)

        # (B, L', hidden): the longest report's columns and the [CLS]
        states, columns = self.text.row_states(input_ids, attention_mask)
        text_emb = self.text.report_embedding(states)
        sentence_emb, sentence_mask = self.text.sentence_embeddings(states, sentence_ids[:, columns])
        logits = self.decoder(states[:, :-2], self._caption_memory(frames))

        return {
            "ecg_emb": F.normalize(beat_emb.mean(dim=1), dim=-1),
            "text_emb": F.normalize(text_emb, dim=-1),
            "beat_emb": beat_emb,
            "sentence_emb": sentence_emb,
            "sentence_mask": sentence_mask,
            "logits": logits,
            "labels": labels,
            "logit_scale": self.logit_scale.clamp(max=self.cfg.logit_scale_max).exp(),
        }

    # ----- captioning -----
    @torch.no_grad()
    def generate(self, ecg: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Greedy report generation from ECGs: from [BOS] until [SEP] (or the length limit)."""
        ids_of = special_ids(self.tokenizer)
        limit = self.cfg.max_text_length - 2           # room for [BOS] and the trailing [CLS]
        max_new_tokens = limit if max_new_tokens is None else min(max_new_tokens, limit)

        was_training = self.training
        self.eval()
        try:
            memory = self._caption_memory(self.ecg_encoder(ecg))
            ids = torch.full((ecg.shape[0], 1), ids_of.bos, dtype=torch.long, device=ecg.device)
            finished = torch.zeros(ecg.shape[0], dtype=torch.bool, device=ecg.device)
            for _ in range(max_new_tokens):
                # No KV cache: the whole prefix is re-run each step (simple; reports are short).
                states = self.text.token_states(ids, torch.ones_like(ids))
                next_ids = self.decoder(states, memory)[:, -1].argmax(dim=-1)
                next_ids = next_ids.masked_fill(finished, ids_of.pad)
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                finished |= next_ids == ids_of.eos
                if finished.all():
                    break
        finally:
            self.train(was_training)
        return [self._decode(row, ids_of.eos) for row in ids[:, 1:].tolist()]

    def _decode(self, token_ids: list[int], end: int) -> str:
        if end in token_ids:
            token_ids = token_ids[: token_ids.index(end)]
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def _count(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def count_parameters(model: MELP) -> dict[str, int]:
    """Parameter counts per part; the text tower split into trainable and frozen."""
    heads = _count(model.beat_norm) + _count(model.beat_proj) + _count(model.caption_norm) \
        + _count(model.text.report_head) + _count(model.text.sentence_proj) \
        + model.logit_scale.numel()
    return {
        "ecg_encoder": _count(model.ecg_encoder),
        "beat_pooler": _count(model.beat_pooler),
        "caption_pooler": _count(model.caption_pooler),
        "text_tower_trainable": _count(model.text.backbone, trainable=True),
        "text_tower_frozen": _count(model.text.backbone, trainable=False),
        "decoder": _count(model.decoder),
        "heads": heads,
        "total": _count(model),
    }
