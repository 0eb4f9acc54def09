"""Stage 1: the cardiology text model, masked-language modelling on the report corpus.

    python -m melp_ray.pretrain_text                                  # tiny BERT from scratch
    python -m melp_ray.pretrain_text --config text_base data.root=/data/mimic-shards
    python -m melp_ray.pretrain_text text.init=pretrained text.model=minilm
    python -m melp_ray.pretrain_text --export <checkpoint dir> --out <folder>   # export only

The same Ray Train + DeepSpeed machinery as stage 2 (``DeepSpeedRecipe``): one
deterministic Ray Data stream per rank (reports tokenised on data workers), MLM masking
drawn on the training worker from the per-micro-step generator (exact resume), ZeRO
checkpoints through ``ray.train.report``. The result is a Hugging Face folder
(``<storage>/<name>/hf_text_model``) that stage 2 loads as it is:

    python -m melp_ray.pretrain model.text_model=<folder> model.text_pretrained=true
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from melp_ray import storage
from melp_ray.distributed import sum_over_ranks
from melp_ray.config import (ConfigError, check_data_root, DataConfig, DeepSpeedConfig, RunConfig, TrainConfig,
                             data_problems, deepspeed_problems, from_dict, load_config, raise_if,
                             run_problems, train_problems)
from melp_ray.text.wordpiece import nfc
from melp_ray.train.metrics import worker_print
from melp_ray.train.recipe import DeepSpeedRecipe

DEFAULT_CONFIG = "text_tiny"
HF_FOLDER = "hf_text_model"          # <storage>/<name>/hf_text_model
TOKENIZER_FOLDER = "tokenizer"       # <storage>/<name>/tokenizer (scratch runs)
IGNORE = -100                        # label of positions that are not predicted
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the remaining 10% stay unchanged
VAL_MASK_SEED = 1_234_567            # validation masks: the same at every validation


# ---------------------------------------------------------------- config

@dataclass
class TextDataConfig:
    root: str | None = None          # prepared shards or a raw root; None: bundled PTB-XL
    dataset: str = "auto"            # auto | ptb-xl | mimic-iv-ecg (raw roots)
    use_reports: bool = True         # false: train on data.text_files only
    text_files: list[str] = field(default_factory=list)  # extra plain text, one document a line
    val_fraction: float = 0.1        # same subject-level split as stage 2 (same seed): no leakage
    shuffle_buffer: int = 256
    prefetch_batches: int = 4        # micro-batches fetched ahead, across epoch boundaries too
    limit: int | None = None         # at most this many records from data.root (smoke runs)


@dataclass
class TextModelConfig:
    init: str = "scratch"            # scratch: train a tokenizer + a new BERT | pretrained
    model: str = "minilm"            # init=pretrained: hub name, local folder or "minilm"
    tokenizer: str | None = None     # init=scratch: reuse this tokenizer folder (else trained)
    vocab_size: int = 8000           # init=scratch: WordPiece vocabulary size (upper bound)
    min_frequency: int = 2
    max_length: int = 128            # tokens per report incl. [CLS] and [SEP]
    mlm_probability: float = 0.15
    # init=scratch architecture (BertConfig); ignored for init=pretrained
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 512
    dropout: float = 0.1


@dataclass
class TextPretrainConfig:
    data: TextDataConfig = field(default_factory=TextDataConfig)
    text: TextModelConfig = field(default_factory=TextModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="melp-text"))

    def validate(self) -> None:
        raise_if(train_problems(self.train) + deepspeed_problems(self.deepspeed)
                 + run_problems(self.run) + text_data_problems(self.data)
                 + text_model_problems(self.text))


def text_data_problems(d: TextDataConfig) -> list[str]:
    # The checks the ECG DataConfig shares with this one.
    problems = data_problems(DataConfig(root=d.root, dataset=d.dataset, val_fraction=d.val_fraction,
                                        shuffle_buffer=d.shuffle_buffer,
                                        prefetch_batches=d.prefetch_batches))
    if d.val_fraction <= 0:
        problems.append("data.val_fraction must be > 0: stage 1 reports held-out MLM loss")
    if not d.use_reports and not d.text_files:
        problems.append("data.use_reports=false needs data.text_files")
    for path in d.text_files:
        if not storage.is_uri(path) and not os.path.isfile(os.path.expanduser(path)):
            problems.append(f"data.text_files: {path!r} is not a file")
    return problems


def text_model_problems(t: TextModelConfig) -> list[str]:
    problems = []
    if t.init not in ("scratch", "pretrained"):
        problems.append(f"text.init must be scratch or pretrained, got {t.init!r}")
    if t.init == "pretrained" and t.tokenizer is not None:
        problems.append("text.tokenizer is for init=scratch; a pretrained model brings its own")
    if not 0 < t.mlm_probability < 1:
        problems.append("text.mlm_probability must be in (0, 1)")
    if t.max_length < 4:
        problems.append("text.max_length must be >= 4")
    if t.init == "scratch":
        if t.vocab_size < 100:
            problems.append("text.vocab_size must be >= 100")
        if t.hidden_size % t.num_heads:
            problems.append("text.hidden_size must be divisible by text.num_heads")
        if t.max_length > t.max_position_embeddings:
            problems.append("text.max_length must be <= text.max_position_embeddings")
    return problems


def tokenizer_source(cfg: TextPretrainConfig) -> str:
    """Where the tokenizer lives: the pretrained model, or the (trained or given) scratch one."""
    if cfg.text.init == "pretrained":
        return cfg.text.model
    if cfg.text.tokenizer is None:
        raise ValueError("init=scratch without text.tokenizer: run prepare_tokenizer first")
    return cfg.text.tokenizer


# ---------------------------------------------------------------- model

def build_mlm_model(cfg: TextPretrainConfig, tokenizer, load_weights: bool = True):
    """A BertForMaskedLM-style model: pretrained (encoder weights loaded) or a new small BERT."""
    from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from melp_ray.tokenization import resolve_text_model_path

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


# ---------------------------------------------------------------- the recipe

class TextPretrainRecipe(DeepSpeedRecipe):
    """What stage 1 trains: a BERT-style masked language model on reports."""

    def setup(self) -> None:
        from melp_ray.text.wordpiece import load_tokenizer_folder

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


# ---------------------------------------------------------------- corpus and datasets

def corpus(cfg: TextPretrainConfig) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]}: reports of data.root (+ lines of data.text_files).

    Reports follow stage 2's subject-level split (same val_fraction and seed give the same
    held-out subjects); text-file lines are split by a hash of the line, so duplicates stay
    on one side. Order is fixed: the per-rank streams built from it are deterministic.
    """
    from melp_ray.data.sources import detect_layout, split_for_subject
    from melp_ray.data.stream import list_splits, resolve_root, shard_files

    d, seed = cfg.data, cfg.train.seed
    texts: dict[str, list[str]] = {"train": [], "val": []}
    if d.use_reports:
        root = resolve_root(d.root)
        layout = detect_layout(root) if d.dataset == "auto" else d.dataset
        if layout == "shards":
            import pyarrow.parquet as pq

            for split in texts:
                reports = [r for f in shard_files(root, split)
                           for r in pq.read_table(f, columns=["report"]).column("report").to_pylist()]
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


