"""The comparison table: recovery, held-out perplexity, and the accuracy-vs-size frontier."""

from __future__ import annotations

import pytest

from distillery.results import Evaluation, ModelArtifact
from tasks.report import build_rows, frontier, plot, render


def result(acc, params, mem, ppl=None):
    figures = {
        "accuracy": acc,
        "accuracy_stderr": 0.01,
        "params": params,
        "memory_bytes": mem,
        "tokens_per_s": 100.0,
        "heldout_perplexity": ppl,
    }
    return Evaluation("model", "/models/x", figures)


def test_frontier_keeps_only_models_no_smaller_one_beats():
    pts = [(2.9, 0.99), (0.8, 0.95), (0.6, 0.90), (0.6, 0.10), (0.7, 0.85), (0.3, 0.2)]
    assert frontier(pts) == [(0.3, 0.2), (0.6, 0.90), (0.8, 0.95), (2.9, 0.99)]


def test_rows_carry_recovery_and_perplexity_and_render():
    evals = {
        "teacher": result(0.8, 2_900_000, 11 * 2**20, 1.1),
        "student-sft": result(0.6, 790_000, 3 * 2**20, 1.4),
        "student-nf4": result(0.4, 620_000, 2**19),
    }
    rows = build_rows(evals, None, None)
    by = {r["model"]: r for r in rows}
    assert by["student-sft"]["recovery"] == pytest.approx(0.75) and by["teacher"]["recovery"] == 1.0
    assert by["student-sft"]["perplexity"] == 1.4 and by["student-nf4"]["perplexity"] is None
    table = render(rows)
    assert "75.0%" in table and "held-out ppl" in table and "1.400" in table
    fig = plot(rows)
    assert [ax.get_legend().get_texts()[0].get_text() for ax in fig.axes] == ["frontier", "frontier"]


def test_draft_line_names_greedy_sampled_and_distillspec_figures():
    evals = {"teacher": result(0.8, 2_900_000, 11 * 2**20), "student-sft": result(0.6, 790_000, 3 * 2**20)}
    draft = ModelArtifact(
        label="draft",
        path="/runs/draft",
        stage="draft",
        figures={
            "acceptance_rate": 0.9,
            "mean_accepted_length": 4.5,
            "teacher_tokens_per_s": 100.0,
            "teacher_with_draft_tokens_per_s": 150.0,
            "speedup": 1.5,
            "outputs_identical": 1.0,
            "sampled_temperature": 0.6,
            "sampled_acceptance_rate": 0.8,
            "sampled_mean_accepted_length": 4.1,
            "sampled_speedup": 1.3,
            "distill_steps": 40,
        },
    )
    rows = build_rows(evals, draft, "student-sft")
    assert {r["model"]: r["draft_acceptance"] for r in rows} == {"teacher": None, "student-sft": 0.9}
    table = render(rows, draft)
    assert "speed-up 1.50x" in table and "sampled at T=0.6: acceptance 0.80" in table and "40 DistillSpec" in table


def test_ood_column_appears_when_evaluate_has_an_ood_task():
    with_ood = result(0.8, 2_900_000, 11 * 2**20)
    with_ood.figures.update(ood_accuracy=0.3, ood_accuracy_stderr=0.03)
    rows = build_rows({"teacher": with_ood, "student": result(0.5, 290_000, 2**20)}, None, None)
    table = render(rows)
    assert "OOD accuracy" in table and "0.300 ± 0.030" in table
    assert "OOD accuracy" not in render(build_rows({"teacher": result(0.8, 2_900_000, 11 * 2**20)}, None, None))


def test_ood_task_must_be_one_of_the_tasks():
    from pydantic import ValidationError

    from distillery.config import EvaluateConfig

    assert EvaluateConfig(tasks=["a", "b"], ood_task="b").ood_task == "b"
    with pytest.raises(ValidationError, match="ood_task 'c' is not one of evaluate.tasks"):
        EvaluateConfig(tasks=["a", "b"], ood_task="c")
