"""Runs survive what machines do to them, end to end with `distillery run smoke` (real processes, a real MLflow store,
a real ephemeral Prefect API of their own), in one sequence that shares its runs:

A  SIGTERM during train: exit 143 within seconds, MLflow parent and train KILLED with the reason, Prefect CRASHED;
B  `--resume` A's folder: the same folder and MLflow parent, generate and filter reused, train resumed from its
   checkpoint, the run FINISHED;
C  the same pipeline again, a new run: every stage reused from B's, each child run saying where from;
D  a changed train setting, SIGKILL during evaluate: generate and filter reused, train redone; left RUNNING;
E  `--resume` (latest): D is marked FAILED (its process died), then continued: train reused, evaluate redone,
   FINISHED; D's Prefect flow run CRASHED; no MLflow run RUNNING at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillery.lifecycle import END_REASON

from .conftest import REPO

BIN = Path(sys.executable).parent
QUICK = {  # small data and evaluation; a training long enough to be stopped mid-way
    "data.num_prompts": 16,
    "train.max_steps": 120,
    "checkpoint.every_steps": 10,
    "evaluate.limit": 4,
    "evaluate.throughput_prompts": 2,
    "evaluate.throughput_new_tokens": 8,
}
SETS = tuple(x for k, v in QUICK.items() for x in ("--set", f"{k}={v}"))
FLOW_STATES = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    print(json.dumps({str(r.id): r.state.type.value for r in c.read_flow_runs()}))
"""


@pytest.fixture
def work(tmp_path):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),  # its own ephemeral Prefect database
    }
    env.pop("PREFECT_API_URL", None)
    return tmp_path, env


def argv(*extra: str) -> list[str]:
    return [str(BIN / "distillery"), "run", "smoke", "--file", str(REPO / "pipelines.yaml"), *extra]


def start(work, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(  # a session of its own: SIGKILL can take the whole process tree, as a lost machine does
        argv(*extra),
        cwd=work[0],
        env=work[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(work, *extra: str) -> str:
    r = subprocess.run(argv(*extra), cwd=work[0], env=work[1], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout + r.stderr


def runs(work):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(work[1]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("distillery")
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=500)


def children(work, parent: str) -> dict:
    """The parent's child runs by stage, the latest of each name."""
    kids = sorted(
        (r for r in runs(work) if r.data.tags.get("mlflow.parentRunId") == parent), key=lambda r: r.info.start_time
    )
    return {r.info.run_name: r for r in kids}


def wait_for_stage(work, proc, stage: str, timeout: float = 600) -> str:
    """Until a child run named `stage` is RUNNING; its parent's run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        try:
            found = [r for r in runs(work) if r.info.run_name == stage and r.info.status == "RUNNING"]
        except Exception:  # the store is being created by the run
            found = []
        if found:
            return found[0].data.tags["mlflow.parentRunId"]
        time.sleep(0.5)
    raise AssertionError(f"stage {stage} never started")


def flow_states(work) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", FLOW_STATES], env=work[1], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_dir_of(work, parent: str) -> Path:
    from mlflow.tracking import MlflowClient

    return Path(MlflowClient(work[1]["MLFLOW_TRACKING_URI"]).get_run(parent).data.tags["distillery.run_dir"])


@pytest.mark.slow
def test_killed_runs_end_killed_or_reaped_and_resume_without_redoing_finished_stages(work):
    # A: SIGTERM while training
    proc = start(work, *SETS)
    a = wait_for_stage(work, proc, "train")
    ckpts = run_dir_of(work, a) / ".train-trainer"
    deadline = time.monotonic() + 300
    while not list(ckpts.glob("checkpoint-*/distillery-complete")):  # a checkpoint written: mid-way through
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.monotonic() - t0 < 60, out[-4000:]
    assert "distillery: pipeline smoke terminated" in out.splitlines()[-3:]  # Prefect's server stops after it
    kids = children(work, a)
    parent = next(r for r in runs(work) if r.info.run_id == a)
    for r in (parent, kids["train"]):
        assert r.info.status == "KILLED" and r.data.tags[END_REASON] == "stopped by SIGTERM"
    assert kids["generate"].info.status == kids["filter"].info.status == "FINISHED"
    assert flow_states(work)[parent.data.tags["prefect.flow_run_id"]] == "CRASHED"
    folder = run_dir_of(work, a)

    # B: --resume A's folder
    out = finish(work, *SETS, "--resume", str(folder))
    assert f"pipeline smoke: resuming {folder} (MLflow run {a}, resume 1)" in out
    for stage in ("generate", "filter"):
        assert f"{stage}: reused from this run, before it was interrupted" in out
    assert f"train: resuming from {ckpts}/checkpoint-" in out  # not from step 0
    parent = next(r for r in runs(work) if r.info.run_id == a)
    assert parent.info.status == "FINISHED" and parent.data.tags["distillery.resumes"] == "1"
    assert (folder / "summary.md").is_file() and children(work, a)["evaluate"].info.status == "FINISHED"
    train_manifest = json.loads((folder / "train" / "manifest.json").read_text())
    assert train_manifest["figures"]["steps"] == 120 and train_manifest["figures"]["resumed_from_step"] >= 10

    # C: a new run of the same pipeline reuses every stage
    t0 = time.monotonic()
    out = finish(work, *SETS)
    for stage in ("generate", "filter", "train", "evaluate"):
        assert f"{stage}: reused from {folder}" in out, out[-3000:]
    c = max((r for r in runs(work) if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert c.info.run_id != a and c.info.status == "FINISHED"
    assert {n: r.data.tags.get("distillery.reused_from_parent") for n, r in children(work, c.info.run_id).items()} == {
        s: a for s in ("generate", "filter", "train", "evaluate")
    }
    assert "accuracy.student-sft" in c.data.metrics  # the report, from the reused evaluation

    # D: a changed train setting, killed with SIGKILL during evaluate
    proc = start(work, *SETS, "--set", "train.learning_rate=1e-3")
    d = wait_for_stage(work, proc, "evaluate")
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its children (the ephemeral Prefect server, workers) at once
    proc.communicate(timeout=60)
    kids = children(work, d)
    assert "reused_from_parent" not in str(kids["train"].data.tags) and kids["train"].info.status == "FINISHED"
    assert kids["generate"].data.tags["distillery.reused_from_parent"] == a  # upstream of the change: reused
    assert kids["evaluate"].info.status == "RUNNING"  # nothing could end it
    d_flow = next(r for r in runs(work) if r.info.run_id == d).data.tags["prefect.flow_run_id"]

    # E: --resume the latest run: D is reaped, then continued to the end
    out = finish(work, *SETS, "--set", "train.learning_rate=1e-3", "--resume")
    assert f"run {d} had died without ending; marked FAILED" in out
    assert "train: reused from this run, before it was interrupted" in out
    parent = next(r for r in runs(work) if r.info.run_id == d)
    assert parent.info.status == "FINISHED" and children(work, d)["evaluate"].info.status == "FINISHED"
    assert [r.info.run_name for r in runs(work) if r.info.status == "RUNNING"] == []
    assert flow_states(work)[d_flow] == "CRASHED"
