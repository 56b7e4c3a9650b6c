"""Distillation losses, written so that each one can be checked against its closed form.

Conventions (the silent bugs of the field are named where they are avoided):
- Divergences are computed from log-probabilities with `log_softmax` on both sides and summed over the
  vocabulary with *probabilities* as weights (never log-probs mixed in as weights).
- Temperature T divides both teacher and student logits (never one side only), and the soft-target loss is
  multiplied by T², which keeps its gradient magnitude flat across T (Hinton et al. 2015).
- Generalized JSD with β follows TRL's GKD convention: β = 0 is forward KL(p‖q), β = 1 is reverse KL(q‖p), and
  0 < β < 1 is β·KL(p‖m) + (1-β)·KL(q‖m) with m = β·p + (1-β)·q.
- Only positions whose label is not -100 count (completion tokens, never prompt or pad); the mean is over those.
- The hard-label mix is explicit: loss = α·T²·KD + (1-α)·CE. α = 1 means no hidden CE term.

Two teacher forms: full logits [N, V] (on-policy / online teacher), or the top-k stored by the generate stage
(ids [N, k], raw logprobs at T=1 [N, k]). For top-k, the mass outside the k tokens is handled explicitly by
`tail`: "bucket" reduces both sides to the k tokens plus one pseudo-token holding the rest of the mass, then
tempers that alike on both sides (so a student equal to the teacher scores 0 at every T; see `topk_kd`);
"renormalize" restricts both distributions to the k tokens.

`chunked_kd_from_hidden` never builds [N, V] logits for the whole sequence at once: it projects hidden states
through the output layer chunk by chunk under activation checkpointing, so peak memory scales with the chunk.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
IGNORE = -100


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the softmax; float64 stays float64 (finite-difference gradient checks need it)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) summed over the last dim, from log-probabilities; 0·log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def divergence(
    logp_teacher: torch.Tensor, logq_student: torch.Tensor, kind: Divergence = "forward_kl", beta: float = 0.5
) -> torch.Tensor:
    """Per-position divergence between two normalised log-distributions over the same support."""
    if kind == "forward_kl":
        return _kl(logp_teacher, logq_student)
    if kind == "reverse_kl":
        return _kl(logq_student, logp_teacher)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(logp_teacher, logq_student)
    if beta == 1.0:
        return _kl(logq_student, logp_teacher)
    # log m = logsumexp(log β + log p, log(1-β) + log q), stable
    logm = torch.logsumexp(torch.stack([logp_teacher + math.log(beta), logq_student + math.log(1 - beta)]), dim=0)
    return beta * _kl(logp_teacher, logm) + (1 - beta) * _kl(logq_student, logm)


def _masked_mean(per_pos: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        return per_pos.mean()
    mask = labels != IGNORE
    if not mask.any():
        raise ValueError("distillation loss: every position is masked (no completion tokens in the batch)")
    return per_pos[mask].mean()


def full_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    kind: Divergence = "forward_kl",
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """T²-scaled divergence between full teacher and student distributions at temperature T.

    student_logits, teacher_logits: [..., V]; labels: [...] with -100 on positions that must not count.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} vs student {tuple(student_logits.shape)}: "
            "vocabularies must match (same tokenizer, same embedding size)"
        )
    t = float(temperature)
    logq = F.log_softmax(_f(student_logits) / t, dim=-1)
    logp = F.log_softmax(_f(teacher_logits) / t, dim=-1)
    return (t * t) * _masked_mean(divergence(logp, logq, kind, beta), labels)


# A log-probability that is exactly 0 in probability at any temperature, yet finite: (NEG - NEG) = 0 where -inf
# would give NaN in the divergence's value and gradient.
NEG = -1e9


def _fold_beyond(rows: int, top_ids: torch.Tensor, top_logprobs: torch.Tensor):
    """Teacher ids at or past the student's output rows (R1-Distill-Qwen-7B has 152,064 rows, a 1.5B student on the
    same tokenizer 151,936; the rows past the tokenizer are padding no text maps to) cannot be gathered from the
    student. They leave the top-k with probability 0 on both sides, so their teacher mass joins the tail: exact
    for tail="bucket", whose outcomes are then the student's kept ids and one bucket for everything else."""
    valid = top_ids < rows
    if bool(valid.all()):
        return top_ids, top_logprobs, None
    return top_ids.masked_fill(~valid, 0), _drop(_f(top_logprobs), valid), valid


