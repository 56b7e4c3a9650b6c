"""End to end, nothing faked: the demo pipeline through the CLI with the real vLLM engine, a real MLflow store and
a real (ephemeral) Prefect API; and a deployment triggered with `prefect deployment run` through a real
`prefect server` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import REPO

BIN = Path(sys.executable).parent
STAGES = ["generate", "filter", "train", "prune", "quantize", "evaluate", "draft"]


def mlflow_runs(uri: str, experiment: str = "distillery"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=500)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [str(BIN / "distillery"), "run", "demo", "--file", str(REPO / "pipelines.yaml")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    (work / "run.log").write_text(proc.stdout + proc.stderr)
    return work, uri, proc


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_pipeline_end_to_end(demo_run):
    work, uri, proc = demo_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "| model" in proc.stdout and "student-nf4" in proc.stdout  # the answer table is printed
    assert "OOD accuracy" in proc.stdout

    client, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    by_name = {r.info.run_name: r for r in children}

    m = parent.data.metrics
    # the distilled student beats the untrained one; the teacher beats both
    assert m["accuracy.student-sft"] > m["accuracy.student"] + 0.05
    assert m["accuracy.teacher"] > m["accuracy.student-sft"] - 1e-9 and m["accuracy.teacher"] >= 0.8
    for label in ("teacher", "student", "student-sft", "student-pruned", "student-int8", "student-nf4"):
        assert {
            f"accuracy.{label}",
            f"ood_accuracy.{label}",
            f"params.{label}",
            f"memory_mb.{label}",
            f"tokens_per_s.{label}",
        } <= set(m)
    # the sizes the demo is for: a student a tenth of the teacher, compressed to under a tenth of its memory
    assert m["params.teacher"] >= 10 * m["params.student"]
    assert m["memory_mb.student-nf4"] <= 0.1 * m["memory_mb.teacher"]
    assert m["memory_mb.student-nf4"] < m["memory_mb.student-int8"] < m["memory_mb.student-sft"]
    assert m["params.student-pruned"] < m["params.student-sft"]
    # healing (KD from the unpruned student) recovers what depth + width pruning lost
    assert m["accuracy.student-pruned"] > m["accuracy.student-pruned-unhealed"] + 0.1
    assert 0 <= m["draft_acceptance.student-sft"] <= 1

    d = by_name["draft"].data.metrics
    assert d["outputs_identical"] == 1.0  # greedy speculative decoding changes nothing
    assert d["num_draft_tokens"] > 0 and d["mean_accepted_length"] >= 1
    # speculative sampling at T=1 (transformers assisted generation): the distilled draft is mostly accepted
    assert d["sampled_temperature"] == 1.0 and d["sampled_acceptance_rate"] > 0.5
    assert d["distill_steps"] == 40  # DistillSpec (draft.distill) aligned the student to the teacher first
    assert by_name["train"].data.metrics["train_loss"] > 0
    assert by_name["filter"].data.metrics["kept"] > 0
    assert by_name["generate"].data.metrics["shards_generated"] == by_name["generate"].data.metrics["shards"] > 1

    # lineage: the training run names the datasets it saw, with the teacher
    inputs = client.get_run(by_name["train"].info.run_id).inputs.dataset_inputs
    contexts = sorted(next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in inputs)
    assert contexts == ["source", "training"]
    assert all(i.dataset.name.split(":", 1)[1].startswith("demo:teacher") for i in inputs)

    # artifacts: sample, filter report, eval JSON, loss curve, summary table and plot
    def names(run_id, path=""):
        return {f.path for f in client.list_artifacts(run_id, path)}

    assert "traces_sample.json" in names(by_name["generate"].info.run_id)
    assert {"filter_report.json", "filter_report.png"} <= names(by_name["filter"].info.run_id)
    assert {"loss_curve.png", "model"} <= names(by_name["train"].info.run_id)
    assert {"distill_loss_curve.png", "draft-model", "samples.json"} <= names(by_name["draft"].info.run_id)
    assert "model/model.safetensors" in names(by_name["prune"].info.run_id, "model")
    assert "results/teacher.json" in names(by_name["evaluate"].info.run_id, "results")
    assert {"summary.md", "summary.json", "accuracy_vs_size.png"} <= names(parent.info.run_id)

    versions = client.search_model_versions("name='distillery-demo-student'")
    assert sorted(v.tags["model"] for v in versions) == [
        "draft",
        "student-int8",
        "student-nf4",
        "student-pruned",
        "student-sft",
    ]
    draft_version = client.get_model_version_by_alias("distillery-demo-student", "draft")
    assert draft_version.tags["stage"] == "draft" and draft_version.tags["source"] == "student-sft"
    assert float(draft_version.tags["metric.acceptance_rate"]) == pytest.approx(d["acceptance_rate"])
    assert all(v.tags["pipeline"] == "demo" and v.run_id in {r.info.run_id for r in children} for v in versions)
    # first run: the gate candidate (the last version, nf4) takes both aliases
    champion = client.get_model_version_by_alias("distillery-demo-student", "champion")
    assert champion.tags["model"] == "student-nf4"
    assert float(champion.tags["metric.accuracy"]) == pytest.approx(m["accuracy.student-nf4"])
    assert client.get_model_version_by_alias("distillery-demo-student", "candidate").version == champion.version
    assert "no champion yet" in parent.data.tags["distillery.gate"] and "gate.json" in names(parent.info.run_id)

    # files on disk, each stage's folder complete (manifest last)
    run_dirs = list((work / "runs" / "demo").iterdir())
    assert len(run_dirs) == 1
    rd = run_dirs[0]
    for stage in (
        "generate",
        "filter",
        "train",
        "prune",
        "prune-unhealed",
        "draft",
        "draft-distill",
        "draft-model",
        "quantize/int8",
        "quantize/nf4",
    ):
        assert (rd / stage / "manifest.json").exists(), stage
    assert json.loads((rd / "summary.json").read_text())["rows"][0]["model"] == "teacher"
    assert not list(rd.rglob(".*.tmp-*"))  # no half-written leftovers


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_flow_run_is_recorded_in_prefect(demo_run):
    """The run went through a Prefect API: the flow run id is on the MLflow parent run and Prefect says Completed."""
    work, uri, proc = demo_run
    assert proc.returncode == 0
    _, runs = mlflow_runs(uri)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    code = (
        "import asyncio,sys\nfrom prefect.client.orchestration import get_client\n"
        "async def main():\n  async with get_client() as c:\n"
        f"    fr = await c.read_flow_run('{flow_run_id}')\n    print(fr.state.type.value)\n"
        "asyncio.run(main())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip().splitlines()[-1] == "COMPLETED", r.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


@contextmanager
def prefect_server(env: dict, log: Path, timeout: float = 120) -> Iterator[str]:
    """A real `prefect server start` on a free 127.0.0.1 port, with `env` (its PREFECT_API_URL, if any, dropped) and
    its output in `log`; yields its API URL once healthy, and stops it on exit."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"{api}/health", timeout)
        yield api
    finally:
        stop(server)


