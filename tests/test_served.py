"""End to end through a real `prefect server` on 127.0.0.1: `distillery serve --pipelines smoke` and `distill/smoke`
triggered with `prefect deployment run --watch`; the run as Prefect's and MLflow's UIs show it, in a headless browser;
a teacher-assistant chain from that run's champion. Apart from test_e2e.py's demo run, so the two can run on
different test workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distillery import logged_models

from .conftest import REPO, sqlite_store
from .test_e2e import BIN, free_port, mlflow_runs, prefect_server, stop, wait_for


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real `prefect server` and `distillery serve --pipelines smoke`; `distill/smoke` triggered with `prefect
    deployment run --watch`. Yields while the server is up: the test of the run and the browser check share it."""
    tmp_path = tmp_path_factory.mktemp("served")
    uri = sqlite_store(tmp_path)
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MLFLOW_TRACKING_URI": uri,
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect" / "storage"),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    serve = None
    with prefect_server(env, logs / "server.log") as api:
        env["PREFECT_API_URL"] = api
        try:
            serve = subprocess.Popen(
                [str(BIN / "distillery"), "serve", "--pipelines", "smoke", "--file", str(REPO / "pipelines.yaml")],
                cwd=tmp_path,
                env=env,
                stdout=(logs / "serve.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            deadline = time.time() + 180
            while time.time() < deadline:
                ls = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True, text=True)
                if "distill/smoke" in ls.stdout:
                    break
                assert serve.poll() is None, (logs / "serve.log").read_text()[-3000:]
                time.sleep(2)
            else:
                raise AssertionError("deployment never registered: " + (logs / "serve.log").read_text()[-3000:])
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "distill/smoke", "--watch", "--watch-timeout", "600"],
                env=env,
                capture_output=True,
                text=True,
                timeout=700,
            )
            serve_log = (logs / "serve.log").read_text()
            yield {"env": env, "uri": uri, "api": api, "tmp": tmp_path, "run": run, "serve_log": serve_log}
        finally:
            stop(serve)


@pytest.mark.slow
def test_deployment_triggered_through_prefect_server(served, monkeypatch):
    env, uri, tmp_path, run = served["env"], served["uri"], served["tmp"], served["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + served["serve_log"][-5000:]
    assert "Completed" in run.stdout + run.stderr
    _, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["distillery.pipeline"] == "smoke"
    assert "accuracy.student-sft" in parents[0].data.metrics

    # what Prefect's UI shows of it: its name, the report, a link to MLflow, the stages' progress
    shown = flow_run_view(env, parents[0].data.tags["prefect.flow_run_id"])
    assert re.fullmatch(r"smoke-\d{8}-\d{6}", shown["name"]), shown["name"]
    by_key = {a["key"]: a for a in shown["artifacts"] if a["key"]}
    assert "| model" in by_key["smoke-report"]["data"] and "student-sft" in by_key["smoke-report"]["data"]
    link = by_key["smoke-mlflow-run"]["data"]
    assert f"#/experiments/{parents[0].info.experiment_id}/runs/{parents[0].info.run_id}" in link
    progress = {a["description"].split(":")[0]: a["data"] for a in shown["artifacts"] if a["type"] == "progress"}
    assert progress == {"generate": 100, "train": 100, "evaluate": 100}, progress

    # a teacher-assistant chain: another pipeline's teacher is the first run's champion, by its models:/ URI
    client, _ = mlflow_runs(uri)
    champion = client.get_model_version_by_alias("distillery-smoke-student", "champion")
    pipelines = yaml.safe_load((REPO / "pipelines.yaml").read_text())["pipelines"]
    chained_pipeline = {**pipelines["smoke"], "registry": {"model_name": "distillery-chain-student"}}
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump({"pipelines": {"chain": chained_pipeline}}))
    chain = ["teacher.path=models:/distillery-smoke-student@champion", "data.num_prompts=16"]
    chain += ["train.max_steps=2", "evaluate.limit=4", "filter.verifier=none", "filter.require_think=false"]
    second = subprocess.run(
        [str(BIN / "distillery"), "run", "chain", "--file", str(tmp_path / "chain.yaml")]
        + [a for s in chain for a in ("--set", s)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    _, runs = mlflow_runs(uri)
    first, chained = sorted(
        (r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time
    )
    assert chained.info.status == "FINISHED"
    tags = chained.data.tags  # the lineage: which version the alias pointed at, and the run that made it
    assert tags["distillery.teacher.uri"] == "models:/distillery-smoke-student@champion"
    assert tags["distillery.teacher.version"] == str(champion.version)
    assert tags["distillery.teacher.run_id"] == champion.run_id
    assert chained.data.metrics["params.teacher"] == first.data.metrics["params.student-sft"]

    # every model of both runs is an MLflow logged model, the evaluation's figures under the same names
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # not set_tracking_uri: that outlives the test
    logged = mlflow.search_logged_models(experiment_ids=[first.info.experiment_id], output_format="list")
    names = {(m.tags["distillery.pipeline"], m.name): {x.key for x in m.metrics} for m in logged}
    assert sorted(names) == [
        ("chain", "student-sft"),
        ("chain", "teacher"),
        ("smoke", "student-sft"),
        ("smoke", "teacher"),
    ]
    # one set of metric names for every pipeline (recovery needs a teacher that scored above 0: not chain's)
    core = {"accuracy", "accuracy_stderr", "params", "memory_bytes", "tokens_per_s"}
    named = set(logged_models.METRICS) | {"recovery", "heldout_nll"}
    assert all(core <= v <= named for v in names.values()), names
    assert "recovery" in names[("smoke", "teacher")] and "recovery" in names[("smoke", "student-sft")]
    kinds = {(m.tags["distillery.pipeline"], m.name): m.model_type for m in logged}
    assert kinds[("smoke", "teacher")] == "reference" and kinds[("smoke", "student-sft")] == "transformers"
    # the registry's versions are those models; the champion loads with the transformers flavor
    student = next(m for m in logged if m.name == "student-sft" and m.tags["distillery.pipeline"] == "smoke")
    assert champion.source == f"models:/{student.model_id}"
    pipe = mlflow.transformers.load_model("models:/distillery-smoke-student@champion")
    prompt = "Ann has 3 apples."
    text = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt), text


FLOW_RUN_VIEW = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
with get_client(sync_client=True) as c:
    fr = c.read_flow_run(sys.argv[1])
    arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
    print(json.dumps({"name": fr.name, "artifacts": [
        {"id": str(a.id), "key": a.key, "type": a.type, "data": a.data, "description": a.description}
        for a in arts]}))
"""


def flow_run_view(env: dict, flow_run_id: str) -> dict:
    """A flow run's name and artifacts, as the Prefect server at env's PREFECT_API_URL has them."""
    r = subprocess.run(
        [sys.executable, "-c", FLOW_RUN_VIEW, flow_run_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, screenshot: Path) -> str:
    """The page as headless Chromium renders it (scripts run): its visible text; a screenshot beside."""
    base = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    base += ["--virtual-time-budget=20000", "--window-size=1600,900"]
    subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<style.*?</style>|<script.*?</script>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.slow
def test_mlflow_and_prefect_uis_show_the_students_and_the_report_in_a_browser(served, tmp_path):
    """What a person sees after a run: MLflow's Models view of the experiment lists teacher and students, and the
    flow run's page in Prefect's UI has the report artifact. Screenshots in this test's tmp_path."""
    if CHROMIUM is None:
        pytest.skip("no chromium here (Debian's package `chromium`; .ci/run installs it)")
    _, runs = mlflow_runs(served["uri"])
    first = min((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    port = free_port()
    ui = subprocess.Popen(
        [str(BIN / "mlflow"), "ui", "--backend-store-uri", served["uri"], "--host", "127.0.0.1", "--port", str(port)],
        env={**served["env"], "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # stop() takes its whole process group
        stdout=(tmp_path / "mlflow-ui.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 120)
        models_url = f"http://127.0.0.1:{port}/#/experiments/{first.info.experiment_id}/models"
        page = render(f"{models_url}?workflowType=machine_learning", tmp_path / "mlflow-models.png")
    finally:
        stop(ui)
    assert "Models" in page and page.count("student-sft") >= 2 and page.count("teacher") >= 2, page[:3000]

    # the flow run's page (its graph marks the artifacts), and the report artifact's page with the table rendered
    flow_run = first.data.tags["prefect.flow_run_id"]
    ui_base = served["api"].removesuffix("/api")
    view = flow_run_view(served["env"], flow_run)
    page = render(f"{ui_base}/runs/flow-run/{flow_run}", tmp_path / "prefect-flow-run.png")
    assert view["name"] in page and "Artifacts" in page and "Completed" in page, page[:3000]
    (report,) = [a for a in view["artifacts"] if a["key"] == "smoke-report"]
    page = render(f"{ui_base}/artifacts/artifact/{report['id']}", tmp_path / "prefect-report.png")
    assert "smoke: report" in page and "teacher" in page and "student-sft" in page, page[:3000]
    for shot in ("mlflow-models.png", "prefect-flow-run.png", "prefect-report.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot
