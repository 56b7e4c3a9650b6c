"""Every filter rule and verifier: traces that must pass and traces that must fail."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import get_args

import pytest

from distillery.config import FilterConfig, Pipeline
from distillery.results import Traces
from distillery.runtime import RunContext
from distillery.verify import VERIFIERS, extract_boxed, normalise, parse_number, think_ok
from tasks.filter import RULES, eval_texts, filter_task, filter_traces, length_histogram, ngrams, report_figure, verdict

GOOD = " <think>3+5=8. 8-2=6.</think> The answer is 6."


def row(completion=GOOD, answer="6", n=20, finish="stop", prompt="Q1", prompt_text="Q1\nAnswer:"):
    return {
        "prompt_id": prompt,
        "prompt": prompt,
        "prompt_text": prompt_text,
        "answer": answer,
        "completion": completion,
        "num_tokens": n,
        "finish_reason": finish,
    }


def long_trace(n_words=400, change_at=None, answer="6"):
    """A long, shingle-rich reasoning trace; `change_at` swaps one word to make a near duplicate."""
    w = [f"step{i}" for i in range(n_words)]
    if change_at is not None:
        w[change_at] = "CHANGED"
    return f"<think>{' '.join(w)}</think> The answer is {answer}."


@pytest.mark.parametrize(
    "text,ok",
    [
        (GOOD, True),
        ("<think>a</think> The answer is 1.", True),
        (" The answer is 6.", False),  # no reasoning
        ("<think>3+5=8. The answer is 8.", False),  # never closed
        ("<think></think> The answer is 6.", False),  # empty reasoning
        ("<think>a<think>b</think> The answer is 6.", False),  # nested
        ("<think>a</think> x </think> The answer is 6.", False),  # stray closing tag
        ("<think>a</think>", False),  # nothing after the reasoning
    ],
)
def test_think_format(text, ok):
    assert think_ok(text) is ok


def test_each_rule_drops_what_it_should():
    cfg = FilterConfig(min_tokens=5, max_tokens=30)
    rows = [
        row(),  # kept
        row(finish="length"),  # truncated
        row(completion=" The answer is 6."),  # think_format
        row(n=3),
        row(n=31),  # length
        row(answer="7"),  # answer
        row(completion=" <think>3+5=8.</think> no answer"),  # answer (none found)
        row(),  # duplicate of the first
        row(prompt="Q2", answer="6"),  # same completion, other prompt: kept
    ]
    kept, report = filter_traces(rows, cfg)
    assert report["dropped"] == {
        "truncated": 1,
        "think_format": 1,
        "length": 2,
        "contaminated": 0,
        "answer": 2,
        "duplicate": 1,
        "near_duplicate": 0,
        "over_k": 0,
    }
    assert report["kept"] == len(kept) == 2 and report["input"] == 9
    assert report["prompts"] == 2 and report["prompts_with_a_kept_trace"] == 2


def test_every_rule_in_order_and_first_failure_counts():
    """One trace per rule, each also failing a later rule: it is counted against the first."""
    question = "Question: Ann has 2 cats. She gets 3 more. Then she gets 4 more. How many cats does Ann have now?"
    cfg = FilterConfig(max_tokens=500, keep_per_prompt=1, decontam_ngram=13)
    rows = [
        row(finish="length", answer="7"),  # truncated (and wrong)
        row(completion="The answer is 7.", answer="7"),  # think_format (and no think)
        row(n=0, answer="5"),  # length (and wrong)
        {**row(answer="5", prompt=question + "\nAnswer:"), "prompt_id": "QC"},  # contaminated (and wrong)
        row(answer="7"),  # answer
        row(completion=long_trace()),
        row(completion=long_trace()),  # kept, duplicate
        row(completion=long_trace(change_at=200)),  # near_duplicate
        row(completion=long_trace(n_words=50, answer="6"), n=40),  # over_k: longer than the first
    ]
    kept, report = filter_traces(rows, cfg, eval_set=[question + "\nAnswer:"])
    assert list(report["dropped"]) == list(RULES)
    assert report["dropped"] == dict.fromkeys(RULES, 1)
    assert [r["completion"] for r in kept] == [long_trace()]
    assert sum(report["dropped"].values()) + report["kept"] == report["input"]


def test_answer_is_taken_after_the_reasoning():
    cfg = FilterConfig()
    # "The answer is 6" inside <think> must not count; the final one says 7.
    wrong = row(completion="<think>The answer is 6?</think> The answer is 7.", answer="6")
    assert verdict(wrong, cfg) == "answer"
    assert verdict(row(completion="<think>maybe 7</think> The answer is 6.", answer="6"), cfg) is None


def test_prefilled_think_tag_counts():
    r = row(completion="3+5=8.</think> The answer is 8.", answer="8", prompt_text="<|user|>Q<|assistant|><think>\n")
    assert verdict(r, FilterConfig()) is None


def test_switching_rules_off():
    cfg = FilterConfig(
        verifier="none",
        require_think=False,
        drop_truncated=False,
        dedupe=False,
        min_tokens=0,
        near_dedupe=False,
        decontaminate=False,
    )
    rows = [row(completion="anything", finish="length", answer="x")] * 2
    kept, report = filter_traces(rows, cfg, eval_set=["Q1"])
    assert len(kept) == 2 and sum(report["dropped"].values()) == 0


# ---- verifiers ----------------------------------------------------------------------------------------------


def test_registry_matches_the_config_choices():
    assert set(VERIFIERS) == set(get_args(FilterConfig.model_fields["verifier"].annotation))


def check(verifier: str, completion: str, answer: str, **cfg) -> bool:
    return VERIFIERS[verifier](completion, answer, FilterConfig(verifier=verifier, **cfg))


@pytest.mark.parametrize(
    "completion,answer,ok",
    [
        ("<think>x</think> The answer is 6.", "6", True),
        ("<think>x</think> The answer is 6. Or The answer is 7.", "7", True),  # the last match
        ("<think>x</think> The answer is 6.", "6.0", True),  # normalised
        ("<think>x</think> The answer is 6.", "7", False),
        ("<think>The answer is 6.</think> I give up.", "6", False),  # only inside the reasoning
        ("<think>x</think> 6", "6", False),  # pattern not found
    ],
)
def test_regex_verifier(completion, answer, ok):
    assert check("regex", completion, answer) is ok


@pytest.mark.parametrize(
    "completion,answer,ok",
    [
        ("<think>capital?</think> Paris", "paris", True),  # whole answer, case-folded
        ("<think>capital?</think>  Paris.\n", "Paris", True),  # stripped, final period
        ("<think>x</think> The answer is 42.", "42", True),  # the pattern's capture
        ("<think>x</think> 1,000", "1000", True),  # numbers normalised
        ("<think>capital?</think> Lyon", "Paris", False),
        ("<think>capital?</think> Paris is the capital", "Paris", False),  # not the whole answer
        ("<think>Paris</think> Lyon", "Paris", False),
    ],
)
def test_exact_verifier(completion, answer, ok):
    assert check("exact", completion, answer) is ok


@pytest.mark.parametrize(
    "completion,answer,ok",
    [
        ("<think>x</think> The answer is 1,000.", "1000", True),
        ("<think>x</think> The answer is 3.50", "3.5", True),  # the default pattern stops at 3
        ("<think>x</think> The answer is -2.", "-2", True),
        ("<think>x</think> The answer is 3/4", "0.75", True),
        ("<think>x</think> The answer is 0.75", "3/4", True),  # fraction reference
        ("<think>x</think> so it comes to $1,250.00 in total", "1250", True),  # no match: last number
        ("<think>x</think> The answer is 3.5", "3.6", False),
        ("<think>x</think> The answer is 2", "-2", False),
        ("<think>x</think> no idea", "2", False),
        ("<think>2</think> no idea", "2", False),
        ("<think>x</think> The answer is 3/0", "3", False),  # not a number
    ],
)
def test_numeric_verifier(completion, answer, ok):
    assert check("numeric", completion, answer) is ok


def test_numeric_tolerance_is_relative():
    text = "<think>x</think> The answer is 1000.0004"
    assert check("numeric", text, "1000", answer_pattern=r"The answer is (\S+)")  # 4e-7 <= 1e-6
    assert not check("numeric", text, "1000", answer_pattern=r"The answer is (\S+)", tolerance=1e-9)
    assert check("numeric", "<think>x</think> The answer is 1.04", "1", tolerance=0.05)
    assert parse_number("1,000") == 1000 and parse_number("3/4") == 0.75 and parse_number("$5") == 5
    assert parse_number("abc") is None


@pytest.mark.parametrize(
    "completion,answer,ok",
    [
        (r"<think>x</think> So \boxed{\frac{1}{2}}.", "0.5", True),
        (r"<think>x</think> \boxed{0.5}", r"\frac{1}{2}", True),
        (r"<think>x</think> \boxed{1+x^2}", "x^2+1", True),  # bare LaTeX reference
        (r"<think>x</think> The answer is $\frac{3}{4}$.", "0.75", True),  # no box: the final expression
        (r"<think>x</think> \boxed{3}", "4", False),
        (r"<think>\boxed{4}</think> \boxed{3}", "4", False),
        ("<think>x</think> I cannot tell.", "4", False),
    ],
)
def test_math_verifier(completion, answer, ok):
    assert check("math", completion, answer) is ok


def test_math_verifier_runs_in_a_worker_thread():
    """Prefect runs tasks in threads, where math-verify's signal-based timeout cannot work."""
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(check, "math", r"<think>x</think> \boxed{\frac{1}{2}}", "0.5").result()
        assert not pool.submit(check, "math", r"<think>x</think> \boxed{3}", "4").result()


@pytest.mark.parametrize(
    "completion,answer,ok",
    [
        (r"<think>x</think> \boxed{1,000}", "1000", True),
        (r"<think>x</think> \boxed{\frac{1}{2}}", "0.5", True),  # via math-verify
        (r"<think>x</think> \boxed{\text{(B)}}", r"\text{(B)}", True),  # plain text when parsing fails
        (r"<think>x</think> \boxed{12}", "13", False),
        ("<think>x</think> The answer is 13.", "13", False),  # boxed needs a box
    ],
)
def test_boxed_verifier(completion, answer, ok):
    assert check("boxed", completion, answer) is ok


def test_boxed_helpers():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{2}") == "2" and extract_boxed("none") is None
    assert normalise("2.0") == "2" and normalise(" $5$ ") == "5"


def test_none_verifier_keeps_any_answer():
    assert check("none", "<think>x</think> whatever", "6")
    assert verdict(row(answer="7"), FilterConfig(verifier="none")) is None


# ---- near duplicates ----------------------------------------------------------------------------------------


def test_near_duplicates_within_a_prompt_are_dropped():
    cfg = FilterConfig()
    rows = [
        row(completion=long_trace()),
        row(completion=long_trace(change_at=200)),  # J ~ 0.975
        row(completion=long_trace(change_at=100)),
    ]
    kept, report = filter_traces(rows, cfg)
    assert report["dropped"]["near_duplicate"] == 2 and len(kept) == 1


