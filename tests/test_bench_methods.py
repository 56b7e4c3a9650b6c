"""The methods experiment's plumbing, at toy scale: every arm and seed trains from one pipeline, each is a child run
of one MLflow parent with the same metric names, and the interval arithmetic is right."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_intervals_are_student_t_and_paired_differences_use_common_seeds():
    from scipy import stats

    from distillery.stats import mean_ci, paired_ci

    xs = [0.61, 0.55, 0.70, 0.58, 0.66]
    ci = mean_ci(xs)
    low, high = stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / 5, scale=stats.sem(xs))
    assert (ci.low, ci.high, ci.n) == (pytest.approx(low), pytest.approx(high), 5)
    # a paired difference removes what the two arms share seed by seed: here a constant gap of 0.05
    a = {f"s{i}": x + 0.05 for i, x in enumerate(xs)}
    b = {f"s{i}": x for i, x in enumerate(xs)} | {"only-b": 0.0}
    d = paired_ci(a, b)
    assert d.n == 5 and d.mean == pytest.approx(0.05) and d.half_width == pytest.approx(0, abs=1e-12)
    assert not mean_ci(list(a.values())).low > mean_ci(xs).high  # unpaired, the same gap is not significant
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([0.5, float("nan")])
    assert math.isnan(mean_ci([0.5]).low)  # one run: no interval, said as n=1
    assert str(mean_ci([0.5])) == "0.500 (n=1)"


def test_aggregate_pairs_each_arm_with_sft_seed_by_seed():
    from methods import aggregate

    runs = []
    for seed, base in (("a", 0.5), ("b", 0.6), ("c", 0.4)):
        for arm, delta in (("sft", 0.0), ("hard", -0.2)):
            runs.append(
                {
                    "budget": "short",
                    "arm": arm,
                    "seed_key": seed,
                    "accuracy": base + delta,
                    "steps": 5,
                    "train_seconds": 1.0,
                    "train_tokens_per_s": 10.0,
                    "mfu": 0.1,
                }
            )
    rows = {r["arm"]: r for r in aggregate(runs, ["sft", "hard"], ["short"], ["accuracy"])}
    assert rows["sft"]["seeds"] == 3 and rows["sft"]["accuracy"]["mean"] == pytest.approx(0.5)
    diff = rows["hard"]["accuracy_minus_sft"]
    assert diff["mean"] == pytest.approx(-0.2) and diff["high"] - diff["low"] == pytest.approx(0, abs=1e-9)
    assert "accuracy_minus_sft" not in rows["sft"]


def test_merge_pools_other_inits_and_arms_and_refuses_what_does_not_compare(tmp_path):
    from methods import METRICS, SHAPE_METRICS, aggregate, load_merged, paired_rows, plot, plot_shape, render

    res = REPO / "bench" / "results"
    files = [str(res / "methods-demo-budget.json"), str(res / "methods-temperature.json")]
    runs = load_merged(files, "demo", {"demo": "1600"})
    assert len(runs) == 35 and {r["merged_from"] for r in runs} == {Path(f).name for f in files}
    # the other init's runs of the same arms join them: 10 seeds per arm, pairs over the seeds both ran
    later = [r | {"seed_key": r["seed_key"].replace("init0", "init1")} for r in runs if r["arm"] in ("sft", "kd_t4")]
    every = runs + later
    order = list(dict.fromkeys(r["arm"] for r in every))
    rows = {r["arm"]: r for r in aggregate(every, order, ["demo"], METRICS + SHAPE_METRICS)}
    assert rows["sft"]["seeds"] == 10 and rows["kd_t4"]["seeds"] == 10 and rows["kd_t1"]["seeds"] == 5
    assert rows["kd_t4"]["accuracy_minus_sft"]["n"] == 10 and rows["kd_t1"]["accuracy_minus_sft"]["n"] == 5
    assert "entropy_nats_per_token" not in rows["kd_t4"]  # that file has no --shape figures: none invented
    (pair,) = paired_rows(every, [("kd_t4", "logit_kd")], ["demo"], ["accuracy"])
    assert pair["seeds"] == 5 and pair["accuracy"]["mean"] == pytest.approx(0.060, abs=5e-4)
    teacher = {"accuracy": 0.9, "ood_accuracy": 0.3, "entropy_nats_per_token": 0.35}
    assert "kd_t4" in render(list(rows.values()), teacher)
    import matplotlib.pyplot as plt

    for fig in (plot(list(rows.values()), teacher), plot_shape(list(rows.values()), teacher)):
        plt.close(fig)

    with pytest.raises(SystemExit, match="budget demo is 1600 steps there, 400 here"):
        load_merged(files[:1], "demo", {"demo": "400"})
    with pytest.raises(SystemExit, match="pipeline 'demo', this run 'demo-methods'"):
        load_merged(files[:1], "demo-methods", {"demo": "1600"})
    with pytest.raises(SystemExit, match="is in two merged results"):
        load_merged(files[:1] * 2, "demo", {"demo": "1600"})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="bad.json: not a bench/methods result"):
        load_merged([str(tmp_path / "bad.json")], "demo", {"demo": "1600"})


@pytest.mark.slow
def test_every_arm_and_seed_is_a_child_run_of_one_parent(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "methods.py"),
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "runs"),
            "--data-seeds",
            "2",
            "--init-seeds",
            "1",
            "--budget",
            "tiny=2",
            "--limit",
            "8",
            "--shape",
            "4",
            "--set",
            "data.num_prompts=48",
            "--set",
            "filter.holdout_prompts=8",
            "--set",
            "generate.backend=transformers",
            "--set",
            "train.dpo.num_prompts=8",
            "--set",
            "train.dpo.judge=teacher",
            "--set",
            "train.dpo.max_new_tokens=16",
            "--set",
            "train.gkd.max_new_tokens=16",
            "--set",
            "train.on_policy.max_new_tokens=16",
            # a smaller student taught by the logit_kd arm's student (a teacher-assistant chain), and their difference
            "--arm",
            "ta=logit_kd^logit_kd:student.path=demo:student-tiny",
            "--pair",
            "ta:logit_kd",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "methods.json").read_text())
    # those that start from another arm, or take its targets, come after it
    arms = ["hard", "sft", "logit_kd", "feature", "dpo", "kd_teacher_b", "kd_ensemble", "sft_ensemble"]
    arms += ["gkd", "on_policy", "sft_more", "ta"]
    assert [row["arm"] for row in summary["rows"]] == arms
    for row in summary["rows"]:
        assert row["seeds"] == 2 and row["steps"] >= 2 and 0 < row["mfu"] < 1
        for m in ("accuracy", "ood_accuracy", "fidelity", "ood_fidelity", "heldout_nll", "entropy_nats_per_token"):
            assert row[m]["n"] == 2 and row[m]["low"] <= row[m]["mean"] <= row[m]["high"], (row["arm"], m)
        assert ("accuracy_minus_sft" in row) == (row["arm"] != "sft")
    assert [(p["pair"], p["seeds"], p["heldout_nll"]["n"]) for p in summary["pairs"]] == [("ta - logit_kd", 2, 2)]
    assert summary["teacher"]["fidelity"] == 1.0 and summary["teacher"]["heldout_nll"] > 0
    assert summary["other_teachers"]["demo:teacher-b"]["heldout_nll"] > 0  # the second teacher, measured alike
    assert (out / "methods.png").stat().st_size > 10_000
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(summary["mlflow_parent_run"])
    assert parent.info.status == "FINISHED" and "accuracy.teacher" in parent.data.metrics
    assert "accuracy.tiny.sft" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    runs = {c.info.run_name: c for c in children}
    assert {"generate", "filter", "teacher"} <= set(runs)
    for arm in arms:
        for seed in ("init0-data0", "init0-data1"):
            run = runs[f"tiny/{arm}/{seed}"]
            assert {"accuracy", "ood_accuracy", "fidelity", "ood_fidelity", "heldout_nll", "mfu"} <= set(
                run.data.metrics
            ), arm
            method = {"sft_more": "sft", "ta": "logit_kd", "sft_ensemble": "sft"}.get(arm, arm)
            assert run.data.params["method"] == ("logit_kd" if arm.startswith("kd_") else method)
            assert run.data.params["data_seed"] == seed[-1]
    assert runs["tiny/gkd/init0-data1"].data.params["start_from"] == "sft"
    assert runs["tiny/on_policy/init0-data1"].data.params["start_from"] == "sft"
    ta = runs["tiny/ta/init0-data0"].data
    assert (ta.params["targets_from"], ta.params["student"], ta.params["method"]) == (
        "logit_kd",
        "demo:student-tiny",
        "logit_kd",
    )
    assert ta.metrics["params"] < runs["tiny/logit_kd/init0-data0"].data.metrics["params"] / 1.5
    assert "dpo_pairs" in runs["tiny/dpo/init0-data0"].data.metrics


def test_temperature_bench_puts_a_child_per_form_and_t_and_the_plot_on_one_parent(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "temperature.py"),
            "--out",
            str(out),
            "--batches",
            "1",
            "--batch-size",
            "4",
            "--temperatures",
            "1",
            "4",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "temperature.json").read_text())
    rows = {(x["teacher"], x["temperature"]): x for x in summary["rows"]}
    assert set(rows) == {("full", 1.0), ("full", 4.0), ("top16", 1.0), ("top16", 4.0)}
    for form in ("full", "top16"):  # without T² the soft term's gradient is the T²-scaled one over T²
        assert rows[(form, 4.0)]["grad_norm_plain"] == pytest.approx(rows[(form, 4.0)]["grad_norm_t2"] / 16)
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(summary["mlflow_parent_run"])
    assert parent.info.status == "FINISHED"
    assert {"temperature.png", "temperature.md", "temperature.json"} <= {
        f.path for f in client.list_artifacts(parent.info.run_id)
    }
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["full/T=1", "full/T=4", "top16/T=1", "top16/T=4"]
    assert all({"grad_norm_t2", "grad_norm_plain", "soft_loss_t2"} <= set(c.data.metrics) for c in children)
