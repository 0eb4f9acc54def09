"""A WordPiece tokenizer trained on the report corpus (stage 1, ``text.init=scratch``).

ECG reports come in German, English and Swedish (PTB-XL) and English (MIMIC-IV-ECG), so
the tokenizer lower-cases but keeps accents: "vänster", "überdrehter" and "sänkning" stay
distinct from "vanster" and friends. Text is NFC-composed first so a decomposed "a" +
combining diaeresis is the same character as a composed "ä".

The result is saved as a transformers ``BertTokenizerFast`` ([CLS] [SEP] [PAD] [MASK]
[UNK]; ``strip_accents=False`` is recorded in tokenizer_config.json, which matters:
BertTokenizer rebuilds its normaliser from that file and would strip accents by default).

    tok = train_wordpiece(texts, vocab_size=8000)
    save_tokenizer(tok, "/runs/x/tokenizer")      # local folder or s3:// / gs:// URI
    tok = load_tokenizer_folder("/runs/x/tokenizer")
"""
from __future__ import annotations

import os
import string
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)

# Characters that must be in the vocabulary whatever the corpus holds, so a word made of
# them is never [UNK]: ASCII letters/digits/punctuation and the letters of German,
# Swedish/Danish/Norwegian, French and Spanish report text.
ALPHABET = (string.ascii_lowercase + string.digits + string.punctuation
            + "äöüßåæøéèêëàáâçñíìîïóòôúùûÿ")


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _backend():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    # Exactly the normaliser BertTokenizer rebuilds from do_lower_case=True,
    # strip_accents=False: what we train on is what a reloaded tokenizer applies.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=False, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _with_alphabet(texts: Iterable[str]) -> Iterator[str]:
    yield from (nfc(t) for t in texts)
    # The trainer only learns the continuation form "##x" of a character it saw inside a
    # word; one doubled letter per character makes both "x" and "##x" part of the vocabulary.
    yield " ".join(c * 2 for c in ALPHABET)


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2):
    """Train a lower-casing, accent-keeping WordPiece tokenizer; returns a BertTokenizerFast."""
    from tokenizers import processors, trainers
    from transformers import BertTokenizerFast

    tok = _backend()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET), continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(_with_alphabet(texts), trainer=trainer)
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)])
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, strip_accents=False,
                             tokenize_chinese_chars=True, unk_token=UNK, pad_token=PAD,
                             cls_token=CLS, sep_token=SEP, mask_token=MASK)


def save_tokenizer(tokenizer, path: str) -> str:
    """``save_pretrained`` into a local folder, or into a URI (written locally, then copied)."""
    from melp_ray.utils import storage

    if not storage.is_uri(path):
        tokenizer.save_pretrained(os.path.expanduser(path))
        return path
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        storage.copy_folder(tmp, path)
    return path


def load_tokenizer_folder(path: str):
    """A tokenizer from a local folder, a URI folder (fetched to a temp dir), a hub name or "minilm"."""
    from melp_ray.utils import storage
    from melp_ray.text.report_ids import load_tokenizer

    if not storage.is_uri(path):
        return load_tokenizer(os.path.expanduser(path))
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        storage.copy_folder(path, tmp)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def words(tokenizer, text: str) -> list[str]:
    """The normalised text split into the pre-tokenizer's words (what decode should give back)."""
    backend = tokenizer.backend_tokenizer
    normalised = backend.normalizer.normalize_str(nfc(text))
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalised)]


def unk_rate(tokenizer, texts: Sequence[str]) -> float:
    """Share of [UNK] among the tokens of ``texts`` (special tokens not counted)."""
    ids = tokenizer([nfc(t) for t in texts], add_special_tokens=False)["input_ids"]
    total = sum(len(row) for row in ids)
    unknown = sum(row.count(tokenizer.unk_token_id) for row in ids)
    return unknown / max(total, 1)
