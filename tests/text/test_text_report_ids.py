"""The reference MELP token layout: [BOS] report [SEP] [PAD]... [CLS], and the sentence ids."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from melp_ray.text.report_ids import (encode_reports, load_report_tokenizer, load_tokenizer,
                                      report_encoder, sentence_numbers, special_ids)
from melp_ray.train.stream import StreamSpec


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


def ptbxl_reports() -> list[str]:
    from melp_ray.data.ptbxl import read_database
    from melp_ray.data.sources import bundled_root

    return read_database(bundled_root())["report"].astype(str).tolist()


@pytest.mark.parametrize("text_model, max_length", [("minilm", 16), ("minilm", 64),
                                                     ("minilm-reports", 32)])
def test_report_encoder_gives_exactly_the_hugging_face_arrays(text_model, max_length):
    """The data workers' encoder (the `tokenizers` backend, no transformers) against
    ``encode_reports`` with the Hugging Face tokenizer: every bundled PTB-XL report (German
    and English, umlauts, long ones cut at ``max_length``) and the edge cases."""
    reports = ptbxl_reports() + ["", "   ", ".", "word " * 200, "Sinus­rhythmus, ÄÖÜ ß é. ST↑"]
    expected = encode_reports(load_report_tokenizer(text_model), reports, max_length)
    got = report_encoder(text_model, max_length)(reports)
    assert len(reports) > 200 and (expected["attention_mask"].sum(1) == max_length).any()
    for key in ("input_ids", "attention_mask", "sentence_ids"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_a_data_worker_batch_imports_neither_torch_nor_transformers(bundled_ptbxl):
    """What a Ray Data worker does with a training batch (``finish_batch`` with the driver's
    pickled ``StreamSpec``), in a fresh process: it must not import torch or transformers,
    which cost every worker process ~4 CPU-s before it tokenises its first report."""
    spec = StreamSpec(sample_rate=100, seconds=10, text_model="minilm", max_text_length=32)
    code = ("import pickle, sys; import numpy as np; from melp_ray.train.stream import finish_batch\n"
            "spec = pickle.load(sys.stdin.buffer)\n"
            "out = finish_batch(np.ones((2, 12, 1000), np.float32), ['sinus rhythm.', ''], [['NORM'], []], spec)\n"
            "assert out['input_ids'].shape == (2, 32), out['input_ids'].shape\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(spec),
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().strip() == "[]"
