"""Feature distillation: the student's hidden states, through a learned projection to the teacher's width, match
the live teacher's on chosen layer pairs (FitNets; DistillKit's hidden-state mode), mixed with logit KD on the
teacher's full distribution.

    loss = alpha·T²·D(teacher_T ‖ student_T) + (1-alpha)·CE  +  weight · mean over pairs of F(W_k h_s[i_k], h_t[j_k])

F is 1 - cosine similarity or the mean squared error per position; every term counts the completion tokens only
(the same mask as the CE). Hidden-state index 0 is the embeddings and index L the last block's output after the
final norm, as transformers returns them. The projections (one Linear per pair, identity at equal widths, so a
student that is a copy of the teacher starts at zero feature loss) train with the student and are not part of the
saved model. Written by hand: TRL has no hidden-state distillation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillery.checks import check_loss_mask


def layer_pairs(n_student: int, n_teacher: int, spec: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """The (student, teacher) hidden-state indices to match: `spec`, checked, or each student block's output with
    the teacher block at the same relative depth."""
    if spec is None:
        return [(i, round(i * n_teacher / n_student)) for i in range(1, n_student + 1)]
    for s, t in spec:
        if not (0 <= s <= n_student and 0 <= t <= n_teacher):
            raise ValueError(
                f"train.feature.layers: pair [{s}, {t}] is out of range: the student has hidden states 0..{n_student}"
                f" and the teacher 0..{n_teacher} (0 = embeddings)"
            )
    return [tuple(p) for p in spec]


class Projector(nn.Module):
    """One bias-free Linear per layer pair from the student's width to the teacher's."""

    def __init__(self, d_student: int, d_teacher: int, n: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(d_student, d_teacher, bias=False) for _ in range(n))
        if d_student == d_teacher:
            for m in self.maps:
                nn.init.eye_(m.weight)


def feature_term(h_student: torch.Tensor, h_teacher: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over the counted positions of 1 - cos or the per-dimension squared error, in fp32."""
    hs, ht = h_student.float(), h_teacher.float()
    per = 1 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8) if kind == "cosine" else ((hs - ht) ** 2).mean(-1)
    return per[mask].mean()


def build_examples(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """prompt + completion + eos, the loss on the completion (and eos) only, truncated to max_length."""
    out = []
    for r in records:
        prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        comp = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + comp)[:max_length]
        if len(ids) <= len(prompt):
            continue
        out.append(
            {"input_ids": ids, "labels": ([-100] * len(prompt) + comp)[: len(ids)], "prompt_length": len(prompt)}
        )
    if not out:
        raise ValueError(f"feature: no trace leaves a completion token within max_length {max_length}")
    return out


@dataclass
class Collator:
    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        out = {
            "input_ids": torch.tensor(
                [b["input_ids"] + [self.pad_token_id] * (width - len(b["input_ids"])) for b in batch]
            ),
            "attention_mask": torch.tensor(
                [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
            ),
            "labels": torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]),
        }
        check_loss_mask(out["labels"], out["attention_mask"], [b["prompt_length"] for b in batch], "feature batch")
        return out


def make_trainer(model, teacher, tokenizer, examples: list[dict], args, kd, feat, callbacks: list | None = None):
    """A transformers Trainer with the loss above; `kd` is train.kd (temperature, alpha, divergence, beta) and
    `feat` train.feature (weight, loss, layers)."""
    from datasets import Dataset
    from transformers import Trainer

    from distillery.losses import full_kd, hard_ce, mixed

    # weight 0: logit KD against the live teacher alone (quantization-aware healing uses it so)
    pairs = layer_pairs(model.config.num_hidden_layers, teacher.config.num_hidden_layers, feat.layers)
    pairs = pairs if feat.weight > 0 else []
    projector = Projector(model.config.hidden_size, teacher.config.hidden_size, len(pairs)).to(
        device=model.device, dtype=next(model.parameters()).dtype
    )

    class FeatureKDTrainer(Trainer):
        def create_optimizer(self, *a, **k):
            # the projections learn with the student, at its learning rate; the scheduler is built after this
            opt = super().create_optimizer(*a, **k)
            if pairs and not any(p is projector.maps[0].weight for g in opt.param_groups for p in g["params"]):
                opt.add_param_group({"params": list(projector.parameters()), "weight_decay": 0.0})
            return opt

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs, output_hidden_states=bool(pairs))
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=bool(pairs))
            lab = labels[:, 1:]  # position i-1 predicts token i
            logits = outputs.logits[:, :-1]
            kd_loss = full_kd(logits, t_out.logits[:, :-1], kd.temperature, kd.divergence, kd.beta, labels=lab)
            ce = hard_ce(logits, lab)
            mask = labels != -100  # the hidden state at each completion token
            terms = [
                feature_term(m(outputs.hidden_states[s]), t_out.hidden_states[t], mask, feat.loss)
                for m, (s, t) in zip(projector.maps, pairs, strict=True)
            ]
            feats = torch.stack(terms).mean() if terms else kd_loss.new_zeros(())
            loss = mixed(kd_loss, ce, kd.alpha) + feat.weight * feats  # mixed raises on NaN/inf
            if not torch.isfinite(loss):
                raise FloatingPointError(f"feature loss is {feats.item()}")
            self._parts = {"kd_loss": kd_loss.item(), "ce_loss": ce.item(), "feature_loss": feats.item()}
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *a, **k):
            if "loss" in logs:  # a step's log, not the run's summary
                logs.update(getattr(self, "_parts", {}))
            super().log(logs, *a, **k)

    args.remove_unused_columns = False
    trainer = FeatureKDTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )
    trainer.feature_pairs, trainer.projector = pairs, projector
    return trainer
