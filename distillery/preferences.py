"""Preference pairs for DPO: the student samples several answers per prompt; a judge ranks them.

Judges: the pipeline's verifier (a correct sample beats a wrong one) or the teacher (the sample with the highest
mean token log-probability under the teacher beats the lowest). Pairs are only made where the judge separates the
samples; prompts whose samples are all judged alike teach DPO nothing and are counted, not paired.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distillery.engines import HFEngine
from distillery.scoring import completion_logprobs


def sample_student(
    model_path: str, prompts: list[str], d, seed: int, trust_remote_code: bool = False, batch_size: int = 64
) -> list[list[str]]:
    """`d.samples` completions per prompt from the student, sampled at `d.temperature` (transformers generate)."""
    engine = HFEngine(model_path, trust_remote_code=trust_remote_code, batch_size=batch_size)
    try:
        out = engine.generate(
            prompts,
            {"n": d.samples, "temperature": d.temperature, "top_p": 1.0, "max_tokens": d.max_new_tokens, "stop": []},
            seeds=[seed],
        )
    finally:
        engine.close()
    return [[s["text"] for s in group] for group in out["samples"]]


def teacher_scores(
    teacher_path: str, prompts: list[str], completions: list[str], trust_remote_code: bool = False, batch_size: int = 32
) -> list[float]:
    """Mean log-probability per completion token under the teacher (frozen, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.checks import check_teacher_frozen

    tok = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        teacher_path, dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=trust_remote_code
    ).to("cuda" if cuda else "cpu")
    model.eval().requires_grad_(False)
    check_teacher_frozen(model, where=f"dpo judge {teacher_path}")
    return [total / n for total, n in completion_logprobs(model, tok, prompts, completions, batch_size)]


def preference_pairs(
    prompts: list[dict],
    samples: list[list[str]],
    d,
    verifier: Callable[[str, str], bool],
    teacher_path: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[list[dict], dict]:
    """Chosen/rejected pairs from each prompt's samples, and what the judging found."""
    pairs: list[dict] = []
    correct = total = separable = 0
    flat_scores: list[float] = []
    if d.judge == "teacher":
        texts = [r.get("prompt_text", r["prompt"]) for r, group in zip(prompts, samples, strict=True) for _ in group]
        flat_scores = teacher_scores(teacher_path, texts, [s for group in samples for s in group], trust_remote_code)
    offset = 0
    for row, group in zip(prompts, samples, strict=True):
        ok = [verifier(s, row["answer"]) for s in group]
        correct += sum(ok)
        total += len(group)
        if d.judge == "verifier":
            ranked = [(1.0, s) for s, good in zip(group, ok, strict=True) if good] + [
                (0.0, s) for s, good in zip(group, ok, strict=True) if not good
            ]
            made = _pairs(ranked, d.pairs_per_prompt, margin=0.5)
        else:
            scored = sorted(zip(flat_scores[offset : offset + len(group)], group, strict=True), reverse=True)
            made = _pairs(scored, d.pairs_per_prompt, margin=max(d.min_margin, 1e-9))
        offset += len(group)
        separable += bool(made)
        pairs += [
            {
                "prompt_id": row.get("prompt_id", row.get("id")),
                "prompt": row["prompt"],
                "prompt_text": row.get("prompt_text", row["prompt"]),
                "chosen": c,
                "rejected": r,
                "margin": m,
            }
            for c, r, m in made
        ]
    stats: dict[str, Any] = {
        "dpo_prompts": len(prompts),
        "dpo_samples": total,
        "dpo_pairs": len(pairs),
        "dpo_prompts_paired": separable,
        "dpo_sample_pass_rate": correct / total if total else float("nan"),
    }
    return pairs, stats


def _pairs(ranked: list[tuple[float, str]], limit: int, margin: float) -> list[tuple[str, str, float]]:
    """Best-vs-worst pairs from samples sorted best first: the i-th best against the i-th worst, while the judge
    still separates them by `margin` and the texts differ."""
    out = []
    for i in range(min(limit, len(ranked) // 2)):
        (hi, chosen), (lo, rejected) = ranked[i], ranked[-1 - i]
        if hi - lo >= margin and chosen != rejected:
            out.append((chosen, rejected, hi - lo))
    return out
