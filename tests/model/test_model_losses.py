"""The three MELP losses: distributed rhythm loss (2 real gloo processes), beat loss, token loss."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from melp_ray.model.losses import (MELPLoss, beat_loss, compute_losses, gather_with_grad,
                             rhythm_loss, token_loss)

WORKER = Path(__file__).with_name("model_ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- rhythm (CLIP) loss
def test_rhythm_loss_single_process_matches_clip_formula():
    torch.manual_seed(0)
    ecg = F.normalize(torch.randn(6, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor([14.0])
    logits = scale * ecg @ text.T
    by_hand = -(logits.log_softmax(1).diag().mean() + logits.T.log_softmax(1).diag().mean()) / 2
    torch.testing.assert_close(rhythm_loss(ecg, text, scale), by_hand)
    assert gather_with_grad(ecg) is ecg  # identity without torch.distributed
    # Perfectly aligned, well separated pairs give a lower loss than shuffled ones.
    assert rhythm_loss(ecg, ecg, scale) < rhythm_loss(ecg, ecg.roll(1, 0), scale)


def test_same_report_positives_match_soft_target_formula():
    """Identical reports are each other's positives: the target mass of a row is spread
    evenly over them; with no repeated report the loss is the plain one."""
    torch.manual_seed(0)
    ecg = F.normalize(torch.randn(6, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor([14.0])
    distinct = torch.arange(6 * 3).reshape(6, 3)
    torch.testing.assert_close(rhythm_loss(ecg, text, scale, distinct), rhythm_loss(ecg, text, scale))

    keys = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [1, 2], [3, 4]])  # 0=2=4, 1=5
    logits = scale * ecg @ text.T
    by_hand = 0.0
    for i in range(6):
        positives = [j for j in range(6) if torch.equal(keys[i], keys[j])]
        by_hand += -(logits[i].log_softmax(0)[positives].mean()
                     + logits.T[i].log_softmax(0)[positives].mean()) / 2
    torch.testing.assert_close(rhythm_loss(ecg, text, scale, keys), by_hand / 6)
    # It is not the plain loss: repeats no longer count as negatives.
    assert not torch.isclose(rhythm_loss(ecg, text, scale, keys), rhythm_loss(ecg, text, scale))
    # compute_losses takes the keys from the captioning labels (the report's token ids).
    out = {"ecg_emb": ecg, "text_emb": text, "logit_scale": scale, "labels": keys,
           "logits": torch.zeros(6, 2, 7), "beat_emb": torch.randn(6, 3, 8),
           "sentence_emb": torch.randn(6, 2, 8), "sentence_mask": torch.ones(6, 2, dtype=torch.bool)}
    torch.testing.assert_close(compute_losses(out, same_report_positives=True)["rhythm"],
                               rhythm_loss(ecg, text, scale, keys))


def rhythm_case(repeats: bool) -> tuple[dict, dict]:
    """A tiny two-tower batch of 8 for the 2-rank run, and its one-process reference: the
    full-batch loss and gradients (parameters and inputs)."""
    torch.manual_seed(0)
    batch, d_in, d_emb = 8, 5, 6
    # float64: the all-reduce sums in another order than the single process does; in float32
    # that alone moved one gradient element by 2.8e-7 (a CI failure), in float64 by ~1e-16.
    dtype = torch.float64
    ecg_proj = torch.nn.Linear(d_in, d_emb, dtype=dtype)
    text_proj = torch.nn.Linear(d_in, d_emb, dtype=dtype)
    logit_scale = torch.nn.Parameter(torch.full((1,), math.log(1 / 0.07), dtype=dtype))
    case = {"kind": "rhythm", "ecg_in": torch.randn(batch, d_in, dtype=dtype),
            "text_in": torch.randn(batch, d_in, dtype=dtype),
            "ecg_weight": ecg_proj.weight.detach().clone(), "ecg_bias": ecg_proj.bias.detach().clone(),
            "text_weight": text_proj.weight.detach().clone(),
            "text_bias": text_proj.bias.detach().clone(),
            "logit_scale": logit_scale.detach().clone()}
    # Repeated reports across the two ranks' halves (rows 0, 5, 6 and rows 2, 3).
    keys = torch.tensor([[1], [2], [3], [3], [4], [1], [1], [5]]) if repeats else None
    if repeats:
        case["report_keys"] = keys

    ecg_in = case["ecg_in"].clone().requires_grad_(True)
    text_in = case["text_in"].clone().requires_grad_(True)
    full_loss = rhythm_loss(F.normalize(ecg_proj(ecg_in), dim=-1),
                            F.normalize(text_proj(text_in), dim=-1), logit_scale.exp(), keys)
    full_loss.backward()
    full = {"loss": full_loss.detach(), "ecg_in_grad": ecg_in.grad, "text_in_grad": text_in.grad,
            "grads": {"ecg_weight": ecg_proj.weight.grad, "ecg_bias": ecg_proj.bias.grad,
                      "text_weight": text_proj.weight.grad, "text_bias": text_proj.bias.grad,
                      "logit_scale": logit_scale.grad}}
    return case, full


def token_case() -> tuple[dict, dict]:
    """Unequal padding per rank (rank 0 holds 2 + 7 real tokens, rank 1 holds 4 + 6), and
    the one-process reference: the per-token mean of the whole batch and its gradient."""
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11)
    labels = torch.randint(0, 11, (4, 7))
    labels[0, 2:] = -100
    labels[2, 4:] = -100
    labels[3, 6:] = -100
    full = logits.clone().requires_grad_(True)
    full_loss = token_loss(full, labels)
    full_loss.backward()
    return {"kind": "token", "logits": logits, "labels": labels}, {"loss": full_loss.detach(),
                                                                     "grad": full.grad}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """Every case through one spawn of 2 gloo ranks: {case: (reference, [rank 0, rank 1])}."""
    folder = tmp_path_factory.mktemp("ddp")
    cases = {"plain": rhythm_case(False), "same_report_positives": rhythm_case(True),
             "token": token_case()}
    for name, (case, _) in cases.items():
        torch.save(case, folder / f"{name}.pt")
    done = subprocess.run([sys.executable, str(WORKER), *(str(folder / f"{n}.pt") for n in cases)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (full, [torch.load(folder / f"{name}.rank{r}.pt") for r in range(2)])
            for name, (_, full) in cases.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "same_report_positives"])
def test_rhythm_loss_two_gloo_processes_equal_full_batch(two_ranks, case):
    full, ranks = two_ranks[case]
    # Loss: the mean of the per-rank losses is the full-batch loss.
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    torch.testing.assert_close(mean_loss, full["loss"], rtol=1e-10, atol=1e-10)
    # The two halves really differ (each rank scores different rows).
    assert abs(ranks[0]["loss"].item() - ranks[1]["loss"].item()) > 1e-4
    # Parameter gradients after DDP averaging equal the full-batch gradients, on every rank.
    for rank in ranks:
        for name, grad in full["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-10, atol=1e-12)
    # Input gradients: each rank holds world_size x d(full loss)/d(its rows); the
    # 1/world_size of the parameter averaging is what turns them into the full gradient.
    for rank in ranks:
        rows = slice(*rank["rows"])
        torch.testing.assert_close(rank["ecg_in_grad"] / 2, full["ecg_in_grad"][rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["text_in_grad"] / 2, full["text_in_grad"][rows], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_token_loss_two_gloo_processes_equal_full_batch(two_ranks):
    """Unequal padding per rank: the loss is still the per-token mean of the whole batch."""
    full, ranks = two_ranks["token"]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, full["loss"])
    for rank in ranks:   # after the 1/W gradient averaging: the full-batch gradient
        torch.testing.assert_close(rank["grad"] / 2, full["grad"][slice(*rank["rows"])])


# ---------------------------------------------------------------- beat (local) loss
def _aligned_example(batch=6, beats=4, dim=16, noise=0.1, seed=0):
    """Sentence s of report i is a noisy copy of one beat of ECG i: a known alignment."""
    g = torch.Generator().manual_seed(seed)
    beat_emb = torch.randn(batch, beats, dim, generator=g)
    sentence_emb = torch.stack([beat_emb[:, 0], beat_emb[:, 2], beat_emb[:, 3]], dim=1)
    sentence_emb = sentence_emb + noise * torch.randn(sentence_emb.shape, generator=g)
    mask = torch.ones(batch, 3, dtype=torch.bool)
    mask[1, 2] = False  # reports have different sentence counts
    mask[4, 1:] = False
    return beat_emb, sentence_emb, mask


def test_beat_loss_is_invariant_to_batch_order():
    beat_emb, sentence_emb, mask = _aligned_example()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(beat_loss(beat_emb, sentence_emb, mask),
                               beat_loss(beat_emb[perm], sentence_emb[perm], mask[perm]))


def test_beat_loss_lower_for_aligned_than_shuffled_pairs():
    beat_emb, sentence_emb, mask = _aligned_example()
    aligned = beat_loss(beat_emb, sentence_emb, mask)
    derangement = torch.tensor([1, 2, 3, 4, 5, 0])
    shuffled = beat_loss(beat_emb, sentence_emb[derangement], mask[derangement])
    assert aligned < 0.5 * shuffled, (aligned, shuffled)
    assert aligned < math.log(6)  # better than chance


def test_beat_loss_with_empty_reports_is_finite_and_drops_those_pairs():
    beat_emb, sentence_emb, mask = _aligned_example()
    mask[[1, 4]] = False  # two reports without any sentence
    beat_emb.requires_grad_(True)
    loss = beat_loss(beat_emb, sentence_emb, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(beat_emb.grad).all()
    assert beat_emb.grad[[1, 4]].abs().max() == 0  # the dropped pairs take no part
    keep = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(loss, beat_loss(beat_emb[keep], sentence_emb[keep], mask[keep]))
    # Not the reference behaviour (drop rows only): that scores report i against ECG i-shifts.
    # No usable pair at all: zero, still attached to the graph.
    empty = beat_loss(beat_emb, sentence_emb, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_beat_loss_temperatures_matter():
    beat_emb, sentence_emb, mask = _aligned_example()
    base = beat_loss(beat_emb, sentence_emb, mask)
    assert not torch.isclose(base, beat_loss(beat_emb, sentence_emb, mask, scale=1.0))
    assert not torch.isclose(base, beat_loss(beat_emb, sentence_emb, mask, attn_temp=1.0))
    assert not torch.isclose(base, beat_loss(beat_emb, sentence_emb, mask, sim_temp=1.0))


# ---------------------------------------------------------------- token loss + combination
def test_token_loss_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, 4, 5, -100, -100], [1, 2, -100, -100, -100]])
    expected = F.cross_entropy(logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(token_loss(logits, labels), expected)
    changed = logits.clone()
    changed[labels == -100] = 100.0  # padding positions may hold anything
    torch.testing.assert_close(token_loss(changed, labels), expected)


def test_compute_losses_weights_only_the_total():
    beat_emb, sentence_emb, mask = _aligned_example()
    torch.manual_seed(0)
    out = {"ecg_emb": F.normalize(torch.randn(6, 16), dim=-1),
           "text_emb": F.normalize(torch.randn(6, 16), dim=-1),
           "logit_scale": torch.tensor([1 / 0.07]),
           "logits": torch.randn(6, 7, 30), "labels": torch.randint(0, 30, (6, 7)),
           "beat_emb": beat_emb, "sentence_emb": sentence_emb, "sentence_mask": mask}
    default = compute_losses(out)
    torch.testing.assert_close(
        default["total"], default["rhythm"] + 2.0 * default["token"] + 0.2 * default["beat"])
    other = MELPLoss(rhythm=0.5, token=1.0, beat=3.0)(out)
    for part in ("rhythm", "token", "beat"):
        torch.testing.assert_close(other[part], default[part])  # components are unweighted
    torch.testing.assert_close(other["total"],
                               0.5 * other["rhythm"] + other["token"] + 3.0 * other["beat"])
    assert not torch.isclose(other["total"], default["total"])


def _gloria_loop_reference(beat_emb, sentence_emb, mask, t1=4.0, t2=5.0, t3=10.0):
    """GLoRIA's local loss written report by report, the way the reference loops (own code).

    For each report: raw dot products with every ECG's beats, softmax over the report's
    sentences, x t1, softmax over the beats, context from the raw beats, cosine, exp(t2 .)
    summed over sentences, log; x t3; symmetric cross-entropy.
    """
    n = beat_emb.shape[0]
    scores = torch.empty(n, n)
    for i in range(n):
        sents = sentence_emb[i][mask[i]]                              # (S_i, D)
        for j in range(n):
            dots = sents @ beat_emb[j].T                              # (S_i, K)
            attn = torch.softmax(dots, dim=0)                         # over the sentences
            attn = torch.softmax(attn * t1, dim=1)                    # then over the beats
            context = attn @ beat_emb[j]                              # (S_i, D)
            cos = torch.nn.functional.cosine_similarity(sents, context, dim=-1)
            scores[i, j] = t3 * torch.log(torch.exp(t2 * cos).sum())
    labels = torch.arange(n)
    return (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)) / 2


def test_beat_loss_is_gloria_double_softmax_over_raw_embeddings():
    beat_emb, sentence_emb, mask = _aligned_example(noise=0.5)
    # Unnormalised inputs of different scales: the attention must use the raw dot products.
    beat_emb, sentence_emb = beat_emb * 3.0, sentence_emb * 0.5
    torch.testing.assert_close(beat_loss(beat_emb, sentence_emb, mask),
                               _gloria_loop_reference(beat_emb, sentence_emb, mask))