def stop(*procs: subprocess.Popen | None) -> None:
    """Terminate each process still running; kill the ones that do not end within 30 s."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_deployment_triggered_through_prefect_server(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + serve_log[-5000:]
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
            progress = {
                a["description"].split(":")[0]: a["data"] for a in shown["artifacts"] if a["type"] == "progress"
            }
            assert progress == {"generate": 100, "train": 100, "evaluate": 100}, progress

            # a teacher-assistant chain: a second run's teacher is the first run's champion, by its models:/ URI
            client, _ = mlflow_runs(uri)
            champion = client.get_model_version_by_alias("distillery-smoke-student", "champion")
            chain = ["teacher.path=models:/distillery-smoke-student@champion", "data.num_prompts=16"]
            chain += ["train.max_steps=2", "evaluate.limit=4", "filter.verifier=none", "filter.require_think=false"]
            second = subprocess.run(
                [str(BIN / "distillery"), "run", "smoke", "--file", str(REPO / "pipelines.yaml")]
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
        finally:
            stop(serve)


FLOW_RUN_VIEW = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
with get_client(sync_client=True) as c:
    fr = c.read_flow_run(sys.argv[1])
    arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
    print(json.dumps({"name": fr.name, "artifacts": [
        {"key": a.key, "type": a.type, "data": a.data, "description": a.description} for a in arts]}))
"""


def flow_run_view(env: dict, flow_run_id: str) -> dict:
    """A flow run's name and artifacts, as the Prefect server at env's PREFECT_API_URL has them."""
    r = subprocess.run(
        [sys.executable, "-c", FLOW_RUN_VIEW, flow_run_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
