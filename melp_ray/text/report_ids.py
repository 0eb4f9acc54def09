"""Reports -> token ids, the one text format shared by the data layer and the model.

The reference MELP layout of one row (``max_length`` tokens; the text tower runs causally,
so the summary token goes last, after the padding):

    [BOS] report tokens ... [SEP] [PAD] [PAD] ... [CLS]

[BOS] is a token MELP adds to the tokenizer (the text tower's embeddings grow by one row,
``load_report_tokenizer``). [SEP] ends the report: it is what the captioning decoder learns
to emit last. [CLS] always sits at the last position and its attention mask is 1, so its
causal hidden state has seen every real token; it is the report embedding.

``sentence_ids`` numbers the sentences of the report from 0 for the beat loss: a sentence
ends with its '.' (the period belongs to it, as in the reference) and the text after the
last '.' is a sentence too (the reference drops it; see docs/reference_deviations.md). A
sentence needs at least one token other than '.'. Special tokens and padding get -1, so a
report with no words has no sentence at all.
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field
from typing import NamedTuple
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

# Re-exported: the data layer, the model and the tests resolve text model names here.
from melp_ray.text.models import resolve_text_model_path


BOS_TOKEN = "[BOS]"


class SpecialIds(NamedTuple):
    bos: int   # first token of every row; generation starts from it
    eos: int   # [SEP]: end of the report, the last token the decoder predicts
    pad: int
    cls: int   # summary token at the last position




@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str):
    """The Hugging Face fast tokenizer of a hub name, a local folder or "minilm", as shipped."""
    from transformers import AutoTokenizer

    path = resolve_text_model_path(name_or_path)
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=8)
def load_report_tokenizer(name_or_path: str):
    """``load_tokenizer`` plus MELP's [BOS] token (when the tokenizer has no BOS of its own).

    The new token gets the next free id (``len(tokenizer)``), so the text tower's
    embedding table grows by exactly one row: see ``text_tower.load_text_model``.
    """
    tokenizer = copy.deepcopy(load_tokenizer(name_or_path))
    if tokenizer.bos_token_id is None:
        tokenizer.add_special_tokens({"bos_token": BOS_TOKEN})
    return tokenizer


def special_ids(tokenizer) -> SpecialIds:
    return SpecialIds(tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                      tokenizer.cls_token_id)


def sentence_numbers(tokens: Sequence[int], period: int) -> list[int]:
    """Sentence index of each report token (-1 for a '.' that closes no sentence)."""
    numbers, sentence, open_words = [], 0, False
    for tok in tokens:
        if tok == period:
            numbers.append(sentence if open_words else -1)
            sentence += open_words
            open_words = False
        else:
            numbers.append(sentence)
            open_words = True
    return numbers


def encode_reports(tokenizer, reports: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Tokenise reports into fixed-length int64 arrays: input_ids, attention_mask, sentence_ids."""
    check_max_length(max_length)
    ids = special_ids(tokenizer)
    if ids.bos is None:
        raise ValueError("the tokenizer has no [BOS] token: load it with load_report_tokenizer")
    body = tokenizer(list(reports), add_special_tokens=False, truncation=True,
                     max_length=max_length - 3)["input_ids"]
    return lay_out(body, ids, tokenizer.convert_tokens_to_ids("."), max_length)


def check_max_length(max_length: int) -> None:
    if max_length < 4:
        raise ValueError("max_length must leave room for [BOS], one token, [SEP] and [CLS]")


def lay_out(body: Sequence[Sequence[int]], ids: SpecialIds, period: int,
            max_length: int) -> dict[str, np.ndarray]:
    """Each report's token ids (at most ``max_length - 3``) in the row layout above."""
    n = len(body)
    input_ids = np.full((n, max_length), ids.pad, dtype=np.int64)
    attention_mask = np.zeros((n, max_length), dtype=np.int64)
    sentence_ids = np.full((n, max_length), -1, dtype=np.int64)
    input_ids[:, -1], attention_mask[:, -1] = ids.cls, 1
    for row, tokens in enumerate(body):
        text = [ids.bos, *tokens, ids.eos]
        input_ids[row, : len(text)] = text
        attention_mask[row, : len(text)] = 1
        sentence_ids[row, 1: len(tokens) + 1] = sentence_numbers(tokens, period)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "sentence_ids": sentence_ids}


@dataclass(frozen=True)
class ReportEncoder:
    """``encode_reports`` for Ray Data workers: the same arrays, from the fast tokenizer's own
    ``tokenizers`` backend (its JSON, with [BOS] added), so that a data worker imports neither
    transformers nor torch (~4 CPU-s for every worker process a pipeline starts).
    Built on the driver (``report_encoder``); it pickles as plain data."""

    backend_json: str = field(repr=False)
    ids: SpecialIds
    period: int
    max_length: int

    def __call__(self, reports: Sequence[str]) -> dict[str, np.ndarray]:
        backend = _truncating_backend(self.backend_json, self.max_length - 3)
        body = [e.ids for e in backend.encode_batch(list(reports), add_special_tokens=False)]
        return lay_out(body, self.ids, self.period, self.max_length)


@functools.lru_cache(maxsize=8)
def report_encoder(name_or_path: str, max_length: int) -> ReportEncoder:
    """The ``ReportEncoder`` of ``load_report_tokenizer(name_or_path)``."""
    check_max_length(max_length)
    tokenizer = load_report_tokenizer(name_or_path)
    return ReportEncoder(tokenizer.backend_tokenizer.to_str(), special_ids(tokenizer),
                         tokenizer.convert_tokens_to_ids("."), max_length)


@functools.lru_cache(maxsize=8)
def _truncating_backend(backend_json: str, max_tokens: int) -> Tokenizer:
    """Once per worker process: what ``tokenizer(..., truncation=True, max_length=...)`` sets."""
    backend = Tokenizer.from_str(backend_json)
    backend.enable_truncation(max_tokens)
    backend.no_padding()
    return backend
