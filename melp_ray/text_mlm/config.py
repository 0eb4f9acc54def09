"""Stage 1's config: the ``data`` and ``text`` sections, their checks, and the whole config.

``train``, ``deepspeed`` and ``run`` are stage 2's sections (melp_ray.config), checked the same
way; ``TextPretrainConfig.validate`` runs every check and raises one ConfigError listing them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from melp_ray.utils import storage
from melp_ray.config_sections import (DataConfig, DeepSpeedConfig, RunConfig, TrainConfig, data_problems,
                                      deepspeed_problems, raise_if, run_problems, train_problems)


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
        init_from = (["train.init_from is for ECG-language pretraining (python -m "
                      "melp_ray.pretrain); stage 1 starts from text.model"]
                     if self.train.init_from is not None else [])
        if self.train.elastic:
            init_from.append("train.num_workers: a range (an elastic run) is for ECG-language "
                             "pretraining only; stage 1 takes a fixed worker count")
        raise_if(train_problems(self.train) + deepspeed_problems(self.deepspeed)
                 + run_problems(self.run) + text_data_problems(self.data)
                 + text_model_problems(self.text) + init_from)


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
