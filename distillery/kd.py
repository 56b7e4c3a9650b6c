"""Logit distillation from the teacher's stored top-k logprobs (the generate stage's logprobs.parquet).

Examples are built from the *generated token ids*, not by re-tokenizing the completion text, so the teacher's
top-k at each position belongs to exactly the token the student is trained on there:
  input_ids = tokenize(prompt_text) + token_ids;  labels = -100 on the prompt, token_ids on the completion;
  top_ids / top_logprobs follow the labels (zeros under the prompt, where nothing counts).
The loss (distillery.losses) at position i compares the student's next-token distribution at i-1 with the
teacher's top-k for token i: alpha·T²·D(teacher_T ‖ student_T) + (1-alpha)·CE(labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillery.checks import check_loss_mask


def load_logprobs(path: Path) -> dict[tuple[str, int], dict]:
    import pyarrow.parquet as pq

    return {(r["prompt_id"], r["sample"]): r for r in pq.read_table(path).to_pylist()}


def build_examples(rows: list[dict], logprobs: dict[tuple[str, int], dict], tokenizer, max_length: int) -> list[dict]:
    """One example per kept trace that has stored logprobs; truncated to max_length tokens."""
    out = []
    for r in rows:
        lp = logprobs.get((r["prompt_id"], r["sample"]))
        if lp is None:
            continue
        prompt = tokenizer(r.get("prompt_text", r["prompt"]), add_special_tokens=False)["input_ids"]
        comp = list(lp["token_ids"])
        k = len(lp["top_ids"][0]) if lp["top_ids"] else 0
        ids = (prompt + comp)[:max_length]
        n = len(ids)
        out.append(
            {
                "input_ids": ids,
                "labels": ([-100] * len(prompt) + comp)[:n],
                "top_ids": ([[0] * k] * len(prompt) + [list(x) for x in lp["top_ids"]])[:n],
                "top_logprobs": ([[0.0] * k] * len(prompt) + [[float(v) for v in x] for x in lp["top_logprobs"]])[:n],
                "prompt_length": len(prompt),
            }
        )
    if not out:
        raise ValueError("logit KD: no kept trace has stored logprobs (set generate.logprobs: k > 0)")
    return out


@dataclass
class KDCollator:
    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        k = max(len(b["top_ids"][0]) for b in batch)

        def pad(seq, value):
            return seq + [value] * (width - len(seq))

        out = {
            "input_ids": torch.tensor([pad(b["input_ids"], self.pad_token_id) for b in batch]),
            "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),
            "labels": torch.tensor([pad(b["labels"], -100) for b in batch]),
            "top_ids": torch.tensor([pad(b["top_ids"], [0] * k) for b in batch]),
            "top_logprobs": torch.tensor([pad(b["top_logprobs"], [0.0] * k) for b in batch], dtype=torch.float32),
        }
        check_loss_mask(out["labels"], out["attention_mask"], [b["prompt_length"] for b in batch], where="KD batch")
        return out


def make_trainer(
    model,
    tokenizer,
    examples: list[dict],
    args,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    tail: str,
    callbacks: list | None = None,
    scale_t2: bool = True,
    chunk_size: int = 0,
):
    """A transformers Trainer whose loss is the top-k logit distillation loss (T²-scaled unless `scale_t2` is
    off, which only the temperature experiment wants: the soft term's gradient then shrinks as 1/T²).

    chunk_size > 0: the model returns its last hidden states (logits for one position only) and the loss projects
    them through the output layer chunk_size positions at a time (losses.chunked_kd_ce): the same loss and gradient
    without [batch, length, vocabulary] logits, which at Qwen's 151,936 rows are most of a step's memory."""
    from datasets import Dataset
    from transformers import Trainer

    from distillery.losses import chunked_kd_ce, hard_ce, mixed, topk_kd

    class LogitKDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels, top_ids, top_lp = inputs.pop("labels"), inputs.pop("top_ids"), inputs.pop("top_logprobs")
            lab, ids, lps = labels[:, 1:], top_ids[:, 1:], top_lp[:, 1:]  # position i-1 predicts token i
            batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            if chunk_size > 0:
                # through the (DDP/PEFT-wrapped) model's own forward, so its hooks run; its last hidden state is
                # the final norm's output, what the output layer reads
                outputs = model(**batch, output_hidden_states=True, logits_to_keep=1)
                hidden = outputs.hidden_states[-1][:, :-1]
                head = self.accelerator.unwrap_model(model).get_output_embeddings()
                kd, ce = chunked_kd_ce(
                    hidden.reshape(-1, hidden.shape[-1]),
                    head,
                    lab.reshape(-1),
                    top_ids=ids.reshape(-1, ids.shape[-1]),
                    top_logprobs=lps.reshape(-1, lps.shape[-1]),
                    temperature=temperature,
                    kind=divergence,
                    beta=beta,
                    tail=tail,
                    chunk_size=chunk_size,
                )
            else:
                outputs = model(**batch)
                logits = outputs.logits[:, :-1]
                kd = topk_kd(logits, ids, lps, temperature, divergence, beta, labels=lab, tail=tail)
                ce = hard_ce(logits, lab)
            if not scale_t2:
                kd = kd / (temperature * temperature)
            loss = mixed(kd, ce, alpha)  # raises on NaN/inf: training stops, the stage's run ends FAILED
            self._kd_parts = {"kd_loss": kd.item(), "ce_loss": ce.item()}
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *a, **k):
            logs.update(getattr(self, "_kd_parts", {}))
            super().log(logs, *a, **k)

    args.remove_unused_columns = False
    data = Dataset.from_list(examples)
    return LogitKDTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=KDCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )
