"""MELP's three objectives, one per time scale.

- rhythm: CLIP-style symmetric InfoNCE between the ECG rhythm embedding and the report
  embedding, negatives from the whole global batch (all-gather with gradient); optionally,
  pairs whose reports are word for word the same count as positives, not negatives;
- token:  captioning cross-entropy of the multimodal decoder, padding ignored;
- beat:   GLoRIA-style local alignment between sentences and beat embeddings, per rank.

``compute_losses`` (or ``MELPLoss``) combines them: components unweighted, ``total`` weighted.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from melp_ray.utils.distributed import sum_over_ranks, world


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    The backward pass sums, over ranks, the gradients that each rank's loss puts on this
    rank's slice, so every rank gets the gradient of the *sum* of all ranks' losses.
    Every rank must pass the same shape (use equal local batch sizes, e.g. drop_last).
    """
    if world()[1] == 1:
        return x
    # torch's functional all-gather: differentiable, its backward a summing reduce-scatter
    # (torch.distributed.nn.functional.all_gather, which does the same, is deprecated).
    from torch.distributed._functional_collectives import all_gather_single

    return all_gather_single(x.contiguous(), 0, dist.group.WORLD)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0, without gradient (report keys, validation
    embeddings and labels)."""
    n = world()[1]
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def same_report_targets(report_keys: torch.Tensor, all_keys: torch.Tensor) -> torch.Tensor:
    """(b, N) soft targets: each row spreads its mass evenly over the columns whose report
    (a row of token ids) is identical to its own, the pair itself included."""
    same = (report_keys[:, None, :] == all_keys[None, :, :]).all(dim=-1).float()
    return same / same.sum(dim=1, keepdim=True)


def rhythm_loss(ecg_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                report_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch.

    Each rank scores its b local rows against all W·b gathered columns; the positive of local
    row i is global column rank·b + i. The per-rank loss is the mean over its local rows, so
    the mean of the W per-rank losses is exactly the full-batch loss. Gradients also match:
    the gather's backward hands each rank W × (d full loss / d its embeddings), and the
    1/W averaging that DDP / DeepSpeed apply to parameter gradients cancels the W.

    ``report_keys`` (b, L): one row of token ids per report. When given, the ECGs of
    identical reports are all positives of each other's report (soft targets) instead of
    negatives: PTB-XL and machine-read MIMIC reports repeat word for word ("sinus rhythm.
    normal ecg."), and pushing ECGs with the same diagnosis apart is what spreads them by
    chance rather than by content. With no repeats the loss equals the plain one.
    """
    rank, _ = world()
    all_ecg, all_text = gather_with_grad(ecg_emb), gather_with_grad(text_emb)
    logits_per_ecg = logit_scale * ecg_emb @ all_text.T   # (b, W·b)
    logits_per_text = logit_scale * text_emb @ all_ecg.T  # (b, W·b)
    if report_keys is None:
        targets = torch.arange(ecg_emb.shape[0], device=ecg_emb.device) + rank * ecg_emb.shape[0]
    else:
        # The same report matrix serves both directions: "same report" is symmetric.
        targets = same_report_targets(report_keys, gather_no_grad(report_keys)).to(logits_per_ecg.dtype)
    return (F.cross_entropy(logits_per_ecg, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def token_loss(logits: torch.Tensor, labels: torch.Tensor,
               count: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy per token of the *global* batch; -100 (padding) is ignored.

    Ranks hold different numbers of real tokens, so a per-rank mean would weight tokens
    unequally. Each rank divides its summed loss by the global token count (times W, which
    the 1/W gradient averaging of DDP / DeepSpeed and the mean over ranks cancel): the
    result is exactly the single-process loss of the whole batch, for any worker count.
    ``count``: that divisor given (gradient caching: the tokens of all micro-batches of the
    optimizer step over W, so the micro-batches' losses add up to the step's loss).
    """
    # ``MELP.forward``'s logits stop at the batch's longest report; its labels go on, all padding.
    labels = labels[:, :logits.shape[1]]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    if count is None:
        count = token_count_per_rank(labels)
    return total / count.to(total.dtype).clamp(min=1)


def token_count_per_rank(labels: torch.Tensor) -> torch.Tensor:
    """Real (non-padding) tokens of ``labels`` on all ranks, divided by the world size."""
    count = labels.ne(-100).sum().float()
    _, n = world()
    if n > 1:
        count = sum_over_ranks(count.detach().clone()) / n
    return count


def beat_logits(beat_emb: torch.Tensor, sentence_emb: torch.Tensor, sentence_mask: torch.Tensor,
                attn_temp: float = 4.0, sim_temp: float = 5.0, scale: float = 10.0) -> torch.Tensor:
    """(n_reports, n_ecgs) report-to-ECG scores from sentence-to-beat alignment (GLoRIA).

    For report i and ECG j, with raw (unnormalised) sentence and beat embeddings:
    a = dot(sentence s of i, beat k of j), softmax over the *sentences* of i, times
    ``attn_temp``, then softmax over the beats (GLoRIA's double softmax); the beat context
    c_ijs = sum_k a_sk beat_k; the score is scale * log sum_s exp(sim_temp * cos(s, c_ijs))
    over the real sentences of report i. Every report must have at least one sentence.
    """
    real = sentence_mask[:, None, :, None]                               # (I, 1, S, 1)
    dots = torch.einsum("isd,jkd->ijsk", sentence_emb, beat_emb)       # (I, J, S, K)
    attention = dots.masked_fill(~real, float("-inf")).softmax(dim=2)  # over sentences
    attention = (attention * attn_temp).softmax(dim=-1)               # then over the beats
    context = torch.einsum("ijsk,jkd->ijsd", attention, beat_emb)      # (I, J, S, D)
    similarity = F.cosine_similarity(sentence_emb.unsqueeze(1), context, dim=-1)  # (I, J, S)
    similarity = (sim_temp * similarity).masked_fill(~sentence_mask.unsqueeze(1), float("-inf"))
    return scale * torch.logsumexp(similarity, dim=-1)  # log sum_s exp(...)


def beat_loss(beat_emb: torch.Tensor, sentence_emb: torch.Tensor, sentence_mask: torch.Tensor,
              attn_temp: float = 4.0, sim_temp: float = 5.0, scale: float = 10.0) -> torch.Tensor:
    """Symmetric cross-entropy over the local batch of report-to-ECG beat scores.

    Pairs whose report has no sentence are left out of the batch entirely (their row AND
    their column), so pair i still matches ECG i. The reference drops only the empty rows
    of the score matrix: the rows then no longer line up with the columns and the targets
    arange(n) point at the wrong ECGs. With fewer than one usable pair the loss is 0 (with
    a graph, so every parameter still receives a - zero - gradient).
    """
    usable = sentence_mask.any(dim=1)
    if not usable.any():
        return 0.0 * (beat_emb.sum() + sentence_emb.sum())
    logits = beat_logits(beat_emb[usable], sentence_emb[usable], sentence_mask[usable],
                         attn_temp, sim_temp, scale)  # (reports, ECGs)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def compute_losses(out: dict[str, torch.Tensor], rhythm: float = 1.0, token: float = 2.0,
                   beat: float = 0.2, attn_temp: float = 4.0, sim_temp: float = 5.0,
                   scale: float = 10.0, same_report_positives: bool = False,
                   rhythm_value: torch.Tensor | None = None,
                   token_count: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All three losses from ``MELP.forward``'s output: unweighted parts + weighted ``total``.
    ``same_report_positives``: see ``rhythm_loss`` (the report's key is its token labels).
    ``rhythm_value``: the rhythm loss already computed (gradient caching), not recomputed
    from ``out``; ``token_count``: see ``token_loss``."""
    keys = out["labels"] if same_report_positives else None
    if rhythm_value is None:
        rhythm_value = rhythm_loss(out["ecg_emb"], out["text_emb"], out["logit_scale"], keys)
    parts = {
        "rhythm": rhythm_value,
        "token": token_loss(out["logits"], out["labels"], token_count),
        "beat": beat_loss(out["beat_emb"], out["sentence_emb"], out["sentence_mask"],
                          attn_temp, sim_temp, scale),
    }
    parts["total"] = rhythm * parts["rhythm"] + token * parts["token"] + beat * parts["beat"]
    return parts


class MELPLoss(nn.Module):
    """``compute_losses`` with its weights and temperatures fixed at construction."""

    def __init__(self, rhythm: float = 1.0, token: float = 2.0, beat: float = 0.2,
                 attn_temp: float = 4.0, sim_temp: float = 5.0, scale: float = 10.0,
                 same_report_positives: bool = False):
        super().__init__()
        self.kwargs = dict(rhythm=rhythm, token=token, beat=beat, attn_temp=attn_temp,
                           sim_temp=sim_temp, scale=scale,
                           same_report_positives=same_report_positives)

    @classmethod
    def from_model_config(cls, cfg, **weights: float) -> MELPLoss:
        """Temperatures from a ``ModelConfig``; weights (rhythm/token/beat) and
        ``same_report_positives`` as keywords."""
        return cls(attn_temp=cfg.beat_attention_temperature,
                   sim_temp=cfg.beat_similarity_temperature, scale=cfg.beat_logit_scale, **weights)

    def forward(self, out: dict[str, torch.Tensor], **given) -> dict[str, torch.Tensor]:
        """``given``: ``rhythm_value`` and ``token_count`` of ``compute_losses``."""
        return compute_losses(out, **self.kwargs, **given)


def cached_rhythm_loss(ecg_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                       report_keys: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient caching's loss step: ``rhythm_loss`` over embeddings computed without gradient
    (this rank's rows of every micro-batch of the optimizer step, concatenated), returning
    (loss, d/d ecg_emb, d/d text_emb, d/d logit_scale) of this rank's loss.

    The embedding gradients are those of the sum of all ranks' losses (``gather_with_grad``),
    the logit scale's only of this rank's: exactly what back-propagating ``rhythm_loss`` would
    put on them, so the model's backward can take them over (``rhythm_surrogate``).
    """
    with torch.enable_grad():
        leaves = [t.detach().float().requires_grad_() for t in (ecg_emb, text_emb, logit_scale)]
        loss = rhythm_loss(*leaves, report_keys)
        grads = torch.autograd.grad(loss, leaves)
    return (loss.detach(), *grads)


def rhythm_surrogate(ecg_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     ecg_grad: torch.Tensor, text_grad: torch.Tensor, scale_grad: torch.Tensor
                     ) -> torch.Tensor:
    """A scalar whose gradient through the model is the cached one: d/dθ of
    <emb(θ), cached grad>. Its value means nothing; never log it."""
    return ((ecg_emb.float() * ecg_grad).sum() + (text_emb.float() * text_grad).sum()
            + (logit_scale.float() * scale_grad).sum())