def test_near_duplicates_of_other_prompts_are_kept():
    rows = [row(completion=long_trace(), prompt="Q1"), row(completion=long_trace(change_at=200), prompt="Q2")]
    kept, report = filter_traces(rows, FilterConfig())
    assert len(kept) == 2 and report["dropped"]["near_duplicate"] == 0


def test_different_traces_and_switched_off_are_kept():
    half = " ".join(f"step{i}" if i < 200 else f"other{i}" for i in range(400))
    rows = [row(completion=long_trace()), row(completion=f"<think>{half}</think> The answer is 6.")]  # J ~ 0.33
    assert filter_traces(rows, FilterConfig())[1]["kept"] == 2
    near = [row(completion=long_trace()), row(completion=long_trace(change_at=200))]
    assert filter_traces(near, FilterConfig(near_dedupe=False))[1]["kept"] == 2
    assert filter_traces(near, FilterConfig(near_dedupe_threshold=1.0))[1]["kept"] == 2


def test_short_near_duplicates_are_compared_whole():
    """Fewer words than the shingle size: one shingle, the whole text, so case and spacing do not hide a copy."""
    rows = [
        row(completion="<think>Add, then subtract.</think> The answer is 6."),
        row(completion="<think>ADD, then  subtract.</think>\nThe answer is 6."),  # only case and spacing
        row(completion="<think>Add, then divide.</think> The answer is 6."),
    ]  # a different step
    kept, report = filter_traces(rows, FilterConfig(near_dedupe_ngram=8))  # 7 words < 8
    assert report["dropped"]["near_duplicate"] == 1 and len(kept) == 2


def test_failed_traces_do_not_shadow_later_ones():
    """Near-dedupe compares with kept traces only: a wrong first sample does not block a right second one."""
    rows = [row(completion=long_trace(answer="7")), row(completion=long_trace(answer="6"))]
    kept, report = filter_traces(rows, FilterConfig())
    assert report["dropped"]["answer"] == 1 and len(kept) == 1 and kept[0]["completion"].endswith("6.")


