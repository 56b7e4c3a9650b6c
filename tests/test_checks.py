"""Each silent failure of distillation is refused with a message that says what and where."""

from __future__ import annotations

import pytest
import torch

from distillery.checks import (
    DistillationCheckError,
    check_loss_mask,
    check_teacher_frozen,
    check_temperature_both_sides,
)


def test_teacher_must_be_frozen_and_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
    with pytest.raises(DistillationCheckError, match="train mode"):
        check_teacher_frozen(model)
    model.eval()
    with pytest.raises(DistillationCheckError, match="require grad"):
        check_teacher_frozen(model)
    model.requires_grad_(False)
    check_teacher_frozen(model)


def test_loss_mask_never_covers_prompt_or_pad():
    attn = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])  # right pad, then left pad
    good = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, 7, 8]])
    check_loss_mask(good, attn, prompt_lengths=[2, 2])
    on_pad = good.clone()
    on_pad[0, 4] = 1
    with pytest.raises(DistillationCheckError, match="pad positions"):
        check_loss_mask(on_pad, attn)
    on_prompt = good.clone()
    on_prompt[1, 2] = 3  # second prompt token of the left-padded row
    with pytest.raises(DistillationCheckError, match="row 1: the loss mask covers prompt tokens"):
        check_loss_mask(on_prompt, attn, prompt_lengths=[2, 2])
    with pytest.raises(DistillationCheckError, match="no position counts"):
        check_loss_mask(torch.full((2, 5), -100), attn)


def test_temperature_applied_to_one_side_is_refused():
    check_temperature_both_sides("raw_logprobs", 0.7, 2.0)
    check_temperature_both_sides("processed_logprobs", 1.0, 1.0)
    with pytest.raises(DistillationCheckError, match="temper the teacher and the student differently"):
        check_temperature_both_sides("processed_logprobs", 0.7, 2.0)


def test_logit_kd_refuses_a_student_served_in_another_chat_format(tmp_path):
    """Logit KD trains on the teacher's rendered prompts, token for token: a student whose chat template differs
    would learn a format it is never served with."""
    from transformers import AutoTokenizer

    from distillery.checks import check_same_template

    from .conftest import chat_teacher

    teacher = chat_teacher(tmp_path / "t", "{% for m in messages %}<t>{{ m['content'] }}{% endfor %}")
    same = AutoTokenizer.from_pretrained(teacher)
    check_same_template(str(teacher), same, "logit_kd")
    other = AutoTokenizer.from_pretrained(
        chat_teacher(tmp_path / "s", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    )
    with pytest.raises(DistillationCheckError, match="chat templates differ"):
        check_same_template(str(teacher), other, "logit_kd")


def test_student_pad_token_replaces_an_eos_pad_and_must_be_one_token(tmp_path):
    """R1-Distill's tokenizers pad with eos, which training refuses; student.pad_token names another token."""
    from transformers import AutoTokenizer

    from distillery.demo.assets import TEACHER_DIR
    from distillery.training import student_tokenizer

    folder = tmp_path / "padeos"
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(folder)
    with pytest.raises(DistillationCheckError, match="pad token equals eos"):
        student_tokenizer(str(folder), None, "train")
    unk = tok.convert_ids_to_tokens(0)
    fixed = student_tokenizer(str(folder), None, "train", pad_token=unk)
    assert fixed.pad_token == unk and fixed.pad_token_id != fixed.eos_token_id
    with pytest.raises(DistillationCheckError, match="student.pad_token: '<nope>' is not one token"):
        student_tokenizer(str(folder), None, "train", pad_token="<nope>")
    with pytest.raises(DistillationCheckError, match="pad token equals eos"):  # naming eos itself fixes nothing
        student_tokenizer(str(folder), None, "train", pad_token=tok.eos_token)
