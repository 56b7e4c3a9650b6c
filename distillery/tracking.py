"""MLflow tracking: one parent run per pipeline run, one child run per stage, models in the registry.

Honours MLFLOW_TRACKING_URI; the default is a SQLite store `mlflow.db` with artifacts in `mlartifacts/`, both in
the working directory (`mlflow ui --backend-store-uri sqlite:///mlflow.db` shows them). Everything goes through
MlflowClient with explicit run ids: Prefect runs tasks in worker threads, and mlflow's fluent "active run" is
thread-local. A tracker that is off is a NullTracker with the same methods.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def despite_insert_race(call: Callable[[], Any], *, redo: bool = True) -> bool:
    """`call()`, an MLflow write that looks a row up and then inserts it: of two clients doing both at once, the
    second hits the store's unique key. The row exists afterwards, so with `redo` the call is made again (now it
    links or updates); without, nothing is written and False returned, for a caller whose choice depended on the
    row being absent. Any other error raises."""
    from mlflow.exceptions import MlflowException

    try:
        call()
    except MlflowException as e:
        if "unique" not in str(e).lower():
            raise
        if not redo:
            return False
        call()
    return True


class StageRun:
    """A child (or parent) run: thin, explicit-id wrappers over MlflowClient."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_figure(self, fig, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def artifact_uri(self, path: str = "") -> str:
        base = self.client.get_run(self.run_id).info.artifact_uri
        return f"{base}/{path}" if path else base


EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3 UI: which views an experiment gets


class Tracker:
    def __init__(self, experiment: str, uri: str | None = None):
        self.uri = uri or tracking_uri()
        self.client = self._open_client()
        self.experiment_id = self._experiment_id(experiment)

    def _open_client(self):
        """MLflow creates and migrates a new SQLite store when a client first opens it; two processes doing that at
        once (two first runs started together) crash in the migrations. One at a time: the second finds it made."""
        from mlflow.tracking import MlflowClient

        if not self.uri.startswith("sqlite:///"):
            return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        from filelock import FileLock

        db = Path(self.uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{db}.lock", timeout=600):
            client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            client.search_registered_models(max_results=1)  # the registry's store opened under the lock too
        return client

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created when missing. Two runs sharing a store may both find it missing and both
        create it: the loser gets RESOURCE_ALREADY_EXISTS (a unique-name violation) and reads the winner's."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if EXPERIMENT_KIND not in exp.tags:  # made before distillery tagged its experiments, or by hand
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "finetuning")
            return exp.experiment_id
        location = None
        if not self.uri.startswith(("http://", "https://", "databricks")):
            # Local stores keep artifacts beside the database, not wherever the process happened to start; a
            # server decides itself (--artifacts-destination / --default-artifact-root).
            base = Path(self.uri.removeprefix("sqlite:///")).parent if self.uri.startswith("sqlite") else Path.cwd()
            location = (base / "mlartifacts").resolve().as_uri()
        try:
            # a model-training experiment: MLflow's UI then shows its runs and Models (logged models), not GenAI views
            return self.client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: "finetuning"})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(e).lower():
                raise
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> StageRun:
        all_tags = dict(tags or {})
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return StageRun(self.client, run.info.run_id)

    def end(self, run: StageRun, ok: bool = True) -> None:
        self.client.set_terminated(run.run_id, "FINISHED" if ok else "FAILED")

    def finish(self, run: StageRun, exc: BaseException | None = None) -> None:
        """End `run` after `exc` (None: it completed): FINISHED, FAILED, or KILLED for Ctrl-C and SIGTERM, with tag
        distillery.end_reason saying why (distillery.lifecycle)."""
        from distillery.lifecycle import END_REASON, end_state

        status, reason = end_state(exc)
        tags = {END_REASON: reason}
        if status == "FAILED":
            tags["distillery.error"] = f"{type(exc).__name__}: {exc}"[:5000]
        run.set_tags(tags)
        self.client.set_terminated(run.run_id, status)

    @contextmanager
    def stage(self, name: str, parent_id: str | None, tags: dict[str, str] | None = None) -> Iterator[StageRun]:
        """A child run that ends FAILED, or KILLED on Ctrl-C and SIGTERM (and re-raises), when the stage raises."""
        from distillery.lifecycle import mark_stage

        run = self.start(name, parent_id, {"distillery.stage": name, **(tags or {})})
        try:
            yield run
        except BaseException as e:
            mark_stage(e, name)
            self.finish(run, e)
            raise
        self.end(run, ok=True)

    def register(
        self,
        name: str,
        run: StageRun,
        artifact_path: str,
        tags: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> str:
        """Register a logged model (`model_id`, made by `run`), or else an artifact folder of `run`, as a new version
        of model `name`; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
                raise
        mv = self.client.create_model_version(
            name,
            source=f"models:/{model_id}" if model_id else run.artifact_uri(artifact_path),
            run_id=run.run_id,
            tags={k: str(v) for k, v in (tags or {}).items() if v is not None},  # no "None" strings
            model_id=model_id,
        )
        return str(mv.version)

    def set_alias(self, name: str, alias: str, version: str, *, overwrite_racer: bool = True) -> bool:
        """Point `alias` at `version`; an alias is unique per model, so it leaves whatever version had it.

        Another client may create the same alias at that moment: with `overwrite_racer` the write is made again over
        it; without, nothing is written and False returned (`despite_insert_race`)."""
        return despite_insert_race(
            lambda: self.client.set_registered_model_alias(name, alias, version), redo=overwrite_racer
        )

    def get_alias(self, name: str, alias: str):
        """The ModelVersion `alias` points at, or None when the model or the alias does not exist yet."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            # No model: RESOURCE_DOES_NOT_EXIST; a model without the alias: INVALID_PARAMETER_VALUE "... not found".
            if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "alias" in str(e) and "not found" in str(e):
                return None
            raise


class NullRun(StageRun):
    def __init__(self):
        self.run_id = "none"

    def __getattribute__(self, name):
        if name in ("run_id",):
            return object.__getattribute__(self, name)
        if name == "artifact_uri":
            return lambda path="": ""
        return lambda *a, **k: None


class NullTracker:
    """Tracking off: same methods, nothing written."""

    uri = "none"
    experiment_id = "none"

    def start(self, *a, **k) -> StageRun:
        return NullRun()

    def end(self, *a, **k) -> None:
        return None

    def finish(self, *a, **k) -> None:
        return None

    @contextmanager
    def stage(self, name: str = "", *a, **k) -> Iterator[StageRun]:
        from distillery.lifecycle import mark_stage

        try:
            yield NullRun()
        except BaseException as e:
            mark_stage(e, name)
            raise

    def register(self, *a, **k) -> str:
        return "0"

    def set_alias(self, *a, **k) -> None:
        return None

    def get_alias(self, *a, **k) -> None:
        return None
