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
        "DISTILLERY_CACHE": str(SESSION_TMP / "cache"),
        "HF_HOME": str(SESSION_TMP / "hf"),
    }
)
(SESSION_TMP / "prefect").mkdir(parents=True, exist_ok=True)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session", autouse=True)
def _remove_session_tmp():
    yield
    import shutil

    shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
