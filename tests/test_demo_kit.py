"""The demo kit: a verifiable task, disjoint splits, a tokenizer with pad != eos, a teacher that can do it."""

from __future__ import annotations

import json

import pytest

from distillery.artifacts import read_jsonl
from distillery.config import DataConfig
from distillery.data import DEMO_EVAL_FILE, load_prompts
from distillery.demo import task
from distillery.demo.assets import TEACHER_DIR


def test_eval_splits_are_the_seeded_ones():
    from distillery.demo.build_teacher import OOD_FILE, eval_rows

    assert read_jsonl(DEMO_EVAL_FILE) == eval_rows(task.eval_problems())
    ood = read_jsonl(OOD_FILE)
    assert ood == eval_rows(task.ood_eval_problems())
    assert {r["kind"] for r in ood} == {"ood"}
    kinds = [r["kind"] for r in read_jsonl(DEMO_EVAL_FILE)]
    assert 0.15 < kinds.count("hard") / len(kinds) < 0.35  # HARD_FRACTION of the in-distribution split


def test_train_prompts_are_disjoint_from_eval():
    evals = {r["question"] for r in read_jsonl(DEMO_EVAL_FILE)}
    train = load_prompts(DataConfig(source="demo", num_prompts=2000))
    assert len(train) == 2000 and not evals & {r["prompt"] for r in train}
    assert len({r["id"] for r in train}) == 2000


def test_gold_traces_verify_and_parse_back_to_their_choices():
    import random

    rng = random.Random(0)
    for p in list(task.problems(seed=3, count=200)) + task.ood_eval_problems()[:50]:
        assert task.extract_answer(p.trace) == str(p.answer)
        assert p.trace.startswith(" <think>") and p.trace.endswith(f"The answer is {p.answer}.")
        c = task.parse_trace(p, p.trace)
        assert c is not None and task.render(p, c) == p.trace
        assert task.parse_trace(p, task.sample_trace(p, rng)) is not None
        # a wrong result, a wrong final answer, or an unknown phrasing is no gold trace
        assert task.parse_trace(p, p.trace.replace(f"is {p.answer}.", f"is {p.answer + 1}.")) is None
        assert task.parse_trace(p, p.trace.replace("</think>", "</think> Hi.")) is None


def test_several_orders_are_right_but_never_one_that_goes_below_zero():
    p = task.Problem("q", 6, "", "Mia", "She", "pens", 2, (("+", 5), ("-", 1)))
    assert task.parse_trace(p, " <think>2-1=1. 1+5=6.</think> So she has 6 pens. The answer is 6.") is not None
    assert task.parse_trace(p, " <think>5+2=7. 7-1=6.</think> So she has 6 pens. The answer is 6.") is not None
    q = task.Problem("q", 6, "", "Mia", "She", "pens", 2, (("+", 5), ("-", 3)))
    assert task.parse_trace(q, " <think>2-3=-1. -1+5=4.</think> So she has 4 pens. The answer is 4.") is None
    # exact entropy: 2 orders, 4 + 2 step forms per order, 10 openers, 6 joiners, the closing slots
    import math

    expected = (
        math.log(2)
        + math.log(4 * 2)
        + math.log(len(task.OPENERS))
        + math.log(len(task.JOINERS))
        + math.log(task.CLOSER_WAYS)
    )
    assert task.trace_entropy(p) == pytest.approx(expected)


def test_gold_traces_carry_dark_knowledge(tokenizer):
    """The task itself: a perfect teacher's entropy per completion token is well above zero."""
    from distillery.demo.profile import gold_entropy

    assert gold_entropy(task.eval_problems(), tokenizer) > 0.3


def test_tokenizer_pad_is_not_eos_and_think_tags_are_single_tokens(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for tag in ("<think>", "</think>"):
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    ids = tokenizer(" <think>12+3=15.</think>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " <think>12+3=15.</think>"  # tags survive decoding


def test_shipped_teacher_is_safetensors_and_documented(tokenizer):
    """What the build measured and recorded: accuracy in distribution between 85% and 95%, partly right out of
    it, at least 0.3 nats/token on its own T = 1 samples, and 10x the student's parameters."""
    from distillery.demo import assets

    assert (TEACHER_DIR / "model.safetensors").exists() and not list(TEACHER_DIR.glob("*.bin"))
    meta = json.loads((TEACHER_DIR / "demo_teacher.json").read_text())
    assert 0.85 <= meta["accuracy"] <= 0.95
    assert 0.05 < meta["ood_accuracy"] < meta["accuracy"]
    assert meta["entropy_nats_per_token"] >= 0.3 and meta["top1_mass"] < 0.95
    student = sum(p.numel() for p in assets.init_model(assets.STUDENT_SHAPE, tokenizer, 0).parameters())
    assert meta["params"] >= 10 * student


def test_teacher_profile_measures_a_model(tmp_path, tokenizer):
    """The build's measurement on a random model: accuracy 0, entropy near log V, nothing parsed as gold."""
    from distillery.demo import assets, profile

    path = assets.save_atomic(assets.init_model(assets.STUDENT_SHAPE, tokenizer, 1), tokenizer, tmp_path / "m")
    probs = task.eval_problems()[:8]
    shape = profile.sampled_profile(str(path), probs, samples=2, max_new_tokens=12)
    assert shape["sampled_accuracy"] == 0 and shape["gold_trace_share"] == 0
    assert 4.0 < shape["entropy_nats_per_token"] <= 6.3 and shape["top1_mass"] < 0.2
    assert 150 <= shape["tokens"] <= 8 * 2 * 12  # positions after an eos do not count


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
