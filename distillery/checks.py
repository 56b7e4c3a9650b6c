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
