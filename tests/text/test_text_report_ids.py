"""The reference MELP token layout: [BOS] report [SEP] [PAD]... [CLS], and the sentence ids."""
from __future__ import annotations

import numpy as np

from melp_ray.text.report_ids import (encode_reports, load_report_tokenizer, load_tokenizer,
                                   sentence_numbers, special_ids)


def test_bos_is_added_once_as_the_next_id():
    plain = load_tokenizer("minilm")
    tok = load_report_tokenizer("minilm")
    assert plain.bos_token_id is None                   # the shipped tokenizer is untouched
    assert tok.bos_token == "[BOS]" and tok.bos_token_id == len(plain)
    assert len(tok) == len(plain) + 1


def test_layout_bos_report_sep_padding_cls():
    tok = load_report_tokenizer("minilm")
    ids = special_ids(tok)
    reports = ["sinus rhythm. normal ecg.", "", "word " * 200]
    out = encode_reports(tok, reports, max_length=16)
    input_ids, mask = out["input_ids"], out["attention_mask"]
    assert input_ids.shape == mask.shape == out["sentence_ids"].shape == (3, 16)
    body = tok(reports[0], add_special_tokens=False)["input_ids"]
    expected = [ids.bos, *body, ids.eos] + [ids.pad] * (16 - len(body) - 3) + [ids.cls]
    assert input_ids[0].tolist() == expected
    assert mask[0].tolist() == [1] * (len(body) + 2) + [0] * (16 - len(body) - 3) + [1]
    # Empty report: [BOS] [SEP] ... [CLS]; a long one is truncated and keeps [SEP] and [CLS].
    assert input_ids[1, :2].tolist() == [ids.bos, ids.eos] and input_ids[1, -1] == ids.cls
    assert input_ids[2, -2] == ids.eos and input_ids[2, -1] == ids.cls and mask[2].all()
    assert (out["sentence_ids"][1] == -1).all()


def test_sentence_ids_periods_belong_to_their_sentence_and_trailing_text_counts():
    period = 9
    # "a b . c . . d"  ->  the lone second period closes nothing; "d" is a sentence too.
    assert sentence_numbers([1, 2, period, 3, period, period, 4], period) == [0, 0, 0, 1, 1, -1, 2]
    assert sentence_numbers([period, period], period) == [-1, -1]
    tok = load_report_tokenizer("minilm")
    out = encode_reports(tok, ["sinus rhythm. left axis deviation"], max_length=24)
    sid = out["sentence_ids"][0]
    assert sid[0] == -1 and sorted(set(sid.tolist()) - {-1}) == [0, 1]
    n_tokens = int(out["attention_mask"][0].sum()) - 3          # less [BOS], [SEP], [CLS]
    assert (sid[1:1 + n_tokens] >= 0).all() and (sid[1 + n_tokens:] == -1).all()
    first = len(tok("sinus rhythm.", add_special_tokens=False)["input_ids"])
    assert np.count_nonzero(sid == 0) == first                   # "sinus rhythm" and its '.'
    assert np.count_nonzero(sid == 1) == n_tokens - first
