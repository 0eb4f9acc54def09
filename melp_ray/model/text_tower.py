"""Text tower: a Hugging Face BERT-style encoder run causally (a CoCa unimodal text decoder).

Setting ``is_decoder=True`` in a BERT-style config makes transformers build a causal
self-attention mask instead of a bidirectional one, so the state at position t only sees
tokens 0..t. That is what lets the same token states feed the captioning decoder
(next-token prediction) and puts the report summary at the last position: the [CLS] token
that ``melp_ray.text.report_ids`` places after the padding.

Outputs
- token states (B, L, hidden) for the multimodal decoder,
- the report embedding: the state at the last position ([CLS]) -> Linear-GELU-Linear,
- sentence embeddings: mean of the token states of each sentence -> Linear.

As in the reference, the embedding table gains one row for the added [BOS] token, the
embeddings train, and the first ``text_frozen_layers`` layers are frozen.

Rows arrive padded to ``max_text_length``; ``text_columns`` picks the columns a batch needs
(its longest report, then the [CLS] column with its own position id), so the tower and the
decoder run on the longest report of the batch, not on padding. Causal attention makes the
result the same: a real token never sees the padding after it, the [CLS] sees the same
unmasked tokens, and padding states feed no loss.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from melp_ray.model.config import ModelConfig
from melp_ray.text.report_ids import load_report_tokenizer, resolve_text_model_path


# Trimmed widths are multiples of this: at most max_text_length / 8 shapes for torch.compile
# to see, and matmul sizes that suit tensor cores.
TEXT_WIDTH_MULTIPLE = 8


def text_columns(attention_mask: torch.Tensor) -> torch.Tensor:
    """The columns of a batch of report rows that hold any real token: the first
    ``longest report`` columns, rounded up to ``TEXT_WIDTH_MULTIPLE``, then the last ([CLS])
    column. The indices are the kept tokens' position ids. (One host sync: the width.)"""
    length = attention_mask.shape[1]
    longest = int(attention_mask[:, :-1].sum(dim=1).max())   # [BOS] ... [SEP], before [CLS]
    width = min(length, -(-(longest + 1) // TEXT_WIDTH_MULTIPLE) * TEXT_WIDTH_MULTIPLE)
    body = torch.arange(width - 1, device=attention_mask.device)
    return torch.cat([body, body.new_full((1,), length - 1)])


def load_text_model(name_or_path: str, pretrained: bool, overrides: dict,
                    vocab_size: int) -> nn.Module:
    """The causal backbone (no pooler), its token table sized to ``vocab_size`` rows."""
    from transformers import AutoConfig, AutoModel

    path = resolve_text_model_path(name_or_path)
    local = os.path.isdir(path)
    config = AutoConfig.from_pretrained(path, local_files_only=local, **overrides)
    config.is_decoder = True            # causal self-attention
    config.add_cross_attention = False  # the multimodal decoder is our own module
    config.use_cache = False
    if pretrained:
        model = AutoModel.from_pretrained(path, config=config, local_files_only=local)
    else:
        model = AutoModel.from_config(config)
    if model.get_input_embeddings().num_embeddings != vocab_size:
        # The new [BOS] row: drawn around the pretrained rows (HF's mean resizing), or at random.
        model.resize_token_embeddings(vocab_size, mean_resizing=pretrained)
    # BERT's [CLS] pooler (dense + tanh) is never used: drop it so no parameter lacks a gradient.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a BERT-style model (``model.encoder.layer``)."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder.layer
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")


class TextTower(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        vocab = len(load_report_tokenizer(cfg.text_model))
        self.backbone = load_text_model(cfg.text_model, cfg.text_pretrained, cfg.text_overrides,
                                        vocab)
        hidden = self.backbone.config.hidden_size
        self.hidden_size = hidden
        self.vocab_size = vocab
        self.max_positions = getattr(self.backbone.config, "max_position_embeddings", None)
        if self.max_positions and cfg.max_text_length > self.max_positions:
            raise ValueError(f"max_text_length {cfg.max_text_length} exceeds the text model's "
                             f"{self.max_positions} positions")
        self.report_head = nn.Sequential(
            nn.Linear(hidden, cfg.embed_dim), nn.GELU(), nn.Linear(cfg.embed_dim, cfg.embed_dim))
        self.sentence_proj = nn.Linear(hidden, cfg.embed_dim)
        self.freeze(cfg.text_frozen_layers, cfg.freeze_text_embeddings)
        if cfg.gradient_checkpointing:
            # transformers' own switch (its layers take it only in train mode); non-reentrant
            # as in the ECG encoder and decoder: frozen layers and kwargs need no special care.
            self.backbone.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
            # It also makes the embedding output require grad (for reentrant checkpointing and
            # PEFT); that would run backward through frozen embeddings and layers for nothing.
            self.backbone.disable_input_require_grads()

    def freeze(self, num_layers: int, embeddings: bool) -> None:
        """No gradient for the first ``num_layers`` layers (and the embeddings if asked)."""
        layers = transformer_layers(self.backbone)
        if num_layers >= len(layers):
            warnings.warn(f"text_frozen_layers={num_layers} freezes all {len(layers)} layers of "
                          f"{type(self.backbone).__name__}: only the heads of the text tower train",
                          stacklevel=2)
        for layer in list(layers)[:num_layers]:
            layer.requires_grad_(False)
        if embeddings:
            embeddings = getattr(self.backbone, "embeddings", None)
            if embeddings is None:  # not BERT-like: at least the token embedding table
                embeddings = self.backbone.get_input_embeddings()
            embeddings.requires_grad_(False)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, hidden) causal hidden states. ``position_ids`` (L,): the
        columns' positions when they are not 0..L-1 (``text_columns``)."""
        if position_ids is not None:
            position_ids = position_ids.unsqueeze(0).expand(input_ids.shape[0], -1)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def row_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Report rows as ``report_ids`` lays them out -> (causal states of the columns the
        batch needs, those columns): the longest report and the [CLS] (``text_columns``)."""
        columns = text_columns(attention_mask)
        return self.token_states(input_ids[:, columns], attention_mask[:, columns], columns), columns

    def report_embedding(self, states: torch.Tensor) -> torch.Tensor:
        """State at the last position (the [CLS]) -> (B, embed_dim), unnormalised."""
        return self.report_head(states[:, -1])

    def sentence_embeddings(self, states: torch.Tensor, sentence_ids: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean token state per sentence -> ((B, S, embed_dim), (B, S) bool mask of real sentences).

        S is the largest sentence count in the batch, at least 1 so the projection always
        takes part in the graph (ZeRO wants every trainable parameter to get a gradient).
        """
        num_sentences = max(int(sentence_ids.max().item()) + 1, 1)
        slots = torch.arange(num_sentences, device=sentence_ids.device)
        membership = (sentence_ids.unsqueeze(-1) == slots).to(states.dtype)  # (B, L, S)
        counts = membership.sum(dim=1)                                       # (B, S)
        sums = torch.einsum("bls,blh->bsh", membership, states)
        means = sums / counts.clamp(min=1).unsqueeze(-1)
        return self.sentence_proj(means), counts > 0
