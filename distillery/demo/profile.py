"""What a demo model gives and gets: accuracy in and out of distribution, and the shape of its own distribution.

    python -m distillery.demo.profile [MODEL_DIR] [--samples 2]

For the teacher this is what soft targets can carry: mean per-token entropy on its own T = 1 samples, the mass
of its top-1 and top-16 tokens there, and how many of its samples are gold traces (`task.parse_trace`).
A teacher with entropy ~0 teaches nothing that its sampled tokens do not. The build prints it; the methods
benchmark uses the same functions for every student.
"""

from __future__ import annotations

import argparse
import json
import math

from distillery.demo import task


def _load(model_path: str):
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.healing import is_adapter, load_healed

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    if is_adapter(model_path):  # NF4 with healing adapters
        return tok, load_healed(model_path)
    config = Path(model_path) / "config.json"
    quantized = config.is_file() and "quantization_config" in json.loads(config.read_text())
    return tok, AutoModelForCausalLM.from_pretrained(model_path, **({"device_map": "cpu"} if quantized else {})).eval()


def greedy_answers(
    model_path: str, problems: list[task.Problem], max_new_tokens: int = 96, batch_size: int = 64, loaded=None
) -> list[str]:
    """Greedy completions (the same decoding as the evaluate stage's lm-eval task)."""
    tok, model = loaded or _load(model_path)
    texts = []
    for i in range(0, len(problems), batch_size):
        batch = problems[i : i + batch_size]
        enc = tok([p.question for p in batch], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def accuracy(texts: list[str], problems: list[task.Problem]) -> float:
    return sum(task.extract_answer(t) == str(p.answer) for t, p in zip(texts, problems, strict=True)) / len(problems)


def sampled_profile(
    model_path: str,
    problems: list[task.Problem],
    samples: int = 2,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    seed: int = 0,
    loaded=None,
) -> dict:
    """Sample the model at `temperature` and measure its own distribution at every sampled token (at T = 1):
    mean entropy (nats/token), mean top-1 and top-16 probability; plus the share of samples that are correct
    and that are gold traces, and how many distinct orders/openers/closers its samples use per problem."""
    import torch

    tok, model = loaded or _load(model_path)
    torch.manual_seed(seed)
    ent = top1 = top16 = 0.0
    tokens = correct = gold = 0
    variety: dict[str, list[int]] = {"order": [], "opener": [], "closer": [], "trace": []}
    for i in range(0, len(problems), batch_size):
        batch = problems[i : i + batch_size]
        enc = tok([p.question for p in batch], return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            num_return_sequences=samples,
            output_scores=False,
            return_dict_in_generate=False,
        )
        prompt_len = enc["input_ids"].shape[1]
        attn = torch.cat(
            [enc["attention_mask"].repeat_interleave(samples, 0), torch.ones_like(out[:, prompt_len:])], dim=1
        )
        with torch.no_grad():
            logits = model(input_ids=out, attention_mask=attn).logits[:, prompt_len - 1 : -1].float()
        logp = torch.log_softmax(logits, -1)
        gen = out[:, prompt_len:]
        # positions up to and including the first eos; padding after it does not count
        is_eos = gen == tok.eos_token_id
        after = (is_eos.cumsum(1) - is_eos.long()) > 0
        mask = (~after) & (gen != tok.pad_token_id)
        p = logp.exp()
        ent += float((-(p * logp).sum(-1) * mask).sum())
        top = p.topk(16, -1).values
        top1 += float((top[..., 0] * mask).sum())
        top16 += float((top.sum(-1) * mask).sum())
        tokens += int(mask.sum())
        texts = tok.batch_decode(gen, skip_special_tokens=True)
        for j, prob in enumerate(batch):
            mine = texts[j * samples : (j + 1) * samples]
            parsed = [task.parse_trace(prob, t) for t in mine]
            correct += sum(task.extract_answer(t) == str(prob.answer) for t in mine)
            gold += sum(c is not None for c in parsed)
            ok = [c for c in parsed if c is not None]
            variety["order"].append(len({c.order for c in ok}))
            variety["opener"].append(len({c.opener for c in ok}))
            variety["closer"].append(len({(c.lead, c.comma, c.subject, c.verb, c.tail) for c in ok}))
            variety["trace"].append(len(set(mine)))
    n = len(problems) * samples
    return {
        "entropy_nats_per_token": ent / tokens,
        "top1_mass": top1 / tokens,
        "top16_mass": top16 / tokens,
        "sampled_accuracy": correct / n,
        "gold_trace_share": gold / n,
        "samples_per_prompt": samples,
        "tokens": tokens,
        **{f"distinct_{k}_per_prompt": sum(v) / len(v) for k, v in variety.items()},
    }


def gold_entropy(problems: list[task.Problem], tokenizer) -> float:
    """Entropy per token of the task's own gold-trace distribution (what a perfect teacher would have)."""
    nats = sum(task.trace_entropy(p) for p in problems)
    toks = sum(len(tokenizer(p.trace, add_special_tokens=False)["input_ids"]) + 1 for p in problems)  # + eos
    return nats / toks


def profile(model_path: str, samples: int = 2, limit: int | None = None) -> dict:
    evals, ood = task.eval_problems()[:limit], task.ood_eval_problems()[:limit]
    loaded = _load(model_path)
    texts = greedy_answers(model_path, evals, loaded=loaded)
    by_kind = {}
    for kind in ("easy", "hard"):
        sel = [(t, p) for t, p in zip(texts, evals, strict=True) if p.kind == kind]
        if sel:
            by_kind[f"accuracy_{kind}"] = accuracy([t for t, _ in sel], [p for _, p in sel])
    ood_acc = accuracy(greedy_answers(model_path, ood, loaded=loaded), ood)
    shape = sampled_profile(model_path, evals, samples=samples, loaded=loaded)
    return {
        "accuracy": accuracy(texts, evals),
        **by_kind,
        "ood_accuracy": ood_acc,
        "gold_entropy_nats_per_token": gold_entropy(evals, loaded[0]),
        **shape,
    }


def main(argv: list[str] | None = None) -> None:
    from distillery.demo.assets import TEACHER_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(TEACHER_DIR), help="model folder (default: the demo teacher)")
    ap.add_argument("--samples", type=int, default=2, help="T = 1 samples per eval prompt")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts of each split")
    args = ap.parse_args(argv)
    figures = profile(args.model, args.samples, args.limit)
    print(
        json.dumps(
            {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in figures.items()}, indent=2
        )
    )


if __name__ == "__main__":
    main()