# ---- decontamination ----------------------------------------------------------------------------------------

EVAL_Q = "Question: Max has 2 shells. He finds 2 more. Then he sells 2. How many shells does Max have now?\nAnswer:"


def test_ngrams():
    assert ngrams("A b, c!", 13) == {"a b c"}  # shorter than n: the whole normalised text
    assert ngrams("one two three", 2) == {"one two", "two three"}
    assert ngrams("", 13) == set()


@pytest.mark.parametrize(
    "prompt,n,dropped",
    [
        (EVAL_Q, 13, True),  # a copy
        (
            "question: max has 2 shells - he finds 2 more; then he sells 2. how many shells does max have now? answer:",
            32,
            True,
        ),  # a copy up to case and punctuation
        ("Solve this. " + EVAL_Q + " Think step by step.", 13, True),  # embedded in a longer prompt
        ("Solve this. " + EVAL_Q + " Think step by step.", 32, False),  # ... which only n-grams see
        ("Question: Max has 9 shells. He finds 2 more. Then he sells 2. How many shells does Max have now?", 13, True),
        ("Question: Max has 9 shells. He finds 2 more. Then he sells 2. How many shells does Max have now?", 32, False),
        ("Question: Max has 9 coins. He finds 4 more. Then he sells 2. How many coins does Max have now?", 13, False),
        ("Question: Max has 2 shells.", 13, False),
    ],
)
def test_contaminated_prompts(prompt, n, dropped):
    cfg = FilterConfig(decontam_ngram=n)
    r = {**row(), "prompt": prompt, "prompt_id": "p"}
    assert (verdict(r, cfg, eval_set=[EVAL_Q]) == "contaminated") is dropped
    assert verdict(r, FilterConfig(decontaminate=False, decontam_ngram=n), eval_set=[EVAL_Q]) is None


def test_eval_texts_reads_the_local_demo_task():
    texts = eval_texts(["demo_arith"])
    assert len(texts) == 200
    assert texts[0] == (
        "Question: Tom has 4 apples. He finds 1 more. Then he buys 2 more. How many apples does Tom have now?\nAnswer:"
    )


def test_eval_texts_from_a_task_folder(tmp_path, caplog):
    task = tmp_path / "mytask"
    (task / "data").mkdir(parents=True)
    (task / "mytask.yaml").write_text(
        "task: mytask\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/test.jsonl\n"
        "    train: data/train.jsonl\ntest_split: test\nfewshot_split: train\ndoc_to_text: '{{ problem }}'\n"
    )
    (task / "data" / "test.jsonl").write_text(json.dumps({"problem": "What is two plus two?", "answer": "4"}) + "\n")
    (task / "data" / "train.jsonl").write_text(json.dumps({"problem": "A train example", "answer": "1"}) + "\n")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "odd.yaml").write_text("task: odd\ndoc_to_text: 'Q: {{q}} A:'\ndataset_kwargs: {data_files: x.jsonl}\n")
    with caplog.at_level(logging.WARNING, logger="tasks.filter"):
        texts = eval_texts(["mytask", "gsm8k", "odd"], root=tmp_path)
    assert texts == ["What is two plus two?"]  # the scored split only, not the few-shot one
    assert "'gsm8k' is not in" in caplog.text and "'odd' has no YAML" in caplog.text


def test_demo_templates_are_not_copies():
    """Demo prompts share template phrases with eval questions: the demo pipeline compares questions whole."""
    from distillery.config import load_file
    from distillery.data import REPO

    demo = load_file(REPO / "pipelines.yaml").pipelines["demo"].filter
    other = (
        "Question: Sam has 7 apples. He loses 3. Then he is given 9 more. How many apples does Sam have now?\nAnswer:"
    )
    evals = [
        "Question: Sam has 11 apples. He trades away 6. Then he is given 9 more. How many apples does Sam have "
        "now?\nAnswer:"
    ]
    r = {**row(), "prompt": other, "prompt_id": "p"}
    assert verdict(r, FilterConfig(), eval_set=evals) == "contaminated"  # 13-gram: a shared template tail
    assert verdict(r, demo, eval_set=evals) is None
    assert verdict({**r, "prompt": evals[0]}, demo, eval_set=evals) == "contaminated"


# ---- best k of n and the report -----------------------------------------------------------------------------


