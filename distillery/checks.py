"""Checks that refuse to run rather than distill silently wrong. Each raises DistillationCheckError."""

from __future__ import annotations


class DistillationCheckError(ValueError):
    """A precondition of correct distillation does not hold; the message says which and where."""


def check_pad_not_eos(tokenizer, where: str) -> None:
    # With pad == eos the collator masks every eos as padding, so the student is never taught to stop.
    if tokenizer.pad_token_id is None:
        raise DistillationCheckError(f"{where}: no pad token; set one that is not the eos token")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise DistillationCheckError(
            f"{where}: pad token equals eos ({tokenizer.eos_token!r}); the student would never learn to stop. "
            "Add a distinct pad token"
        )


def check_same_vocab(teacher_tok, student_tok, where: str) -> None:
    """Same tokens with the same ids, not merely the same size."""
    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t != s:
        only_t = sorted(set(t) - set(s))[:3]
        moved = sorted(k for k in set(t) & set(s) if t[k] != s[k])[:3]
        raise DistillationCheckError(
            f"{where}: teacher and student vocabularies differ (sizes {len(t)} vs {len(s)}; "
            f"teacher-only tokens {only_t}; tokens with other ids {moved})"
        )


def check_teacher_frozen(teacher, where: str = "teacher") -> None:
    """A teacher in train mode samples dropout noise into its targets; one with grads wastes memory and can be
    updated by mistake."""
    if teacher.training:
        raise DistillationCheckError(f"{where}: model is in train mode (dropout on); call .eval()")
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    if trainable:
        raise DistillationCheckError(
            f"{where}: {len(trainable)} parameters require grad (e.g. {trainable[0]}); "
            "freeze it with requires_grad_(False)"
        )


def check_loss_mask(labels, attention_mask, prompt_lengths: list[int] | None = None, where: str = "batch") -> None:
    """The loss may cover completion tokens only: never padding, never the prompt."""
    counted = labels != -100
    if (counted & (attention_mask == 0)).any():
        raise DistillationCheckError(f"{where}: the loss mask covers pad positions")
    if prompt_lengths is not None:
        for row, n in enumerate(prompt_lengths):
            start = int((attention_mask[row] == 0).long().cumprod(0).sum())  # left padding, if any
            if counted[row, start : start + n].any():
                raise DistillationCheckError(f"{where}: row {row}: the loss mask covers prompt tokens")
    if not counted.any():
        raise DistillationCheckError(f"{where}: no position counts towards the loss")


def check_temperature_both_sides(
    logprobs_mode: str, sampling_temperature: float, kd_temperature: float, where: str = "teacher logprobs"
) -> None:
    """Stored teacher logprobs must be raw (T=1) for the trainer to temper teacher and student alike.

    'processed_logprobs' were tempered by the sampling temperature already; tempering them again by the KD
    temperature while the student is tempered once puts the two sides at different temperatures."""
    if logprobs_mode == "raw_logprobs":
        return
    if logprobs_mode == "processed_logprobs" and sampling_temperature == 1.0 and kd_temperature == 1.0:
        return
    raise DistillationCheckError(
        f"{where}: stored as {logprobs_mode} at sampling temperature {sampling_temperature}; KD at temperature "
        f"{kd_temperature} would temper the teacher and the student differently. Regenerate with "
        "generate.logprobs_mode: raw_logprobs"
    )
