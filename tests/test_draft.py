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
    with pytest.raises(DistillationCheckError, match="split text differently"):
        make_draft(str(tmp_path / "teacher"), str(tiny_student), tmp_path / "draft")
    assert not (tmp_path / "draft").exists()


def _forward_kl(teacher: str, draft: str, records: list[dict]) -> float:
    """Mean KL(teacher || draft) per completion token of `records`, teacher-forced."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    t = AutoModelForCausalLM.from_pretrained(teacher).eval()
    d = AutoModelForCausalLM.from_pretrained(draft).eval()
    total, count = 0.0, 0
    for r in records:
        n = len(tok(r["prompt"])["input_ids"])
        ids = tok(r["prompt"] + r["completion"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lt = t(input_ids=ids).logits[0, n - 1 : -1].log_softmax(-1)
            ld = d(input_ids=ids).logits[0, n - 1 : -1].log_softmax(-1)
        total += (lt.exp() * (lt - ld)).sum().item()
        count += lt.shape[0]
    return total / count


def test_assisted_acceptance_is_one_for_the_teacher_itself_and_low_for_a_random_draft(tiny_student):
    """Speculative sampling accepts a token with min(1, p/q): a draft identical to the teacher is always accepted,
    an untrained one rarely. The counts come from transformers' own decoding loop."""
    from distillery.demo.assets import TEACHER_DIR
    from tasks.draft import assisted_acceptance

    prompts = [
        "Question: Mia has 7 shells. She finds 5 more. How many shells does Mia have now?\nAnswer:",
        "Question: Tom has 12 coins. He loses 3. How many coins does Tom have now?\nAnswer:",
    ]
    same = assisted_acceptance(str(TEACHER_DIR), str(TEACHER_DIR), prompts, k=3, temperature=1.0, max_new_tokens=24)
    assert same["sampled_acceptance_rate"] > 0.97
    assert same["sampled_mean_accepted_length"] > 3.5  # up to k accepted + the teacher's own token per step
    rand = assisted_acceptance(str(TEACHER_DIR), str(tiny_student), prompts, k=3, temperature=1.0, max_new_tokens=24)
    assert rand["sampled_acceptance_rate"] < 0.3
    pos = [rand[f"sampled_acceptance_pos_{i}"] for i in (1, 2, 3)]
    assert pos == sorted(pos, reverse=True)  # a later position is only reached past an accepted earlier one


def test_distillspec_moves_the_draft_toward_the_teacher(tiny_student, gold_records, tmp_path):
    """draft.distill: a few on-policy steps (TRL DistillationTrainer, forward KL) lower the draft's KL to the
    teacher on held-out traces, and the result is a saved model with its manifest."""
    from distillery.config import DataConfig, DraftDistillConfig
    from distillery.data import load_prompts
    from distillery.demo.assets import TEACHER_DIR
    from tasks.draft import distill_draft

    prompts = [r["prompt"] for r in load_prompts(DataConfig(source="demo", num_prompts=256))]
    d = DraftDistillConfig(steps=30, learning_rate=3e-3, batch_size=16, max_new_tokens=32, logging_steps=5)
    before = _forward_kl(str(TEACHER_DIR), str(tiny_student), gold_records[:16])
    figures = distill_draft(str(TEACHER_DIR), str(tiny_student), prompts, tmp_path / "draft-distill", d)
    after = _forward_kl(str(TEACHER_DIR), str(tmp_path / "draft-distill"), gold_records[:16])
    assert figures["steps"] == 30
    assert after < 0.8 * before, (before, after)
    manifest = json.loads((tmp_path / "draft-distill" / "manifest.json").read_text())
    assert manifest["method"] == "distillspec" and manifest["distill"]["beta"] == 0.0


def test_draft_prompts_are_what_the_teacher_sees_and_never_trained_on(tmp_path):
    """A chat pipeline measures and distills the draft on chat-rendered prompts, as generation and serving give
    them to the teacher; the distillation prompts never include a measured one."""
    from distillery.artifacts import write_jsonl
    from distillery.config import load_pipeline, parse_overrides
    from tasks.draft import distill_prompts, draft_prompts

    from .conftest import REPO, chat_teacher

    teacher = chat_teacher(
        tmp_path / "teacher",
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"question {i}", "answer": str(i)} for i in range(40)])
    cfg = load_pipeline(
        REPO / "pipelines.yaml",
        "demo",
        parse_overrides(
            [
                f"teacher.path={teacher}",
                "data.source=jsonl",
                f"data.path={tmp_path / 'q.jsonl'}",
                "data.num_prompts=40",
                "data.chat_template=true",
                "draft.num_prompts=8",
                "draft.distill.num_prompts=100",
            ]
        ),
    )
    measured = draft_prompts(cfg, str(teacher))
    assert measured == [f"<|user|>question {i}<|assistant|>" for i in range(32, 40)]
    train = distill_prompts(cfg, str(teacher), measured)
    assert train == [f"<|user|>question {i}<|assistant|>" for i in range(32)]
