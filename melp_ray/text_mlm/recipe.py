"""Masked-language modelling: the BERT model, its masking and loss, and stage 1's training recipe.

``TextPretrainRecipe`` is the same Ray Train + DeepSpeed machinery as stage 2
(``DeepSpeedRecipe``): the masks are drawn on the training worker from the per-micro-step
generator, so a resumed run sees exactly the masks it would have seen.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from melp_ray.utils.distributed import sum_over_ranks
from melp_ray.text_mlm.config import TextPretrainConfig, tokenizer_source
from melp_ray.train.metrics import worker_print
from melp_ray.train.recipe import DeepSpeedRecipe

IGNORE = -100                        # label of positions that are not predicted
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the remaining 10% stay unchanged
VAL_MASK_SEED = 1_234_567            # validation masks: the same at every validation


def build_mlm_model(cfg: TextPretrainConfig, tokenizer, load_weights: bool = True):
    """A BertForMaskedLM-style model: pretrained (encoder weights loaded) or a new small BERT."""
    from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from melp_ray.text.models import resolve_text_model_path

    t = cfg.text
    if t.init == "pretrained":
        path = resolve_text_model_path(t.model)
        local = os.path.isdir(path)
        if load_weights:
            # A checkpoint without an MLM head (e.g. MiniLM, a BertModel) gets a fresh one.
            model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=local)
        else:
            model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(path, local_files_only=local))
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and t.max_length > limit:
            raise ValueError(f"text.max_length={t.max_length} exceeds {t.model}'s {limit} positions")
        return model
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings, hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.dropout, pad_token_id=tokenizer.pad_token_id)
    return BertForMaskedLM(config)


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, prob: float, mask_id: int,
                vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select ``prob`` of the maskable tokens; 80% -> [MASK], 10% -> random, 10% kept.

    All draws come from ``generator`` (on CPU, then moved), so the same seed gives the same
    masks on any device: the base recipe seeds it per micro-step, which keeps resume exact.
    Returns (inputs, labels) with labels = IGNORE where nothing is predicted.
    """
    shape, device = input_ids.shape, input_ids.device
    select = torch.rand(shape, generator=generator).to(device) < prob
    select &= maskable
    action = torch.rand(shape, generator=generator).to(device)
    random_ids = torch.randint(vocab_size, shape, generator=generator).to(device)
    inputs = input_ids.clone()
    inputs[select & (action < MASK_SHARE)] = mask_id
    swap = select & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    inputs[swap] = random_ids[swap]
    labels = torch.where(select, input_ids, torch.full_like(input_ids, IGNORE))
    return inputs, labels


def mlm_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct predictions, predicted positions) over the masked tokens."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum")
    picked = flat_labels != IGNORE
    correct = (flat_logits.argmax(-1)[picked] == flat_labels[picked]).sum()
    return loss_sum, correct, picked.sum()


class TextPretrainRecipe(DeepSpeedRecipe):
    """What stage 1 trains: a BERT-style masked language model on reports."""

    def setup(self) -> None:
        from melp_ray.text_mlm.wordpiece import load_tokenizer_folder

        # Before super().setup(): build_model needs the vocabulary.
        self.tokenizer = load_tokenizer_folder(tokenizer_source(self.cfg))
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))
        super().setup()

    def build_model(self):
        model = build_mlm_model(self.cfg, self.tokenizer)
        # A pretrained model with a different tokenizer would index past its embedding table.
        if model.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens, the model's "
                             f"embedding only {model.get_input_embeddings().num_embeddings}")
        return model

    def masked_batch(self, batch, generator):
        ids, attention = batch["input_ids"], batch["attention_mask"]
        maskable = attention.bool() & ~torch.isin(ids, self.special_ids.to(ids.device))
        return mask_tokens(ids, maskable, self.cfg.text.mlm_probability,
                           self.tokenizer.mask_token_id, len(self.tokenizer), generator)

    def compute_losses(self, batch, generator):
        inputs, labels = self.masked_batch(batch, generator)
        logits = self.engine(input_ids=inputs, attention_mask=batch["attention_mask"]).logits
        loss_sum, _, count = mlm_sums(logits, labels)
        # A micro-batch with no selected token (tiny batches) gives 0, not NaN.
        loss = loss_sum / count.clamp(min=1)
        return {"total": loss, "mlm": loss.detach()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out MLM loss and masked-token accuracy, with the same masks every time."""
        if self.val_data is None:
            return {}
        self.engine.eval()
        generator = torch.Generator().manual_seed(VAL_MASK_SEED + self.rank)
        batches = iter(self.val_data.iter_torch_batches(
            batch_size=self.cfg.train.micro_batch_size, drop_last=False, device=self.device))
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        for _ in range(self.cfg.train.val_batches):
            batch = self.next_batch_everywhere(batches)
            if batch is None:
                break
            inputs, labels = self.masked_batch(batch, generator)
            logits = self.engine(input_ids=inputs, attention_mask=batch["attention_mask"]).logits
            totals += torch.tensor([float(v) for v in mlm_sums(logits, labels)], dtype=torch.float64)
        self.engine.train()
        totals = totals.to(self.device)
        loss_sum, correct, count = sum_over_ranks(totals).tolist()
        if count == 0:
            return {}
        loss = loss_sum / count
        return {"mlm_loss": loss, "masked_accuracy": correct / count,
                "perplexity": math.exp(min(loss, 50.0)), "masked_tokens": count}

    def train(self) -> dict[str, Any]:
        # The untrained model's held-out loss: the baseline a run is judged against.
        initial = self.validate() if self.state.step == 0 else {}
        if initial and self.rank == 0:
            worker_print("[melp_ray] before training: "
                         + ", ".join(f"val/{k} {v:.4f}" for k, v in initial.items()))
        out = super().train()
        out["metrics"] = {**out.get("metrics", {}),
                          **{f"val/initial_{k}": v for k, v in initial.items()}}
        return out