def _drop(logp: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return logp if valid is None else logp.masked_fill(~valid, NEG)


def topk_kd(
    student_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    temperature: float = 1.0,
    kind: Divergence = "forward_kl",
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    tail: Literal["bucket", "renormalize"] = "bucket",
) -> torch.Tensor:
    """T²-scaled divergence against a teacher known only by its top-k (raw logprobs at T=1).

    student_logits [..., V]; top_ids [..., k] (long); top_logprobs [..., k] (log-softmax of the teacher's logits at
    T=1, as vLLM's raw_logprobs).

    tail="bucket": both models are reduced to the same k+1 outcomes at T=1 (the teacher's k tokens, and one
    bucket for all the others), and that distribution is tempered on both sides alike. A tempered teacher's true
    tail cannot be known from its top-k (it depends on how the rest of the mass is spread over tokens), and
    tempering only the teacher's leftover mass as if it were one token, while the student's tail is tempered
    token by token, makes a student identical to the teacher pay a loss at T != 1 (0.28 nats/token on the demo's
    one-hot teacher at T = 2, 4 nats on a less sure one). Here a student equal to the teacher pays 0 at every
    T, and the gradient pulls the student's top-k probabilities and its tail mass to the teacher's. Exact
    (the full divergence over the coarsened distribution) at T=1.
    tail="renormalize": both distributions restricted to the k tokens and renormalised, then tempered (exact
    tempering of the restricted teacher).
    """
    t = float(temperature)
    top_ids, top_logprobs, valid = _fold_beyond(student_logits.shape[-1], top_ids, top_logprobs)
    if tail == "renormalize":
        z = _f(student_logits) / t
        s_top = _drop(z.gather(-1, top_ids) - torch.logsumexp(z, dim=-1, keepdim=True), valid)
        t_top = _f(top_logprobs) / t
        logp = t_top - torch.logsumexp(t_top, -1, keepdim=True)
        logq = s_top - torch.logsumexp(s_top, -1, keepdim=True)
    elif tail == "bucket":

        def coarse(top_logp: torch.Tensor) -> torch.Tensor:
            # [k tokens, the rest] at T=1; log(1 - sum p_top) without cancellation, then tempered by T
            rest = torch.log1p(-top_logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
            return torch.log_softmax(torch.cat([top_logp, rest], dim=-1) / t, dim=-1)

        z = _f(student_logits)
        s_top = z.gather(-1, top_ids) - torch.logsumexp(z, dim=-1, keepdim=True)  # student log q on the top-k ids
        s_top = _drop(s_top, valid)
        logp, logq = coarse(_f(top_logprobs)), coarse(s_top)
    else:
        raise ValueError(f"unknown tail handling {tail!r}")
    return (t * t) * _masked_mean(divergence(logp, logq, kind, beta), labels)


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the hard labels (already aligned with the logits), ignoring -100."""
    return F.cross_entropy(
        _f(student_logits).reshape(-1, student_logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
    )


def mixed(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha·KD + (1-alpha)·CE, with the T² already inside `kd`; refuses a NaN/inf result."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd alpha must be in [0, 1], got {alpha}")
    loss = alpha * kd + (1 - alpha) * ce
    if not torch.isfinite(loss):
        raise FloatingPointError(f"distillation loss is {loss.item()} (kd {kd.item()}, ce {ce.item()})")
    return loss


def chunked_kd_from_hidden(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    kind: Divergence = "forward_kl",
    beta: float = 0.5,
    chunk_size: int = 1024,
    top_ids: torch.Tensor | None = None,
    top_logprobs: torch.Tensor | None = None,
    tail: str = "bucket",
) -> torch.Tensor:
    """The same loss as full_kd/topk_kd over N positions, without materialising [N, V] student logits at once.

    hidden [N, H] (positions already aligned with labels [N]); each chunk's logits are built, reduced to a sum of
    per-position divergences, and dropped; activation checkpointing recomputes them in backward.
    """
    kd, _ = chunked_kd_ce(
        hidden, lm_head, labels, teacher_logits, top_ids, top_logprobs, temperature, kind, beta, tail, chunk_size
    )
    return kd


def chunked_kd_ce(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    top_ids: torch.Tensor | None = None,
    top_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    kind: Divergence = "forward_kl",
    beta: float = 0.5,
    tail: str = "bucket",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T²-scaled KD, cross-entropy on the labels), each the mean over the counted positions: exactly
    full_kd/topk_kd and hard_ce of `lm_head(hidden)`, chunk_size positions' logits at a time (at a 151,936-token
    vocabulary, [N, V] fp32 logits and their gradient are 1.2 MB per position).

    hidden [N, H] and labels [N] are already aligned (position i's hidden state predicts labels[i]); teacher_logits
    [N, V], or top_ids / top_logprobs [N, k].
    """
    from torch.utils.checkpoint import checkpoint

    keep = labels != IGNORE
    if not keep.any():
        raise ValueError("distillation loss: every position is masked (no completion tokens in the batch)")
    idx = keep.nonzero(as_tuple=True)[0]
    t = float(temperature)

    def chunk_sums(h, lab, tl, ti, tlp):
        z = _f(lm_head(h))
        if tl is not None:
            kd = divergence(F.log_softmax(_f(tl) / t, -1), F.log_softmax(z / t, -1), kind, beta).sum()
        else:
            kd = topk_kd(z, ti, tlp, t, kind, beta, labels=None, tail=tail) / (t * t) * h.shape[0]
        return torch.stack([kd, F.cross_entropy(z, lab, reduction="sum")])

    total = hidden.new_zeros(2, dtype=_f(hidden).dtype)
    for start in range(0, idx.numel(), chunk_size):
        sel = idx[start : start + chunk_size]
        args = [None if x is None else x[sel] for x in (hidden, labels, teacher_logits, top_ids, top_logprobs)]
        total = total + checkpoint(chunk_sums, *args, use_reentrant=False)
    return (t * t) * total[0] / idx.numel(), total[1] / idx.numel()