def test_keep_per_prompt_prefers_the_shortest():
    rows = [row(completion=long_trace(n_words=10 * i, answer="6"), n=n) for i, n in enumerate((30, 10, 20, 10), 1)]
    rows += [row(answer="7", n=5)]  # wrong: counted as answer, not over_k
    rows += [row(completion=long_trace(n_words=7), prompt="Q2", n=50)]
    kept, report = filter_traces(rows, FilterConfig(keep_per_prompt=2, max_tokens=100))
    assert [r["num_tokens"] for r in kept] == [10, 10, 50]  # input order kept
    assert kept[0]["completion"] == rows[1]["completion"]
    assert report["dropped"]["over_k"] == 2 and report["dropped"]["answer"] == 1
    all_kept, rep = filter_traces(rows, FilterConfig(max_tokens=100))
    assert len(all_kept) == 5 and rep["dropped"]["over_k"] == 0
    assert filter_traces(rows, FilterConfig(keep_per_prompt=9, max_tokens=100))[1]["kept"] == 5


def test_report_per_prompt_stats_and_lengths():
    rows = (
        [row(completion=long_trace(n_words=5 * i), prompt="A", n=10 * i) for i in range(1, 5)]  # 4/4
        + [row(prompt="B"), row(prompt="B", answer="7")]  # 1/2
        + [row(prompt="C", answer="7")] * 3
    )  # 0/3
    kept, report = filter_traces(rows, FilterConfig(keep_per_prompt=1))
    pr = report["pass_rate_per_prompt"]
    assert pr["mean"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert pr["histogram"] == {"0.0-0.2": 1, "0.2-0.4": 0, "0.4-0.6": 1, "0.6-0.8": 0, "0.8-1.0": 1}
    assert report["kept_per_prompt_histogram"] == {0: 1, 1: 2}
    assert report["keep_rate"] == pytest.approx(2 / 9) and report["prompts_with_a_kept_trace"] == 2
    assert report["length_histogram"] == {"edges": [10, 12, 14, 16, 18, 20, 22], "counts": [1, 0, 0, 0, 0, 1]}
    assert sum(report["dropped"].values()) + report["kept"] == report["input"]


def test_length_histogram():
    assert length_histogram([]) == {"edges": [], "counts": []}
    assert length_histogram([7, 7]) == {"edges": [7, 8], "counts": [2]}
    h = length_histogram(list(range(100, 200)))
    assert sum(h["counts"]) == 100 and len(h["counts"]) == 10 and h["edges"][0] == 100 and h["edges"][-1] > 199


def test_report_figure(tmp_path):
    import matplotlib.pyplot as plt

    _, report = filter_traces([row(), row(answer="7")], FilterConfig())
    fig = report_figure(report)
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(RULES)
    fig.savefig(tmp_path / "f.png")
    plt.close(fig)
    _, empty = filter_traces([row(answer="7")], FilterConfig())  # nothing kept: still draws
    plt.close(report_figure(empty))


class Recorder:
    run_id = "recorded-run"

    def __init__(self):
        self.metrics, self.dicts, self.figures = {}, {}, []

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_dict(self, data, name):
        self.dicts[name] = data

    def log_figure(self, fig, name):
        self.figures.append((name, len(fig.axes)))


def test_filter_task_logs_the_report(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rec = Recorder()

    class Tracker:
        @contextmanager
        def stage(self, *a, **k):
            yield rec

    monkeypatch.setattr(RunContext, "tracker", lambda self: Tracker())
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in [row(), row(), row(answer="7", prompt="Q2")]))
    cfg = Pipeline(teacher={"path": "demo:teacher"}, student={"path": "demo:student"})
    ctx = RunContext("t", str(tmp_path / "run"), "parent", "exp", "none")
    result = filter_task.fn(cfg, ctx, Traces(str(traces), "generate"))
    rep = json.loads((tmp_path / "run" / "filter" / "report.json").read_text())
    assert rep["kept"] == 1 and rep["decontamination"]["eval_texts"] == 200
    assert rec.dicts["filter_report.json"] == result.report and result.figures == {"kept": 1, "keep_rate": 1 / 3}
    assert result.path == str(tmp_path / "run" / "filter" / "kept.jsonl") and result.run_id == "recorded-run"
    assert len(result.content_hash) == 64
    assert {f"dropped.{r}" for r in RULES} <= set(rec.metrics) and rec.metrics["dropped.duplicate"] == 1
    assert rec.figures == [("filter_report.png", 2)] and not plt.get_fignums()  # logged, then closed
