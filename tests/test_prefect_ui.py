"""What a run shows in Prefect's UI (distillery/prefect_ui.py); the artifacts of a real run through a Prefect server
are checked in tests/test_e2e.py::test_deployment_triggered_through_prefect_server."""

from __future__ import annotations

from distillery import prefect_ui


def test_mlflow_links_open_the_parent_run_on_a_server_or_in_mlflow_ui():
    url, how = prefect_ui.mlflow_run_url("http://127.0.0.1:5000/", "3", "abc")
    assert (
        url == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
        and "tracking server" in how
    )
    url, how = prefect_ui.mlflow_run_url("sqlite:///mlflow.db", "1", "abc")
    assert url == "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1" in how


def test_artifact_keys_are_what_prefect_accepts():
    assert prefect_ui._key("r1-Rehearsal", "mlflow_run") == "r1-rehearsal-mlflow-run"
    assert prefect_ui._key("démo.kd", "report") == "d-mo-kd-report"


def test_outside_a_flow_run_nothing_is_recorded_and_nothing_fails():
    """The stage functions run without Prefect (tests, `distillery train`): progress and report are no-ops."""
    bar = prefect_ui.Progress("train: steps", 10)
    assert bar.id is None
    bar.update(5)
    prefect_ui.publish_report("demo", "| model |", "/tmp/x")
    prefect_ui.link_mlflow_run("demo", "sqlite:///m.db", "1", "abc")
