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


def _differences(t: dict[str, int], s: dict[str, int]) -> tuple[list[str], list[str]]:
    """Up to three teacher-only tokens, and up to three tokens the two give other ids."""
    return sorted(set(t) - set(s))[:3], sorted(k for k in set(t) & set(s) if t[k] != s[k])[:3]


def check_same_vocab(teacher_tok, student_tok, where: str) -> None:
    """Same tokens with the same ids, not merely the same size."""
    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t != s:
        only_t, moved = _differences(t, s)
        raise DistillationCheckError(
            f"{where}: teacher and student vocabularies differ (sizes {len(t)} vs {len(s)}; "
            f"teacher-only tokens {only_t}; tokens with other ids {moved}); train.method cross_tokenizer distils "
            "across tokenizers"
        )


def check_same_template(teacher_path: str, student_tok, where: str, trust_remote_code: bool = False) -> None:
    """Training on the teacher's rendered prompts (logit KD's token-exact examples) teaches the student the
    teacher's chat format: refused unless the student's template is the teacher's."""
    from transformers import AutoTokenizer

    teacher_tok = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    if teacher_tok.chat_template != student_tok.chat_template:
        raise DistillationCheckError(
            f"{where}: teacher and student chat templates differ; logit KD trains on the teacher's rendered prompts "
            "and would teach the student a format it will not be served with. Use a student with the teacher's "
            "template, or train.method sft (which re-renders each trace in the student's template)"
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


def check_template_keeps_turn(tokenizer, where: str) -> None:
    """A chat template may rewrite the assistant turn it renders: DeepSeek-R1-Distill's keeps only what follows
    `</think>`. Trained through it, a student would learn the answers without their reasoning."""
    turn = "<think>\nstep one\n</think>\n\nthe answer"
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": turn}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if turn not in rendered:
        raise DistillationCheckError(
            f"{where}: the chat template does not render the assistant turn as given (a <think> trace comes out "
            f"as {rendered[-60:]!r}); the student would be trained without the reasoning. Give the student a "
            "template that keeps the whole turn (tokenizer_config.json chat_template)"
        )


ROUND_TRIP_PROBE = "Hello world,\n  x = 1 + 2  # 你好, café\n\\boxed{3}"


def check_round_trip(tokenizer, where: str) -> None:
    """Decoding what was encoded gives the text back. transformers 5 loads some published byte-level BPE
    tokenizers as SentencePiece ones (DeepSeek's, labelled LlamaTokenizerFast: huggingface/transformers#45488),
    which drop every space and non-Latin character without an error."""
    ids = tokenizer(ROUND_TRIP_PROBE, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if back != ROUND_TRIP_PROBE:
        raise DistillationCheckError(
            f"{where}: the tokenizer ({type(tokenizer).__name__}) does not round-trip text: {ROUND_TRIP_PROBE!r} "
            f"comes back as {back!r}. Its tokenizer_config.json tokenizer_class may not match its tokenizer.json "
            "(e.g. LlamaTokenizerFast on a byte-level BPE); set it to PreTrainedTokenizerFast"
        )


def check_shared_bpe(teacher_tok, student_tok, where: str) -> dict[str, tuple[int | None, int | None]]:
    """Teacher and student split text into the same ids (the base vocabulary below the added tokens is one), so a
    draft's proposals are the teacher's tokens. Returns the added tokens they do not share, as {token: (teacher id,
    student id)}: R1-Distill and Qwen2.5 share Qwen's 151,643 BPE ids and differ in their chat tokens."""
    t_added, s_added = teacher_tok.get_added_vocab(), student_tok.get_added_vocab()
    t = {k: v for k, v in teacher_tok.get_vocab().items() if k not in t_added}
    s = {k: v for k, v in student_tok.get_vocab().items() if k not in s_added}
    if t != s:
        only_t, moved = _differences(t, s)
        raise DistillationCheckError(
            f"{where}: teacher and student split text differently (base vocabularies {len(t)} vs {len(s)} tokens; "
            f"teacher-only {only_t}; other ids {moved}); a draft must share the teacher's tokenizer"
        )
    return {
        k: (t_added.get(k), s_added.get(k))
        for k in sorted(set(t_added) | set(s_added))
        if t_added.get(k) != s_added.get(k)
    }
