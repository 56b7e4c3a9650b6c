"""The methods experiment's plumbing, at toy scale: every arm trains from one pipeline, each is a child run of one
MLflow parent with the same metric names, and the gap arithmetic is right."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from methods import gap_recovered  # noqa: E402


def test_gap_recovered_and_its_stderr():
    g, s = gap_recovered(0.6, 0.2, 1.0, 0.0, 0.0, 0.0)
    assert g == pytest.approx(0.5) and s == 0.0
    g, s = gap_recovered(0.6, 0.2, 1.0, 0.04, 0.0, 0.0)
    assert s == pytest.approx(0.04 / 0.8)
    assert math.isnan(gap_recovered(0.5, 0.9, 0.8, 0, 0, 0)[0])  # no gap to recover


@pytest.mark.slow
def test_every_arm_is_a_child_run_of_one_parent(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "methods.py"), "--out", str(out), "--workdir", str(tmp_path / "runs"),
         "--set", "data.num_prompts=48", "--set", "train.max_steps=2", "--set", "evaluate.limit=8",
         "--set", "generate.backend=transformers", "--set", "train.dpo.num_prompts=8",
         "--set", "train.dpo.judge=teacher", "--set", "train.dpo.max_new_tokens=16",
         "--set", "train.gkd.max_new_tokens=16"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "methods.json").read_text())
    assert [row["arm"] for row in summary["rows"]] == ["hard", "sft", "logit_kd", "gkd", "dpo"]
    assert all(row["steps"] >= 2 and 0 < row["mfu"] < 1 for row in summary["rows"])
    assert (out / "methods.png").stat().st_size > 10_000
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(summary["mlflow_parent_run"])
    assert parent.info.status == "FINISHED" and "accuracy.teacher" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    arms = {c.info.run_name: c for c in children}
    assert {"generate", "filter", "teacher", "hard", "sft", "logit_kd", "gkd", "dpo"} <= set(arms)
    for arm in ("hard", "sft", "logit_kd", "gkd", "dpo"):
        assert {"accuracy", "accuracy_stderr", "gap_recovered", "mfu", "train_tokens_per_s"} <= set(
            arms[arm].data.metrics), arm
        assert arms[arm].data.params["method"] == arm
    assert "dpo_pairs" in arms["dpo"].data.metrics
    assert arms["hard"].data.metrics["gap_recovered"] == 0.0
