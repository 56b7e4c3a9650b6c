"""A shared MLflow tracking server: two pipeline runs at once against one real `mlflow server`, artifacts proxied
to the server's store; and the experiment-creation race two such runs can hit."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from .conftest import REPO
from .test_e2e import BIN, free_port, stop, wait_for


def test_experiment_created_once_when_two_trackers_race(mlflow_uri):
    """Both trackers see no experiment, both create it: the loser re-reads the winner's instead of failing."""
    from mlflow.tracking import MlflowClient

    from distillery.tracking import Tracker

    real_get = MlflowClient.get_experiment_by_name
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, int] = {}

    def racing_get(self, name):
        exp = real_get(self, name)
        key = threading.current_thread().name
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 1:  # the first look: both threads miss, then both create
            barrier.wait()
        return exp

    ids, errors = [], []

    def make():
        try:
            ids.append(Tracker("race", mlflow_uri).experiment_id)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    MlflowClient.get_experiment_by_name = racing_get
    try:
        threads = [threading.Thread(target=make, name=f"t{i}") for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        MlflowClient.get_experiment_by_name = real_get
    assert not errors, errors
    assert len(ids) == 2 and ids[0] == ids[1]
    assert len(MlflowClient(mlflow_uri).search_experiments(filter_string="name = 'race'")) == 1


def test_first_runs_started_together_create_one_sqlite_store(tmp_path):
    """Three processes meet a store that does not exist yet at the same moment (each waits for a shared start time
    after its imports): MLflow's migrations run once, under the store's lock, and every process gets its run."""
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    start = time.time() + 10  # past every process's imports
    code = (
        "import sys, time\nfrom distillery.tracking import Tracker\n"
        "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
        "t = Tracker('together', sys.argv[1])\nt.end(t.start('run'))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri, str(start)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[-2000:] for o in outs]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (exp,) = client.search_experiments(filter_string="name = 'together'")
    assert len(client.search_runs([exp.experiment_id])) == 3


@pytest.mark.slow
def test_two_runs_at_once_share_one_tracking_server(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    store, artifacts, logs = tmp_path / "server", tmp_path / "server" / "artifacts", tmp_path / "logs"
    store.mkdir()
    logs.mkdir()
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            "--backend-store-uri",
            f"sqlite:///{store / 'm.db'}",
            "--artifacts-destination",
            str(artifacts),
            "--serve-artifacts",
        ],
        cwd=store,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=(logs / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    procs: list[subprocess.Popen] = []
    try:
        wait_for(f"{uri}/health", 120)
        # two ephemeral Prefect APIs starting at once on a busy 2-core box take longer than Prefect's default 20 s
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
        quick = [
            "--set",
            "data.num_prompts=32",
            "--set",
            "train.max_steps=3",
            "--set",
            "evaluate.limit=8",
            "--set",
            "evaluate.throughput_prompts=2",
            "--set",
            "evaluate.throughput_new_tokens=8",
        ]
        for i in range(2):  # started together: both create the experiment and the registered model at once
            work = tmp_path / f"run{i}"
            work.mkdir()
            procs.append(
                subprocess.Popen(
                    [str(BIN / "distillery"), "run", "smoke", "--file", str(REPO / "pipelines.yaml"), *quick],
                    cwd=work,
                    env={**env, "PREFECT_HOME": str(work / "prefect")},
                    stdout=(logs / f"run{i}.log").open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
        for i, p in enumerate(procs):
            rc = p.wait(timeout=900)
            assert rc == 0, f"run{i}: " + (logs / f"run{i}.log").read_text()[-5000:]

        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri, registry_uri=uri)
        exps = client.search_experiments(filter_string="name = 'distillery'")
        assert len(exps) == 1
        runs = client.search_runs([exps[0].experiment_id], max_results=100)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
        for parent in parents:
            children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
            assert sorted(r.info.run_name for r in children) == ["evaluate", "filter", "generate", "train"]
            assert all(r.info.status == "FINISHED" for r in children)
            # artifacts live where the server says: proxied, under its --artifacts-destination
            assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
            train = next(r for r in children if r.info.run_name == "train")
            weights = Path(client.download_artifacts(train.info.run_id, "model/model.safetensors", str(tmp_path)))
            assert weights.stat().st_size > 0
            summary = Path(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path)))
            assert "student-sft" in summary.read_text()
            on_server = list(artifacts.rglob(f"{train.info.run_id}/artifacts/model/model.safetensors"))
            assert len(on_server) == 1 and on_server[0].read_bytes() == weights.read_bytes()
            assert list(artifacts.rglob(f"{parent.info.run_id}/artifacts/summary.md"))
        for i in range(2):  # nothing of MLflow's in the runs' own folders
            work = tmp_path / f"run{i}"
            assert not (work / "mlartifacts").exists() and not (work / "mlruns").exists()
            assert not (work / "mlflow.db").exists()

        versions = client.search_model_versions("name='distillery-smoke-student'")
        assert sorted(int(v.version) for v in versions) == [1, 2]
        assert {v.run_id for v in versions} <= {r.info.run_id for r in runs}
    finally:
        stop(*procs, server)
