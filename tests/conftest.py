"""Shared test set-up: every test gets its own MLflow store, Prefect home and model cache; nothing touches the
network; tiny models are built locally from the demo tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SESSION_TMP = Path(os.environ.get("DISTILLERY_TEST_TMP", "/tmp")) / f"distillery-tests-{os.getpid()}"

# Before anything imports prefect/mlflow/transformers: isolate state, stay offline.
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # `mlflow server`/`ui` would start job-runner processes (huey) that outlive the server the tests stop
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "DO_NOT_TRACK": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_HOME": str(SESSION_TMP / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(SESSION_TMP / "prefect" / "storage"),
        "PREFECT_MEMO_STORE_PATH": str(SESSION_TMP / "prefect" / "memo_store.toml"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # an ephemeral Prefect API starting beside another test's work on 2 cores can take longer than the default 20 s
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "DISTILLERY_CACHE": str(SESSION_TMP / "cache"),
        "HF_HOME": str(SESSION_TMP / "hf"),
    }
)


def _one_share_of_the_cpus() -> None:
    """Under `pytest -n N` (make test: two workers), each worker and everything it starts runs on its own share of
    the CPUs: its torch threads, its vLLM engines' OpenMP threads (bound to those cores, not to every core, where two
    engines' spinning threads would fight) and its subprocesses. Much of an end-to-end test is one core busy (imports,
    server start-ups, MLflow and Prefect calls); the two workers overlap those instead of queueing them."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < count:
        return
    share = cpus[int(worker.removeprefix("gw")) % count :: count]
    os.sched_setaffinity(0, share)
    threads = str(len(share))
    os.environ.update(
        {
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, share)),
        }
    )


_one_share_of_the_cpus()
(SESSION_TMP / "prefect").mkdir(parents=True, exist_ok=True)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session", autouse=True)
def _remove_session_tmp():
    yield
    import shutil

    shutil.rmtree(SESSION_TMP, ignore_errors=True)


def sqlite_store(folder: Path) -> str:
    """A new, empty MLflow SQLite store in `folder` (mlflow.db), as a URI: a copy of one made (and migrated) once
    per session, since creating MLflow's tables takes 4-8 s on 2 cores and most tests need a store of their own.
    tests/test_shared_mlflow.py creates its stores from nothing."""
    import shutil

    template = SESSION_TMP / "template-mlflow.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        tmp = SESSION_TMP / f"template-{os.getpid()}.db"
        MlflowClient(f"sqlite:///{tmp}").search_experiments()  # creates and migrates the tables
        tmp.replace(template)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from distillery.demo.assets import TEACHER_DIR

    return AutoTokenizer.from_pretrained(TEACHER_DIR)


@pytest.fixture(scope="session")
def tiny_student(tokenizer, tmp_path_factory) -> Path:
    """A random-init 4-layer Llama on the demo tokenizer (~0.28M params)."""
    from distillery.demo import assets

    return assets.save_atomic(
        assets.init_model(assets.STUDENT_SHAPE, tokenizer, seed=0),
        tokenizer,
        tmp_path_factory.mktemp("models") / "student",
    )


@pytest.fixture(scope="session")
def gold_records():
    from distillery.demo import task

    return [p.as_record() for p in task.problems(seed=99, count=64)]


def run_pipeline_cli(pipeline: str, sets: list[str], cwd: Path):
    """`distillery run <pipeline> --set ...` as a user runs it, in `cwd` with an MLflow store of its own there;
    returns (the finished process, checked to exit 0, and the store's URI)."""
    import subprocess
    import sys

    uri = sqlite_store(cwd)
    r = subprocess.run(
        [str(Path(sys.executable).parent / "distillery"), "run", pipeline, "--file", str(REPO / "pipelines.yaml")]
        + [x for s in sets for x in ("--set", s)],
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r, uri


def chat_teacher(dest: Path, template: str) -> Path:
    """A copy of the demo teacher whose tokenizer has `template` as its chat template."""
    import shutil

    from transformers import AutoTokenizer

    from distillery.demo.assets import TEACHER_DIR

    shutil.copytree(TEACHER_DIR, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tok.chat_template = template
    tok.save_pretrained(dest)
    return dest


# The longest files first: `make test` runs files on two workers (pytest-xdist, --dist loadfile), and a long file
# left for last would run alone on a 2-core machine. Minutes each on a 2-core machine without AVX-512.
LONGEST_FIRST = [
    "test_e2e.py",  # the demo run
    "test_served.py",  # the served deployment, a chained run, the browser check
    "test_rehearsal.py",  # r1-rehearsal at real shapes
    "test_interrupts.py",  # the kill matrix
    "test_deploy.py",
    "test_shared_mlflow.py",
    "test_serving.py",
    "test_evaluate_vllm.py",
    "test_generate.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
