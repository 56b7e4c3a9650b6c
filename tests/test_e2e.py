"""End to end, nothing faked: the demo pipeline through the CLI with the real vLLM engine, a real MLflow store and
a real (ephemeral) Prefect API; and a deployment triggered with `prefect deployment run` through a real
`prefect server` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from distillery import logged_models

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
    # The demo's 1,600 steps on half its generation: one teacher sample per prompt, twice the epochs. vLLM's CPU
    # build without AVX-512 generates ~8x slower than with it (1.1k vs 9.5k tokens/s), and the demo's 16,000
    # samples alone then take 12 minutes; `make demo` itself runs as pipelines.yaml says.
    half = ["--set", "generate.n=1", "--set", "train.epochs=8"]
    proc = subprocess.run(
        [str(BIN / "distillery"), "run", "demo", "--file", str(REPO / "pipelines.yaml"), *half],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    (work / "console.txt").write_text(proc.stdout + proc.stderr)
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

    # every model is an MLflow logged model; the registry's versions are they, the NF4 champion loads quantized
    import mlflow

    mlflow.set_tracking_uri(uri)
    logged = {
        m.name: m for m in mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    }
    assert set(logged) == {"teacher", "student", "student-sft", "student-pruned-unhealed", "student-pruned"} | {
        "student-int8",
        "student-nf4",
        "draft",
    }
    assert {x.key: x.value for x in logged["student-nf4"].metrics}["accuracy"] == pytest.approx(
        m["accuracy.student-nf4"]
    )
    assert {x.key for x in logged["draft"].metrics} >= {"acceptance_rate", "speedup"}
    assert champion.source == f"models:/{logged['student-nf4'].model_id}"
    pipe = mlflow.transformers.load_model("models:/distillery-demo-student@champion")
    quant = pipe.model.config.quantization_config
    assert (quant["load_in_4bit"] if isinstance(quant, dict) else quant.load_in_4bit) is True
    prompt = "Question: Mia has 2 pens. Mia buys 3 more pens. How many pens does Mia have now?\nAnswer:"
    assert len(pipe(prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"]) > len(prompt)

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
def test_demo_console_is_a_line_per_stage_and_the_rest_is_in_run_log(demo_run):
    """`distillery run` prints a line as each stage starts and ends (with its headline figures), the lines a person
    acts on, and the table; Prefect's task-run lines, library warnings, sub-step progress bars and vLLM's and
    lm-eval's logs go to run.log in the run folder, which holds no Python bytecode."""
    work, _, proc = demo_run
    assert proc.returncode == 0
    console = (proc.stdout + proc.stderr).splitlines()
    for i, stage in enumerate(STAGES, 1):
        assert any(line.startswith(f"[{i}/7] {stage} done in ") for line in console), (stage, console)
    assert any(line.startswith("[3/7] train done in ") and "final_loss " in line for line in console)
    noise = [line for line in console if re.search(r"[Ww]arning|\| INFO|Loading weights|it/s\]|Traceback", line)]
    assert noise == [] and len(console) < 50, console
    (run_dir,) = (work / "runs" / "demo").iterdir()
    log = (run_dir / "run.log").read_text()
    assert "Task run 'train-" in log and "Finished in state Completed()" in log  # Prefect's lines, there
    assert "[7/7] draft done in " in log  # and the console's
    # no bytecode (datasets' hashing under Prefect's log_prints dumped some into the prune stage's log)
    assert "co_code" not in log and "<code object" not in log
    assert not re.search(r"(\\x[0-9a-f]{2}){4}", log)


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
        # the UI's own API address: else it asks the default port 4200
        env={**{k: v for k, v in env.items() if k != "PREFECT_API_URL"}, "PREFECT_UI_API_URL": api},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"{api}/health", timeout)
        yield api
    finally:
        stop(server)


def stop(*procs: subprocess.Popen | None) -> None:
    """Terminate each process still running; kill the ones that do not end within 30 s, and whatever a process
    started in a session of its own left behind (its process group)."""
    import signal

    for p in procs:
        if p is None:
            continue
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        try:  # a group of its own exists only for a process started with start_new_session=True
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real `prefect server` and `distillery serve --pipelines smoke`; `distill/smoke` triggered with `prefect
    deployment run --watch`. Yields while the server is up: the test of the run and the browser check share it."""
    tmp_path = tmp_path_factory.mktemp("served")
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
            yield {"env": env, "uri": uri, "api": api, "tmp": tmp_path, "run": run, "serve_log": serve_log}
        finally:
            stop(serve)


@pytest.mark.slow
def test_deployment_triggered_through_prefect_server(served):
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

    mlflow.set_tracking_uri(uri)
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
