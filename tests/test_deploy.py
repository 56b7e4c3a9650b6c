"""`distillery deploy` against a real `prefect server` on 127.0.0.1 (one for the module): a process work pool and a
`prefect worker` run README's commands as written; schedules from pipelines.yaml make scheduled runs (or none when
inactive); the global concurrency limit keeps two runs' stages from overlapping."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, sqlite_store
from .test_e2e import BIN, mlflow_runs, prefect_server, stop

pytestmark = pytest.mark.slow
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def tiny(**extra) -> dict:
    """A pipeline of one cheap stage: enough to see a flow run take and hold the limit's slot."""
    return {
        "teacher": {"path": "demo:teacher"},
        "student": {"path": "demo:student"},
        "data": {"source": "demo", "num_prompts": 16, "seed": 0},
        "stages": ["generate"],
        "generate": {"backend": "transformers", "n": 1, "temperature": 0.8, "max_tokens": 24, "batch_size": 8},
        **extra,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server, two process pools (`local` with a worker, `idle` with none), a pipelines file of tiny ones."""
    tmp = tmp_path_factory.mktemp("deploy")
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect"),
        "MLFLOW_TRACKING_URI": sqlite_store(tmp),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "prefect" / "storage"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    # scheduled runs within seconds, not a minute
    server_env = {**env, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    logs = tmp / "logs"
    logs.mkdir()
    worker = None
    with prefect_server(server_env, logs / "server.log", timeout=180) as api:
        env["PREFECT_API_URL"] = api
        try:
            for pool in ("local", "idle"):
                prefect(env, "work-pool", "create", pool, "--type", "process")
            worker = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "local"],
                cwd=tmp,
                env=env,
                stdout=(logs / "worker.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            config = tmp / "pipelines.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "concurrency": {"limit_name": "test-gpu", "slots": 1},
                        "pipelines": {
                            "tiny": tiny(output_dir=str(tmp / "runs")),
                            "cron-on": tiny(
                                schedule={
                                    "cron": "* * * * *",
                                    "timezone": "Europe/Berlin",
                                    "overrides": ["data.num_prompts=2"],
                                }
                            ),
                            "cron-off": tiny(schedule={"cron": "* * * * *", "active": False}),
                            "resumable": tiny(
                                output_dir=str(tmp / "runs"),
                                stages=["generate", "filter", "train"],
                                generate={"backend": "transformers", "n": 1, "temperature": 0.8, "max_tokens": 96},
                                filter={"verifier": "regex", "max_tokens": 96, "decontam_ngram": 32},
                                train={"max_steps": 120, "batch_size": 4, "max_length": 96},
                                checkpoint={"every_steps": 10, "keep": 2},
                            ),
                        },
                    }
                )
            )
            yield {"env": env, "api": api, "tmp": tmp, "logs": logs, "config": config}
        finally:
            stop(worker)


def prefect(env: dict, *args: str, timeout: float = 120) -> str:
    r = subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def distillery(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "distillery"), *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def client(api: str):
    """A sync client of the test server (this process has no PREFECT_API_URL: conftest isolates it)."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def flow_runs(api: str, deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with client(api) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def readme_commands() -> list[str]:
    """The shell lines of README's "Deployments" quick start, as a user would paste them."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Deployments", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_commands_deploy_and_run_through_a_worker(server):
    env, api = server["env"], server["api"]
    lines = readme_commands()
    deploy = next(line for line in lines if line.startswith("distillery deploy"))
    worker = next(line for line in lines if line.startswith("prefect worker start"))
    run = next(line for line in lines if line.startswith("prefect deployment run 'distill/smoke'"))
    assert deploy == "distillery deploy --work-pool local" and worker.startswith("prefect worker start --pool local")
    assert "prefect work-pool create local --type process" in lines

    before = set((REPO / "runs").glob("*/*")) if (REPO / "runs").exists() else None
    t0 = time.time()
    try:
        r = subprocess.run(
            deploy,
            shell=True,
            env={**env, "PATH": f"{BIN}:{env['PATH']}"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "deployed 'distill/smoke' to work pool 'local'" in r.stdout
        assert "concurrency limit 'distillery-gpu': created with 1 slot(s)" in r.stdout
        ls = prefect(env, "deployment", "ls")
        assert all(f"distill/{n}" in ls for n in ("demo", "smoke", "r1-distill"))
        with client(api) as c:
            d = c.read_deployment_by_name("distill/smoke")
            assert d.work_pool_name == "local" and set(d.tags) == {"distillery", "smoke"}
            assert d.parameters["pipeline"] == "smoke" and d.parameters["overrides"] == []
            assert c.read_global_concurrency_limit_by_name("distillery-gpu").limit == 1
            # the shipped nightly schedule of r1-distill, registered paused until the user switches it on
            nightly = c.read_deployment_by_name("distill/r1-distill").schedules
            assert [(s.active, s.schedule.cron, s.schedule.timezone) for s in nightly] == [(False, "0 2 * * *", "UTC")]
        deployed = time.time()

        r = subprocess.run(
            run, shell=True, env={**env, "PATH": f"{BIN}:{env['PATH']}"}, capture_output=True, text=True, timeout=900
        )
        worker_log = (server["logs"] / "worker.log").read_text()
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + worker_log[-5000:]
        assert "Completed" in r.stdout + r.stderr
        print(f"deploy {deployed - t0:.0f}s, smoke run through the worker {time.time() - deployed:.0f}s")
        (fr,) = flow_runs(api, "smoke")
        assert fr.state.type.value == "COMPLETED" and "train.max_steps=2" in fr.parameters["overrides"]
        _, runs = mlflow_runs(env["MLFLOW_TRACKING_URI"])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"] == str(fr.id)
        assert "accuracy.student-sft" in parent.data.metrics
    finally:  # the worker runs the flow in the project folder: take away only what this run wrote there
        if before is None:
            shutil.rmtree(REPO / "runs", ignore_errors=True)
        else:
            for new in set((REPO / "runs").glob("*/*")) - before:  # run folders, and .stages records
                new.unlink() if new.is_file() else shutil.rmtree(new, ignore_errors=True)


def test_schedules_make_scheduled_runs_unless_inactive(server):
    env, api = server["env"], server["api"]
    r = distillery(
        env, "deploy", "--work-pool", "idle", "--pipelines", "cron-on,cron-off", "--file", str(server["config"])
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(cron '* * * * *' Europe/Berlin)" in r.stdout and "(inactive)" in r.stdout
    with client(api) as c:
        on, off = c.read_deployment_by_name("distill/cron-on"), c.read_deployment_by_name("distill/cron-off")
    assert [(s.active, s.schedule.cron, s.schedule.timezone) for s in on.schedules] == [
        (True, "* * * * *", "Europe/Berlin")
    ]
    assert [s.active for s in off.schedules] == [False]

    deadline = time.time() + 120
    while time.time() < deadline and not (scheduled := flow_runs(api, "cron-on")):
        time.sleep(2)
    assert scheduled, "the scheduler made no runs for an active cron schedule"
    assert all(fr.state.type.value == "SCHEDULED" for fr in scheduled)
    # the schedule's overrides ride on its runs; the deployment's own parameters stay clean for manual runs
    assert all(fr.parameters["overrides"] == ["data.num_prompts=2"] for fr in scheduled)
    assert on.parameters["overrides"] == []
    starts = sorted(fr.expected_start_time for fr in scheduled)
    assert all(t.second == 0 for t in starts) and len(starts) > 1  # one a minute, on the minute
    assert flow_runs(api, "cron-off") == []  # same scheduler passes, nothing for the inactive schedule


def test_concurrency_limit_serialises_two_runs(server):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    env, api = server["env"], server["api"]
    r = distillery(env, "deploy", "--work-pool", "local", "--pipelines", "tiny", "--file", str(server["config"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "concurrency limit 'test-gpu': " in r.stdout  # created here, or by the schedule test's deploy
    # two runs creating one fresh SQLite MLflow store at once race in its migrations: create it first
    from mlflow.tracking import MlflowClient

    MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    t0 = time.time()
    for seed in (1, 2):  # different seeds: each run generates, neither finds the other's shards in the cache
        prefect(env, "deployment", "run", "distill/tiny", "--param", f'overrides=["generate.seed={seed}"]')
    deadline = time.time() + 600
    while time.time() < deadline:
        runs = flow_runs(api, "tiny")
        if len(runs) == 2 and all(fr.state.type.value in TERMINAL for fr in runs):
            break
        time.sleep(3)
    worker_log = (server["logs"] / "worker.log").read_text()
    assert [fr.state.type.value for fr in runs] == ["COMPLETED"] * 2, worker_log[-6000:]
    print(f"two tiny runs through the worker: {time.time() - t0:.0f}s")

    spans = []  # (first task start, last task end, flow run start) per run
    with client(api) as c:
        for fr in runs:
            tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
            assert tasks, f"flow run {fr.id} ran no task"
            spans.append((min(t.start_time for t in tasks), max(t.end_time for t in tasks), fr.start_time))
        limit = c.read_global_concurrency_limit_by_name("test-gpu")
    (first_start, first_end, _), (second_start, _, second_flow_start) = sorted(spans)
    assert second_start >= first_end, f"stages overlapped: {spans}"
    # both flow runs were up at once: the second was running, holding no slot, while the first's stages ran
    assert second_flow_start < first_end, f"the runs never overlapped in time, nothing was tested: {spans}"
    assert limit.limit == 1 and limit.active_slots == 0  # both slots given back


def flow_run_processes(flow_run_id: str) -> list[int]:
    """The pids running a flow run: the worker starts each with PREFECT__FLOW_RUN_ID in its environment."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in env:
            pids.append(int(proc.name))
    return pids


def test_retry_of_a_crashed_deployment_run_continues_it(server):
    """`prefect flow-run retry` of a deployment run whose process was killed mid-training: the worker runs the same
    flow run again, which continues the crashed run in its own folder and MLflow parent run (reaped FAILED first, its
    concurrency slot released rather than left to expire), reuses generate and filter, and resumes training from its
    last checkpoint."""
    env, api = server["env"], server["api"]
    r = distillery(env, "deploy", "--work-pool", "local", "--pipelines", "resumable", "--file", str(server["config"]))
    assert r.returncode == 0, r.stdout + r.stderr
    prefect(env, "deployment", "run", "distill/resumable")
    deadline = time.time() + 600
    ckpts = []
    while not ckpts:  # killed once training has a checkpoint: mid-way through
        assert time.time() < deadline, (server["logs"] / "worker.log").read_text()[-5000:]
        ckpts = list((server["tmp"] / "runs" / "resumable").glob("*/.train-trainer/checkpoint-*/distillery-complete"))
        time.sleep(0.2)
    (fr,) = flow_runs(api, "resumable")
    pids = flow_run_processes(str(fr.id))
    assert pids, "no process runs the flow run"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    def state() -> str:
        with client(api) as c:
            return c.read_flow_run(fr.id).state.type.value

    while state() not in TERMINAL:  # the worker sees its process die
        assert time.time() < deadline
        time.sleep(1)
    assert state() == "CRASHED"
    _, runs = mlflow_runs(env["MLFLOW_TRACKING_URI"])
    (parent,) = [r for r in runs if r.data.tags.get("prefect.flow_run_id") == str(fr.id)]
    assert parent.info.status == "RUNNING"  # nothing could end it

    assert "scheduled for retry" in prefect(env, "flow-run", "retry", str(fr.id))
    while state() not in TERMINAL or state() == "CRASHED":
        assert time.time() < deadline, (server["logs"] / "worker.log").read_text()[-5000:]
        time.sleep(2)
    worker_log = (server["logs"] / "worker.log").read_text()
    assert state() == "COMPLETED", worker_log[-6000:]
    _, runs = mlflow_runs(env["MLFLOW_TRACKING_URI"])
    parents = [r for r in runs if r.data.tags.get("prefect.flow_run_id") == str(fr.id)]
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the same parent run, continued
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["distillery.resumes"] == "1"
    folder = Path(parent.data.tags["distillery.run_dir"])
    for stage in ("generate", "filter"):
        assert f"{stage}: reused from this run, before it was interrupted" in worker_log
    assert f"train: resuming from {folder}/.train-trainer/checkpoint-" in worker_log
    assert f"released run {parent.info.run_id}'s concurrency slot" in worker_log
    manifest = json.loads((folder / "train" / "manifest.json").read_text())
    assert manifest["figures"]["steps"] == 120 and manifest["figures"]["resumed_from_step"] >= 10
    with client(api) as c:
        assert c.read_global_concurrency_limit_by_name("test-gpu").active_slots == 0
