"""What a run shows in Prefect's UI: its name (`<pipeline>-<date>-<time>`), a link to its MLflow parent run, progress
of its long stages, and the report table, each an artifact of the flow run.

Outside a flow run (the stage functions called directly, `distillery train`) there is nothing to attach to and
every call here does nothing. A Prefect API that fails to take an artifact never fails the run: the UI is a view,
the run's record is MLflow and its folder.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

log = logging.getLogger(__name__)


def flow_run_name() -> str:
    """`<pipeline>-<YYYYmmdd>-<HHMMSS>` (local time): the run's name in Prefect's UI and CLI, easier to find than
    an adjective-animal pair."""
    from prefect import runtime

    pipeline = (runtime.flow_run.parameters or {}).get("pipeline", "distill")
    return f"{pipeline}-{datetime.now():%Y%m%d-%H%M%S}"


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _key(*parts: str) -> str:
    """Artifact keys: lowercase letters, digits and dashes only."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-" for c in raw).strip("-")


def _quietly(what: str, fn, *args, **kwargs):
    if not _in_run():
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # the UI is a view of the run; never fail the run for it
        log.warning("Prefect artifact (%s) not recorded: %s", what, str(e).splitlines()[0] if str(e) else e)
        return None


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> tuple[str, str]:
    """The MLflow UI's page of a run, and how to open it: the tracking server's own page when the URI is one, else
    the page `mlflow ui` serves on its default address for that store."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{path}", f"MLflow tracking server {tracking_uri}"
    how = f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1"
    return f"http://127.0.0.1:5000/{path}", f"run `{how}` to open it"


def link_mlflow_run(pipeline: str, tracking_uri: str, experiment_id: str, run_id: str) -> None:
    from prefect.artifacts import create_link_artifact

    url, how = mlflow_run_url(tracking_uri, experiment_id, run_id)
    _quietly(
        "MLflow link",
        create_link_artifact,
        link=url,
        link_text=f"MLflow run {run_id}",
        key=_key(pipeline, "mlflow-run"),
        description=f"The pipeline's MLflow parent run: its stages, figures, models ({how}).",
    )


def publish_report(pipeline: str, markdown: str, run_dir: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    _quietly(
        "report",
        create_markdown_artifact,
        markdown=f"# {pipeline}: report\n\n{markdown}\n\nRun folder: `{run_dir}`\n",
        key=_key(pipeline, "report"),
        description=f"Teacher and students of this {pipeline} run (the table `distillery run` prints)",
    )


class Progress:
    """A progress artifact of the current flow run, updated as work is done (at most every `every` seconds, and
    always at the end), and the console's progress bar (distillery.console.Bar) for the same work."""

    def __init__(self, what: str, total: int, every: float = 2.0):
        from prefect.artifacts import create_progress_artifact

        from distillery.console import Bar

        self.what, self.total, self.every = what, max(int(total), 1), every
        self.last = 0.0
        self.bar = Bar(what, self.total)
        self.id = _quietly(what, create_progress_artifact, progress=0.0, description=f"{what}: 0/{self.total}")

    def update(self, done: int) -> None:
        self.bar.update(done)
        if self.id is None:
            return
        now = time.monotonic()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        from prefect.artifacts import update_progress_artifact

        pct = round(100.0 * min(done, self.total) / self.total, 1)
        _quietly(self.what, update_progress_artifact, self.id, pct, description=f"{self.what}: {done}/{self.total}")


def trainer_progress(what: str):
    """A transformers TrainerCallback that moves a progress artifact with the trainer's steps."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        bar: Progress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = Progress(what, state.max_steps)
            self.bar.update(state.global_step)  # a resumed trainer starts past 0

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar:
                self.bar.update(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar:
                self.bar.update(self.bar.total)

    return _Progress()
