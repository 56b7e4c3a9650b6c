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

from .conftest import REPO, sqlite_store

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
    uri = sqlite_store(work)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # The demo's 1,600 steps on a quarter of its generation (4,000 prompts, one teacher sample each, 16 epochs),
    # half its evaluation items and draft prompts. vLLM's CPU build without AVX-512 generates ~8x slower than with it
    # (1.1k vs 9.5k tokens/s): the demo's 16,000 samples alone then take 12 minutes. At 400 steps the student is
    # still at ~0.07 accuracy, and 1,600 steps on 1,600 traces reach only 0.25: the assertions below need both.
    # `make demo` itself runs as pipelines.yaml says.
    sets = ["data.num_prompts=4000", "generate.n=1", "train.epochs=16", "evaluate.limit=100", "draft.num_prompts=16"]
    half = [a for s in sets for a in ("--set", s)]
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
def test_demo_pipeline_end_to_end(demo_run, monkeypatch):
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

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # not set_tracking_uri: that outlives the test
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
