"""A tiny MELP overfits 8 real PTB-XL ECG-report pairs, then captions them from the ECG alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import wfdb

from melp_ray.text import report_ids
from melp_ray.model.losses import compute_losses
from melp_ray.model import MELP, model_config_from_preset

pytestmark = pytest.mark.slow   # real end-to-end runs: minutes (pytest -m 'not slow' skips)

REPO = Path(__file__).resolve().parents[2]
N_PAIRS, STEPS = 8, 60


def ptbxl_root() -> Path:
    """The real PTB-XL sample shipped in the package."""
    from melp_ray.data.sources import bundled_root

    return Path(bundled_root())


def read_pairs(root: Path, n: int) -> tuple[torch.Tensor, list[str]]:
    """n records (100 Hz, 12 x 1000) with distinct reports, each min-max scaled to [0, 1]."""
    db = pd.read_csv(root / "ptbxl_database.csv")
    db = db[db["report"].str.split().str.len() >= 3].drop_duplicates("report").head(n)
    signals = []
    for filename in db["filename_lr"]:
        signal, _ = wfdb.rdsamp(str(root / filename))  # (1000, 12), PTB-XL's lead order
        signal = np.nan_to_num(signal.T.astype(np.float32))
        signals.append((signal - signal.min()) / max(signal.max() - signal.min(), 1e-6))
    return torch.from_numpy(np.stack(signals)), db["report"].tolist()


@pytest.fixture(scope="module")
def trained():
    ecg, reports = read_pairs(ptbxl_root(), N_PAIRS)
    tiny = model_config_from_preset("tiny")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg = model_config_from_preset("tiny", dropout=0.0,
                                   text_overrides={**tiny.text_overrides, **no_dropout})
    torch.manual_seed(0)
    model = MELP(cfg).train()
    arrays = report_ids.encode_reports(model.tokenizer, reports, cfg.max_text_length)
    longest = int(arrays["attention_mask"].sum(1).max())  # trim shared padding: faster steps
    batch = {k: torch.from_numpy(v[:, :longest]) for k, v in arrays.items()}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(STEPS):
        losses = compute_losses(model(ecg, **batch))
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    return model, ecg, reports, history


def test_tiny_model_overfits_real_ptbxl_pairs(trained):
    _, _, _, history = trained
    first, last = history[0], history[-1]
    print(f"loss {first['total']:.2f} -> {last['total']:.2f}; "
          + ", ".join(f"{k} {first[k]:.2f} -> {last[k]:.2f}" for k in ("rhythm", "token", "beat")))
    assert all(np.isfinite(h["total"]) for h in history)
    assert last["total"] < 0.5 * first["total"]
    assert last["token"] < 0.5 * first["token"]
    assert last["rhythm"] < first["rhythm"]


def test_greedy_generation_reproduces_training_reports(trained):
    model, ecg, reports, _ = trained
    generated = model.generate(ecg)
    assert isinstance(generated, list) and len(generated) == len(reports)
    assert all(isinstance(text, str) for text in generated)
    assert model.training  # generate() restores the mode it found
    # Compare in the tokenizer's own normal form (MiniLM is uncased and strips accents).
    tok = model.tokenizer
    known = [tok.decode(tok(r, add_special_tokens=False)["input_ids"]) for r in reports]
    print("generated:", generated)
    for text in generated:
        assert len(text.split()) >= 2
        assert any(k.startswith(text) for k in known), f"{text!r} is not from a training report"
    assert sum(text in known for text in generated) >= len(generated) // 2
