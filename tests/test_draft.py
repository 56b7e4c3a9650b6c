"""The draft artifact: the teacher's vocabulary, or a refusal; the embedding padded when only its size differs."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.checks import DistillationCheckError
from tasks.draft import make_draft


def test_draft_is_padded_to_a_teacher_with_a_larger_embedding(tiny_student, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from distillery.demo.assets import TEACHER_DIR

    teacher = AutoModelForCausalLM.from_pretrained(TEACHER_DIR)
    teacher.resize_token_embeddings(576, mean_resizing=False)  # padded to a multiple of 64, as many hub models are
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    made = make_draft(str(tmp_path / "teacher"), str(tiny_student), tmp_path / "draft")
    assert made["padded_from"] == 512
    assert json.loads((tmp_path / "draft" / "config.json").read_text())["vocab_size"] == 576
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    ids = tokenizer(["Question: Mia has 2 pens.\nAnswer:"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        new, old = draft(input_ids=ids).logits, student(input_ids=ids).logits
    torch.testing.assert_close(new[..., :512], old)  # the student's distribution, unchanged
    assert (new[..., 512:] == 0).all()


def test_draft_with_another_tokenizer_is_refused(tiny_student, tmp_path):
    from transformers import AutoModelForCausalLM

    from distillery.demo.assets import build_tokenizer

    other = build_tokenizer(["a corpus with different merges entirely"] * 30)
    AutoModelForCausalLM.from_pretrained(tiny_student).save_pretrained(tmp_path / "teacher")
    other.save_pretrained(tmp_path / "teacher")
    with pytest.raises(DistillationCheckError, match="vocabularies differ"):
        make_draft(str(tmp_path / "teacher"), str(tiny_student), tmp_path / "draft")
    assert not (tmp_path / "draft").exists()
