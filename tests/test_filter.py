"""Every filter rule: traces that must pass and traces that must fail."""

from __future__ import annotations

import pytest

from distillery.config import FilterConfig
from tasks.filter import extract_boxed, filter_traces, normalise, think_ok, verdict

GOOD = " <think>3+5=8. 8-2=6.</think> The answer is 6."


def row(completion=GOOD, answer="6", n=20, finish="stop", prompt="Q1", prompt_text="Q1\nAnswer:"):
    return {"prompt_id": prompt, "prompt": prompt, "prompt_text": prompt_text, "answer": answer,
            "completion": completion, "num_tokens": n, "finish_reason": finish}


@pytest.mark.parametrize("text,ok", [
    (GOOD, True),
    ("<think>a</think> The answer is 1.", True),
    (" The answer is 6.", False),                            # no reasoning
    ("<think>3+5=8. The answer is 8.", False),               # never closed
    ("<think></think> The answer is 6.", False),             # empty reasoning
    ("<think>a<think>b</think> The answer is 6.", False),    # nested
    ("<think>a</think> x </think> The answer is 6.", False), # stray closing tag
    ("<think>a</think>", False),                             # nothing after the reasoning
])
def test_think_format(text, ok):
    assert think_ok(text) is ok


def test_each_rule_drops_what_it_should():
    cfg = FilterConfig(min_tokens=5, max_tokens=30)
    rows = [
        row(),                                                # kept
        row(finish="length"),                                 # truncated
        row(completion=" The answer is 6."),                  # think_format
        row(n=3), row(n=31),                                  # length
        row(answer="7"),                                      # answer
        row(completion=" <think>3+5=8.</think> no answer"),   # answer (none found)
        row(),                                                # duplicate of the first
        row(prompt="Q2", answer="6"),                         # same completion, other prompt: kept
    ]
    kept, report = filter_traces(rows, cfg)
    assert report["dropped"] == {"truncated": 1, "think_format": 1, "length": 2, "answer": 2, "duplicate": 1}
    assert report["kept"] == len(kept) == 2 and report["input"] == 9
    assert report["prompts"] == 2 and report["prompts_with_a_kept_trace"] == 2


def test_answer_is_taken_after_the_reasoning():
    cfg = FilterConfig()
    # "The answer is 6" inside <think> must not count; the final one says 7.
    wrong = row(completion="<think>The answer is 6?</think> The answer is 7.", answer="6")
    assert verdict(wrong, cfg, set()) == "answer"
    assert verdict(row(completion="<think>maybe 7</think> The answer is 6.", answer="6"), cfg, set()) is None


def test_prefilled_think_tag_counts():
    r = row(completion="3+5=8.</think> The answer is 8.", answer="8", prompt_text="<|user|>Q<|assistant|><think>\n")
    assert verdict(r, FilterConfig(), set()) is None


def test_boxed_verifier():
    cfg = FilterConfig(verifier="boxed")
    assert extract_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert verdict(row(completion=r"<think>x</think> \boxed{1,000}", answer="1000"), cfg, set()) is None
    assert verdict(row(completion=r"<think>x</think> \boxed{12}", answer="13"), cfg, set()) == "answer"
    assert normalise("2.0") == "2" and normalise(" $5$ ") == "5"


def test_switching_rules_off():
    cfg = FilterConfig(verifier="none", require_think=False, drop_truncated=False, dedupe=False, min_tokens=0)
    rows = [row(completion="anything", finish="length", answer="x")] * 2
    kept, report = filter_traces(rows, cfg)
    assert len(kept) == 2 and sum(report["dropped"].values()) == 0
