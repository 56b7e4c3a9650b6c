"""The demo kit: a verifiable task, disjoint splits, a tokenizer with pad != eos, a teacher that can do it."""

from __future__ import annotations

import json

from distillery.artifacts import read_jsonl
from distillery.config import DataConfig
from distillery.data import DEMO_EVAL_FILE, load_prompts
from distillery.demo import task
from distillery.demo.assets import TEACHER_DIR


def test_eval_split_is_the_seeded_one():
    stored = read_jsonl(DEMO_EVAL_FILE)
    assert stored == [{"question": p.question, "answer": str(p.answer)} for p in task.eval_problems()]


def test_train_prompts_are_disjoint_from_eval():
    evals = {r["question"] for r in read_jsonl(DEMO_EVAL_FILE)}
    train = load_prompts(DataConfig(source="demo", num_prompts=2000))
    assert len(train) == 2000 and not evals & {r["prompt"] for r in train}
    assert len({r["id"] for r in train}) == 2000


def test_gold_traces_verify():
    for p in task.problems(seed=3, count=200):
        assert task.extract_answer(p.trace) == str(p.answer)
        assert p.trace.startswith(" <think>") and "</think> The answer is" in p.trace


def test_tokenizer_pad_is_not_eos_and_think_tags_are_single_tokens(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for tag in ("<think>", "</think>"):
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    ids = tokenizer(" <think>12+3=15.</think>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " <think>12+3=15.</think>"  # tags survive decoding


def test_shipped_teacher_is_safetensors_and_documented():
    assert (TEACHER_DIR / "model.safetensors").exists() and not list(TEACHER_DIR.glob("*.bin"))
    meta = json.loads((TEACHER_DIR / "demo_teacher.json").read_text())
    assert meta["eval_accuracy_greedy"] >= 0.8
