"""Stage 1's text: the report corpus, the scratch tokenizer trained on it, and the per-rank
Ray Data streams of token ids.

Reports are tokenised on Ray Data workers (``tokenize_batch``) into fixed-length rows, so the
training workers only mask and train.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from melp_ray.utils import storage
from melp_ray.text_mlm.config import TextPretrainConfig
from melp_ray.text_mlm.wordpiece import nfc

TOKENIZER_FOLDER = "tokenizer"       # <storage>/<name>/tokenizer (scratch runs)


def corpus(cfg: TextPretrainConfig) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]}: reports of data.root (+ lines of data.text_files).

    Reports follow stage 2's subject-level split (same val_fraction and seed give the same
    held-out subjects); text-file lines are split by a hash of the line, so duplicates stay
    on one side. Order is fixed: the per-rank streams built from it are deterministic.
    """
    from melp_ray.data.sources import detect_layout, split_for_subject
    from melp_ray.data.rows import list_splits, resolve_root, shard_files

    d, seed = cfg.data, cfg.train.seed
    texts: dict[str, list[str]] = {"train": [], "val": []}
    if d.use_reports:
        root = resolve_root(d.root)
        layout = detect_layout(root) if d.dataset == "auto" else d.dataset
        if layout == "shards":
            from melp_ray.data.shards import read_shard_table

            for split in texts:
                reports = [r for f in shard_files(root, split)
                           for r in read_shard_table(f, columns=["report"]).column("report").to_pylist()]
                texts[split] += reports[: d.limit] if d.limit is not None else reports
        else:
            for split, refs in list_splits(layout, root, d.val_fraction, seed, d.limit).items():
                texts[split] += [ref.report for ref in refs]
    for path in d.text_files:
        for line in storage.read_text(path).splitlines():
            line = line.strip()
            if line:
                texts[split_for_subject(line, d.val_fraction, seed)].append(line)
    return {split: [nfc(t) for t in rows if t and t.strip()] for split, rows in texts.items()}


def prepare_tokenizer(cfg: TextPretrainConfig) -> TextPretrainConfig:
    """init=scratch: train the WordPiece tokenizer on the train split once per run.

    It is saved under the run folder; a re-run (resume) finds it there and reuses it, so a
    resumed run keeps its vocabulary. Returns the config with ``text.tokenizer`` set.
    """
    from melp_ray.text_mlm.wordpiece import save_tokenizer, train_wordpiece, unk_rate
    from melp_ray.train.metrics import run_dir

    if cfg.text.init != "scratch" or cfg.text.tokenizer is not None:
        return cfg
    folder = storage.join(run_dir(cfg), TOKENIZER_FOLDER)
    if storage.exists(storage.join(folder, "tokenizer.json")):
        print(f"[melp_ray] reusing the tokenizer of this run: {folder}", flush=True)
    else:
        texts = corpus(cfg)
        tok = train_wordpiece(texts["train"], cfg.text.vocab_size, cfg.text.min_frequency)
        save_tokenizer(tok, folder)
        print(f"[melp_ray] trained a WordPiece tokenizer: {len(tok)} tokens on "
              f"{len(texts['train'])} texts, [UNK] rate on val {unk_rate(tok, texts['val']):.4%}; "
              f"saved to {folder}", flush=True)
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tokenizer=folder))


@functools.lru_cache(maxsize=4)
def _backend_tokenizer(tokenizer_json: str, max_length: int, pad_id: int, pad_token: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tok


def tokenize_batch(batch: dict[str, Any], tokenizer_json: str, max_length: int, pad_id: int,
                   pad_token: str) -> dict[str, np.ndarray]:
    """Ray Data worker: report strings -> fixed-length [CLS] ... [SEP] [PAD] ids (int64)."""
    tok = _backend_tokenizer(tokenizer_json, max_length, pad_id, pad_token)
    encodings = tok.encode_batch([str(t) for t in batch["text"]])
    return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64).reshape(-1, max_length),
            "attention_mask": np.array([e.attention_mask for e in encodings],
                                       dtype=np.int64).reshape(-1, max_length)}


def build_datasets(cfg: TextPretrainConfig, tokenizer) -> dict[str, Any]:
    """``train_r{rank}`` / ``val_r{rank}``: every ``world``-th text of each split, tokenised."""
    import ray.data

    texts = corpus(cfg)
    world = cfg.train.num_workers
    kwargs = {"tokenizer_json": tokenizer.backend_tokenizer.to_str(),
              "max_length": cfg.text.max_length, "pad_id": tokenizer.pad_token_id,
              "pad_token": tokenizer.pad_token}
    datasets = {}
    for split, rows in texts.items():
        if len(rows) < world:
            raise ValueError(f"only {len(rows)} {split} text(s) for {world} workers; "
                             f"add data or raise data.val_fraction")
        for rank in range(world):
            mine = [{"text": t} for t in rows[rank::world]]
            ds = ray.data.from_items(mine, override_num_blocks=max(1, min(len(mine) // 512, 64)))
            datasets[f"{split}_r{rank}"] = ds.map_batches(
                tokenize_batch, fn_kwargs=kwargs, batch_format="numpy", batch_size=256)
    return datasets