def prepare_tokenizer(cfg: TextPretrainConfig) -> TextPretrainConfig:
    """init=scratch: train the WordPiece tokenizer on the train split once per run.

    It is saved under the run folder; a re-run (resume) finds it there and reuses it, so a
    resumed run keeps its vocabulary. Returns the config with ``text.tokenizer`` set.
    """
    from melp_ray.text.wordpiece import save_tokenizer, train_wordpiece, unk_rate
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


# ---------------------------------------------------------------- export

def export_hf_model(checkpoint: str, out: str) -> str:
    """Checkpoint (local folder or URI) -> Hugging Face folder: config, safetensors, tokenizer."""
    from melp_ray.checkpoint import checkpoint_config, consolidated_state_dict
    from melp_ray.text.wordpiece import load_tokenizer_folder

    cfg = from_dict(TextPretrainConfig, checkpoint_config(checkpoint))
    tokenizer = load_tokenizer_folder(tokenizer_source(cfg))
    model = build_mlm_model(cfg, tokenizer, load_weights=False)
    weights = consolidated_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = tied_parameter_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    if storage.is_uri(out):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            storage.copy_folder(tmp, out)
    else:
        out = os.path.expanduser(out)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (e.g. the MLM decoder = word embeddings)."""
    first: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        else:
            first[id(p)] = name
    return tied


# ---------------------------------------------------------------- driver

def run(cfg: TextPretrainConfig, out: str | None = None, callbacks: list | None = None
        ) -> dict[str, Any]:
    """Train (or resume), export the final checkpoint as a HF folder; returns the summary."""
    from melp_ray.ray_utils import init_ray, quiet_data_progress_bars
    from melp_ray.text.wordpiece import load_tokenizer_folder
    from melp_ray.train.launcher import fit_and_summarise
    from melp_ray.train.metrics import run_dir

    if cfg.data.use_reports:
        check_data_root(cfg.data)
    init_ray()
    quiet_data_progress_bars()
    cfg = prepare_tokenizer(cfg)
    tokenizer = load_tokenizer_folder(tokenizer_source(cfg))
    out = out or storage.join(run_dir(cfg), HF_FOLDER)
    summary = fit_and_summarise(cfg, TextPretrainRecipe, build_datasets(cfg, tokenizer),
                                extra_summary={"text_init": cfg.text.init,
                                               "tokenizer": tokenizer_source(cfg),
                                               "vocab_size": len(tokenizer)},
                                callbacks=callbacks)
    if cfg.train.stop_at_step is None or cfg.train.stop_at_step >= cfg.train.max_steps:
        summary["hf_text_model"] = export_hf_model(summary["last_checkpoint"], out)
        storage.write_json(storage.join(run_dir(cfg), "summary.json"), summary)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from melp_ray.config import config_keys

    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.pretrain_text",
        description="Stage 1: masked-language modelling of a BERT on the report corpus "
                    "(Ray Train + DeepSpeed), exported as a Hugging Face folder.",
        epilog="Overrides are key=value pairs over the config, e.g. text.init=pretrained "
               "text.model=minilm train.max_steps=200. Keys: "
               + ", ".join(config_keys(TextPretrainConfig)))
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML file, or a shipped config name (text_tiny, text_base). "
                             "Default: text_tiny")
    parser.add_argument("--out", default=None,
                        help="where to write the Hugging Face folder "
                             "(default: <storage>/<name>/hf_text_model)")
    parser.add_argument("--export", metavar="CHECKPOINT", default=None,
                        help="only export this checkpoint folder (needs --out); no training")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export:
        if not args.out:
            print("error: --export needs --out", file=sys.stderr)
            return 2
        print(f"[melp_ray] wrote {export_hf_model(args.export, args.out)}")
        return 0
    try:
        cfg = load_config(TextPretrainConfig, args.config, args.overrides)
        if cfg.data.use_reports:
            check_data_root(cfg.data)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = run(cfg, out=args.out)
    print("[melp_ray] summary:\n" + json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    # Run the copy imported under its package name: Ray pickles the recipe and the data
    # functions by reference, and workers cannot import them from `__main__`.
    from melp_ray.pretrain_text import main as _main

    sys.exit(_main())
