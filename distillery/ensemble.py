"""Several teachers on one tokenizer (generate.ensemble): their per-token distributions averaged into the top-k
that logit KD learns from.

    p_mix(v | x<i) = sum_t w_t p_t(v | x<i)        (sum_t w_t = 1; p_t the teacher's softmax at T = 1)

An arithmetic mean of probabilities (the ensemble's predictive distribution, as ensemble distillation averages its
teachers' soft targets), not of logits: a token any teacher finds likely keeps its mass. The stored values are log
p_mix at the top-k ids of the mixture, the layout of a single teacher's raw log-probs, so logit_kd applies its
temperature to them as to one teacher's. Every teacher scores the first teacher's sampled tokens with a forward
pass over the full vocabulary (exact: a mixture of top-k lists would lose the mass of ids one teacher left out).
Teachers whose output layers differ in padding rows are compared on the rows they share, renormalised.

Written by hand: TRL's several-teacher trainer (AsyncDistillationTrainer) routes each sample to one teacher
server and does not average distributions.
"""

from __future__ import annotations

import math

from distillery.checks import DistillationCheckError


def check_same_tokenizer(first, other, where: str) -> None:
    """The ensemble's top-k ids are the first teacher's: every teacher must give each token the same id."""
    from distillery.checks import _differences

    a, b = first.get_vocab(), other.get_vocab()
    if a != b:
        missing, moved = _differences(a, b)
        raise DistillationCheckError(
            f"{where}: its vocabulary differs from `teacher`'s (sizes {len(b)} vs {len(a)}; tokens it lacks "
            f"{missing}; tokens with other ids {moved}); several teachers must share one tokenizer"
        )


def load_teachers(paths: list[str], trust_remote_code: list[bool], where: list[str]) -> list:
    """(tokenizer, model) per teacher: eval mode, no grads (checked), float32 on CPU and bfloat16 on a GPU; every
    tokenizer checked against the first's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.checks import check_teacher_frozen

    cuda = torch.cuda.is_available()
    out = []
    for path, trust, name in zip(paths, trust_remote_code, where, strict=True):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        if out:
            check_same_tokenizer(out[0][0], tok, name)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=trust
        )
        model.to("cuda" if cuda else "cpu").eval().requires_grad_(False)
        check_teacher_frozen(model, where=name)
        out.append((tok, model))
    return out


def _selected_logprobs(model, seqs: list[list[int]], spans: list[tuple[int, int]], rows: int, pad_id: int):
    """log p at each predicting position of each span (position i-1 predicts token i), over the first `rows`
    output rows, renormalised: [positions, rows]."""
    import torch

    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        picked = torch.cat([logits[b, a - 1 : z - 1, :rows] for b, (a, z) in enumerate(spans)]).float()
        return torch.log_softmax(picked, dim=-1)


def mixture_topk(
    models: list,
    weights: list[float] | None,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    k: int,
    pad_id: int,
    batch_size: int = 8,
) -> tuple[list[dict], dict]:
    """The weighted mixture's top-k log-probs at every completion token, in logprobs.parquet's row layout
    (token_ids, token_logprobs, top_ids, top_logprobs), and what the teachers gave, per completion token:
    each one's entropy and log-prob of the sampled token, the mixture's entropy, the teachers' disagreement
    (generalized Jensen-Shannon divergence: H(mix) - sum_t w_t H(p_t) >= 0, 0 when they agree) and how often
    all their argmaxes agree."""
    import torch

    if not models:
        raise ValueError("mixture_topk: no teachers")
    w = [1.0] * len(models) if weights is None else list(weights)
    if len(w) != len(models) or min(w) <= 0:
        raise ValueError(f"mixture_topk: {len(w)} positive weights needed for {len(models)} teachers")
    logw = [math.log(x / sum(w)) for x in w]
    rows = min(m.get_output_embeddings().weight.shape[0] for m in models)
    out: list[dict] = []
    sums = {"tokens": 0, "mixture_entropy": 0.0, "disagreement": 0.0, "argmax_agree": 0.0}
    sums |= {f"teacher{t}_{x}": 0.0 for t in range(len(models)) for x in ("entropy", "sampled_logprob")}
    for i in range(0, len(prompt_ids), batch_size):
        pairs = list(zip(prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size], strict=True))
        if any(not p for p, _ in pairs):
            raise ValueError("mixture_topk: an empty prompt has no position to predict its first token from")
        if any(c and max(c) >= rows for _, c in pairs):
            raise ValueError(f"mixture_topk: a sampled token id is past the {rows} output rows the teachers share")
        seqs = [p + c for p, c in pairs]
        spans = [(len(p), len(p) + len(c)) for p, c in pairs]
        sampled = torch.tensor([t for _, c in pairs for t in c], dtype=torch.long)
        mix, weighted_h, argmaxes = None, 0.0, []
        for t, (model, lw) in enumerate(zip(models, logw, strict=True)):
            logp = _selected_logprobs(model, seqs, spans, rows, pad_id).cpu()
            h = -(logp.exp() * logp).sum(-1)
            sums[f"teacher{t}_entropy"] += float(h.sum())
            sums[f"teacher{t}_sampled_logprob"] += float(logp.gather(-1, sampled[:, None]).sum())
            weighted_h = weighted_h + math.exp(lw) * h
            argmaxes.append(logp.argmax(-1))
            mix = logp + lw if mix is None else torch.logaddexp(mix, logp + lw)
        h_mix = -(mix.exp() * mix).sum(-1)
        sums["tokens"] += len(sampled)
        sums["mixture_entropy"] += float(h_mix.sum())
        sums["disagreement"] += float((h_mix - weighted_h).sum())
        sums["argmax_agree"] += float(torch.stack(argmaxes).eq(argmaxes[0]).all(0).sum())
        top = mix.topk(k, dim=-1)
        token_lp = mix.gather(-1, sampled[:, None])[:, 0]
        at = 0
        for _, c in pairs:
            n = len(c)
            out.append(
                {
                    "token_ids": list(c),
                    "token_logprobs": token_lp[at : at + n].tolist(),
                    "top_ids": top.indices[at : at + n].tolist(),
                    "top_logprobs": top.values[at : at + n].tolist(),
                }
            )
            at += n
    n = max(sums.pop("tokens"), 1)
    return out, {f"ensemble_{key}": v / n for key, v in sums.items()}
