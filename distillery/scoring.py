"""Log-likelihood of completions given their prompts under a causal LM: what the DPO teacher judge ranks by and
what held-out perplexity is made of."""

from __future__ import annotations


def _padded_logprobs(model, ids: list[list[int]], pad_id: int):
    """The batch right-padded with its attention mask, and the model's log-softmax at every position (no grad)."""
    import torch

    width = max(map(len, ids))
    input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=model.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=model.device)
    with torch.no_grad():
        return input_ids, torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)


def completion_logprobs(
    model, tok, prompts: list[str], completions: list[str], batch_size: int = 16
) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of each completion plus eos, the prompt given and never scored."""
    out: list[tuple[float, int]] = []
    for i in range(0, len(prompts), batch_size):
        ids, starts = [], []
        for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size], strict=True):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            ids.append(p_ids + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            starts.append(len(p_ids))
        input_ids, logp = _padded_logprobs(model, ids, tok.pad_token_id)
        token_lp = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # position t-1 predicts token t
        for row, (x, s) in enumerate(zip(ids, starts, strict=True)):
            scored = token_lp[row, s - 1 : len(x) - 1]
            out.append((float(scored.sum()), scored.numel()))
    return out


def topk_logprobs(
    model, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int, pad_id: int, batch_size: int = 32
) -> list[dict]:
    """A model's own top-k log-probabilities (T = 1) at every given completion token, in the generate stage's
    logprobs.parquet row layout (token_ids, token_logprobs, top_ids, top_logprobs): another model's soft targets
    on exactly the teacher's tokens, e.g. a teacher assistant's (bench/methods.py)."""
    import torch

    out: list[dict] = []
    for i in range(0, len(prompt_ids), batch_size):
        pairs = list(zip(prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size], strict=True))
        if any(not p for p, _ in pairs):
            raise ValueError("topk_logprobs: an empty prompt has no position to predict its first token from")
        _, logp = _padded_logprobs(model, [p + c for p, c in pairs], pad_id)
        for row, (p, c) in enumerate(pairs):
            at = logp[row, len(p) - 1 : len(p) + len(c) - 1]  # position t-1 predicts token t
            top = at.topk(k, dim=-1)
            out.append(
                {
                    "token_ids": list(c),
                    "token_logprobs": at.gather(-1, torch.tensor(c)[:, None])[:, 0].tolist(),
                    "top_ids": top.indices.tolist(),
                    "top_logprobs": top.values.tolist(),
                }
            )
    return out
