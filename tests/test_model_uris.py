"""MLflow model URIs as model paths (distillery/model_uris.py), against a real SQLite MLflow store: a student
registered the way a run registers it is found by alias, version or run, downloaded once, and loads; what names
nothing is refused in one line. The end-to-end chain (a pipeline whose teacher is another's champion) runs in
tests/test_e2e.py::test_deployment_triggered_through_prefect_server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distillery import model_uris
from distillery.config import ConfigError, load_pipeline, parse_overrides
from distillery.results import Evaluation, ModelArtifact
from distillery.runtime import RunContext

from .conftest import REPO

NAME = "chain-student"


@pytest.fixture
def registered(mlflow_uri, tmp_path, tiny_student):
    """The tiny student registered as v1 of NAME through the project's registry (alias candidate and champion)."""
    from distillery.config import RegistryConfig
    from distillery.registry import register_run
    from distillery.tracking import Tracker

    tracker = Tracker("distillery")
    parent = tracker.start("first", tags={"distillery.pipeline": "smoke"})
    train = tracker.start("train", parent.run_id)
    model = ModelArtifact(label="student-sft", path=str(tiny_student), stage="train", run_id=train.run_id)
    ctx = RunContext("smoke", str(tmp_path / "run"), parent.run_id, "distillery", tracker.uri)
    evals = {"student-sft": Evaluation("student-sft", model.path, {"accuracy": 0.5})}
    register_run(tracker, ctx, RegistryConfig(model_name=NAME), [model], evals, logged=False)
    return train.run_id


def test_uris_are_checked_for_their_form_by_the_config():
    for ok in ("models:/a-b@champion", "models:/a/3", "runs:/0123abcd/model"):
        load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides([f"teacher.path={ok}"]))
    for bad, said in (("models:/a", "expected models:/<name>@<alias>"), ("runs:/abc", "expected runs:/<run id>")):
        with pytest.raises(ConfigError, match="pipelines.smoke.teacher.path: .*" + said.replace("/", ".")):
            load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides([f"teacher.path={bad}"]))


def test_alias_version_and_run_resolve_to_one_version_that_loads(registered, tmp_path):
    from transformers import AutoModelForCausalLM

    from distillery.demo.assets import resolve_model
    from distillery.serving import resolve_model as serve_path

    by_alias = model_uris.resolve(f"models:/{NAME}@champion")
    assert (by_alias.version, by_alias.run_id, by_alias.download_uri) == ("1", registered, f"models:/{NAME}/1")
    assert by_alias.tags("teacher") == {
        "distillery.teacher.uri": f"models:/{NAME}@champion",
        "distillery.teacher.download_uri": f"models:/{NAME}/1",
        "distillery.teacher.name": NAME,
        "distillery.teacher.version": "1",
        "distillery.teacher.run_id": registered,
    }
    folder = resolve_model(f"models:/{NAME}@champion")
    assert resolve_model(f"models:/{NAME}/1") == folder  # one download per version
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 0
    assert serve_path(f"models:/{NAME}@candidate", "--model") == folder
    by_run = resolve_model(f"runs:/{registered}/model")
    assert by_run != folder and (model_uris.Path(by_run) / "config.json").is_file()


def test_what_names_nothing_is_refused_in_one_line(registered, mlflow_uri, tmp_path):
    from distillery.preflight import preflight
    from distillery.serving import ServeError
    from distillery.serving import resolve_model as serve_path

    cases = {
        "models:/nope@champion": "no registered model 'nope' in the tracking store",
        f"models:/{NAME}@gone": f"model '{NAME}' has no alias 'gone' (aliases: candidate, champion)",
        f"models:/{NAME}/7": f"model '{NAME}' has no version 7 (latest: 1)",
        "runs:/0123456789abcdef0123456789abcdef/model": "no run 0123456789abcdef0123456789abcdef",
    }
    for uri, said in cases.items():
        cfg = load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides([f"teacher.path={uri}"]))
        (problem,) = preflight(cfg, "smoke")
        assert problem.startswith(f"pipelines.smoke.teacher.path: {said}"), problem
        with pytest.raises(ServeError, match=f"--model: {uri}: "):
            serve_path(uri, "--model")
    # the command line: one line, exit 2, before any run exists
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "smoke", "--file", str(REPO / "pipelines.yaml")]
        + ["--set", "student.path=models:/nope@champion"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "pipelines.smoke.student.path: no registered model 'nope'" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()
