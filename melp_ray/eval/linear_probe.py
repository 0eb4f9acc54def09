"""Linear probing on frozen features: one linear layer, BCE-with-logits, AdamW.

Protocol (MELP): train on 1 %, 10 % or 100 % of the training split, pick the epoch with
the best validation macro AUROC (early stopping with patience), report macro AUROC on test.

Choices made here
-----------------
* Subsampling (``subsample_indices``) is seeded and deterministic. It first draws one
  random positive for every class that has positives (rarest class first, skipping classes
  already covered), then fills up to ``ceil(fraction * N)`` rows from a random permutation
  of the rest. So every class with a positive in the full split has one in the subset,
  and the subset may exceed the target size by at most the number of classes.
* Standardisation statistics (mean, std) come from the rows actually used for training,
  so nothing about the other rows leaks into the low-label runs.
* Early stopping works in *rounds*: whole epochs adding up to at least
  ``min_steps_per_round`` optimizer steps, then one validation. With 1 % of a small split
  an epoch is a single step, and per-epoch patience would stop long before a linear layer
  at lr 1e-3 has moved.
* Training is deterministic for a given seed (seeded init and batch order, CPU float32,
  one intra-op thread: the problem is tiny and extra threads only contend).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from melp_ray.eval.metrics import bootstrap_ci, macro_auroc, scorable_classes, skipped_classes

FRACTIONS = (0.01, 0.1, 1.0)


def subsample_indices(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded ``fraction`` of ``labels`` (N, C) (see module doc)."""
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"labels must be (N, C), got {y.shape}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = y.shape[0]
    if fraction == 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    covered = np.zeros(y.shape[1], dtype=bool)
    positives_per_class = y.sum(axis=0)
    for c in np.argsort(positives_per_class, kind="stable"):  # rarest first
        if positives_per_class[c] == 0 or covered[c]:
            continue
        row = int(rng.choice(np.flatnonzero(y[:, c] == 1)))
        chosen.append(row)
        covered |= y[row] == 1
    target = max(math.ceil(fraction * n), 1)
    rest = rng.permutation(np.setdiff1d(np.arange(n), chosen))
    extra = rest[: max(target - len(chosen), 0)]
    return np.sort(np.concatenate([np.asarray(chosen, dtype=int), extra]))


@dataclass
class ProbeConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    max_rounds: int = 200
    min_steps_per_round: int = 20
    patience: int = 10  # rounds without a better validation macro AUROC
    seed: int = 0


@dataclass
class ProbeResult:
    macro_auroc: float
    per_class: dict[str, float]
    skipped: list[str]
    ci: list[float]
    best_round: int
    best_val_auroc: float
    n_train: int
    fraction: float
    test_scores: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the score matrix)."""
        return {"macro_auroc": self.macro_auroc, "per_class": self.per_class,
                "skipped": self.skipped, "ci": self.ci, "best_round": self.best_round,
                "best_val_auroc": self.best_val_auroc, "n_train": self.n_train,
                "fraction": self.fraction}


class Standardizer:
    """Per-feature (x - mean) / std with statistics from one matrix."""

    def __init__(self, x: np.ndarray, eps: float = 1e-6):
        self.mean = x.mean(axis=0)
        self.std = np.maximum(x.std(axis=0), eps)  # constant features stay finite

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x - self.mean) / self.std, dtype=torch.float32)


def _check_split(name: str, x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: need features (N, F) and labels (N, C), got {x.shape} {y.shape}")
    return x, y


def _predict(layer: nn.Linear, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return layer(x).numpy().astype(np.float64)


def _val_auroc(y_val: np.ndarray, logits: np.ndarray, keep: np.ndarray) -> float:
    return macro_auroc(y_val[:, keep], logits[:, keep])[0]


def _epochs_per_round(n_rows: int, cfg: ProbeConfig) -> int:
    steps_per_epoch = math.ceil(n_rows / cfg.batch_size)
    return math.ceil(cfg.min_steps_per_round / steps_per_epoch)


def _train(layer: nn.Linear, x_train: torch.Tensor, y_train: torch.Tensor,
           x_val: torch.Tensor, y_val: np.ndarray, cfg: ProbeConfig) -> tuple[int, float]:
    """AdamW + BCE with early stopping; leaves ``layer`` at its best validation round."""
    keep = scorable_classes(y_val)
    if not keep.any():
        raise ValueError("validation labels have no class with both positives and negatives; "
                         "early stopping on validation AUROC is impossible")
    optimizer = torch.optim.AdamW(layer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    order_rng = torch.Generator().manual_seed(cfg.seed)
    epochs_per_round = _epochs_per_round(len(x_train), cfg)
    best = (-1, -math.inf, {k: v.clone() for k, v in layer.state_dict().items()})
    for round_ in range(cfg.max_rounds):
        for _ in range(epochs_per_round):
            for batch in torch.randperm(len(x_train), generator=order_rng).split(cfg.batch_size):
                optimizer.zero_grad()
                loss_fn(layer(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
        score = _val_auroc(y_val, _predict(layer, x_val), keep)
        if score > best[1]:
            best = (round_, score, {k: v.clone() for k, v in layer.state_dict().items()})
        elif round_ - best[0] >= cfg.patience:
            break
    layer.load_state_dict(best[2])
    return best[0], best[1]


class _single_thread:
    """Run torch with one intra-op thread, restoring the previous setting."""

    def __enter__(self):
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)


def train_linear_probe(train_x, train_y, val_x, val_y, test_x, test_y,
                       class_names=None, fraction: float = 1.0,
                       config: ProbeConfig | None = None, n_bootstrap: int = 1000
                       ) -> ProbeResult:
    """Fit a linear probe on a ``fraction`` of the training split; evaluate on test."""
    cfg = config or ProbeConfig()
    train_x, train_y = _check_split("train", train_x, train_y)
    val_x, val_y = _check_split("val", val_x, val_y)
    test_x, test_y = _check_split("test", test_x, test_y)
    rows = subsample_indices(train_y, fraction, seed=cfg.seed)
    standardize = Standardizer(train_x[rows])
    with torch.random.fork_rng(devices=[]):  # seeded init without touching global RNG
        torch.manual_seed(cfg.seed)
        layer = nn.Linear(train_x.shape[1], train_y.shape[1])
    with _single_thread():
        best_round, best_val = _train(layer, standardize(train_x[rows]),
                                      torch.as_tensor(train_y[rows]), standardize(val_x),
                                      val_y, cfg)
        test_scores = _predict(layer, standardize(test_x))
    macro, per_class = macro_auroc(test_y, test_scores, class_names)
    low, high = bootstrap_ci(test_y, test_scores, n=n_bootstrap, seed=cfg.seed)
    return ProbeResult(macro_auroc=macro, per_class=per_class,
                       skipped=skipped_classes(test_y, class_names), ci=[low, high],
                       best_round=best_round, best_val_auroc=best_val, n_train=len(rows),
                       fraction=fraction, test_scores=test_scores)
