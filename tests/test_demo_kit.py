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


def test_runs_starting_together_build_the_demo_student_once(tmp_path, monkeypatch):
    """Two runs on a fresh cache both want the random-init student: one builds it, the other waits and reads it,
    instead of replacing the folder the first is loading from."""
    import threading

    from distillery.demo import assets

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path))
    real, built = assets.init_model, []

    def slow_init(*a, **k):
        built.append(threading.get_ident())
        threading.Event().wait(0.5)  # long enough for the other thread to find no folder and queue on the lock
        return real(*a, **k)

    monkeypatch.setattr(assets, "init_model", slow_init)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(assets.demo_student(seed=3))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(paths) == 2 and paths[0] == paths[1] and (paths[0] / "config.json").exists()
    assert len(built) == 1
    assert not list(paths[0].parent.glob(".*tmp-*"))
