"""The stage-1 WordPiece tokenizer (melp_ray.text_mlm.wordpiece), trained on the bundled PTB-XL reports:
lossless round trips, German and Swedish letters kept, and what stage 2 needs from it.

Real tokenizers and transformers; no mocks.
"""
from __future__ import annotations

import pytest

from melp_ray.data.sources import bundled_root, scan_records, split_for_subject
from melp_ray.text_mlm.wordpiece import ALPHABET, SPECIAL_TOKENS, nfc, save_tokenizer, train_wordpiece, unk_rate, words


def bundled_reports() -> dict[str, list[str]]:
    """The bundled PTB-XL reports, split by subject exactly as the recipes split them."""
    out = {"train": [], "val": []}
    for ref in scan_records("ptb-xl", bundled_root()).refs:
        out[split_for_subject(ref.subject_id, 0.1, 0)].append(ref.report)
    return out


@pytest.fixture(scope="module")
def reports():
    return bundled_reports()


@pytest.fixture(scope="module")
def trained_tokenizer(reports, tmp_path_factory):
    """Trained on the train split, saved, and reloaded the way stage 2 will load it."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_tokenizer(train_wordpiece(reports["train"], vocab_size=8000, min_frequency=2), str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def test_tokenizer_round_trips_every_report(trained_tokenizer, reports):
    tok = trained_tokenizer
    texts = reports["train"] + reports["val"]
    assert len(texts) > 200
    for text in texts:
        decoded = tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
        # Exactly the normalised text, word-split by the pre-tokenizer (decoder spacing rules) ...
        assert decoded == tok.backend_tokenizer.decoder.decode(words(tok, text)), text
        # ... and, spaces aside, the lower-cased original: nothing lost, no accent stripped.
        assert decoded.replace(" ", "") == "".join(nfc(text).lower().split()), text


def test_tokenizer_keeps_german_and_swedish_letters(trained_tokenizer, reports):
    tok = trained_tokenizer
    sample = "Sinusrytm VÄNSTER el-axel. ÜBERDREHTER Linkstyp, fÖrÄndring, sÅsom vid ischämie."
    decoded = tok.decode(tok(sample)["input_ids"], skip_special_tokens=True)
    assert decoded == ("sinusrytm vänster el - axel. überdrehter linkstyp, förändring, "
                       "såsom vid ischämie.")
    assert "vänster" in tok.get_vocab()        # a frequent Swedish word became one token
    # Decomposed input (a + combining diaeresis) is composed before tokenising.
    assert tok.decode(tok(nfc("va\u0308nster"))["input_ids"], skip_special_tokens=True) == "vänster"
    # Held-out reports: no unknown tokens at all (the alphabet is in the vocabulary).
    assert unk_rate(tok, reports["val"]) == 0.0
    assert tok.convert_tokens_to_ids(["##" + c for c in "äöåü"]) != [tok.unk_token_id] * 4
    assert all(tok.convert_tokens_to_ids(c) != tok.unk_token_id for c in ALPHABET)


def test_tokenizer_has_what_stage_two_needs(trained_tokenizer):
    tok = trained_tokenizer
    assert type(tok).__name__ == "BertTokenizer"     # AutoTokenizer resolves the saved class
    for name in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token"):
        assert getattr(tok, name) in SPECIAL_TOKENS
    assert tok.convert_tokens_to_ids(".") != tok.unk_token_id     # sentence splitting needs '.'
    ids = tok("sinus rhythm. normal ecg.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert 200 < len(tok) <= 8000
