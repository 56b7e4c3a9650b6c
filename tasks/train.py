"""train: the student learns from the teacher, by the pipeline's `train.method` (distillery.methods: hard, sft,
logit_kd, gkd, dpo; full, LoRA or QLoRA).

    distillery run demo --set train.epochs=1

The stage records the run on MLflow: parameters, the traces as dataset inputs, metrics streamed per logging step,
the loss curve, and the model when `log_models`.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import content_hash
from distillery.config import Pipeline
from distillery.methods import METHOD_LABELS, run_method
from distillery.prefect_ui import trainer_progress
from distillery.results import ModelArtifact, Traces
from distillery.runtime import RunContext
from distillery.training import loss_curve, mlflow_callback


def train_logged(cfg: Pipeline, run, student: str, traces: str | None, generated: str | None, out: Path) -> dict:
    """`run_method` with its record on the MLflow run `run`: parameters, the traces as dataset inputs, metrics
    streamed per logging step, the loss curve, the model when `log_models`. A NullRun records nothing (tracking
    off, or an accelerate process other than the first, which alone writes `out`)."""
    from distillery.lineage import log_traces_input
    from distillery.tracking import NullRun

    run.log_params({"student": cfg.student.path, **cfg.train.model_dump()})
    # lineage: what the student was trained on, and what it was filtered from
    if generated:
        log_traces_input(run, Path(generated), "generated", context="source")
    if traces:
        log_traces_input(run, Path(traces), "filtered", context="training")
    figures = run_method(
        cfg, student, traces, generated, out, callbacks=[mlflow_callback(run), trainer_progress("train: steps")]
    )
    if isinstance(run, NullRun):
        return figures
    run.log_metrics(figures)
    import matplotlib.pyplot as plt

    fig = loss_curve(json.loads((out / "manifest.json").read_text())["loss_history"])
    run.log_figure(fig, "loss_curve.png")
    plt.close(fig)
    if cfg.log_models:
        run.log_artifact(out, "model")
    return figures


@task(name="train", cache_policy=NO_CACHE, log_prints=False)  # datasets prints bytecode when hashing
def train_task(
    cfg: Pipeline, ctx: RunContext, traces: Traces | None, student: ModelArtifact, generated: Traces | None = None
) -> ModelArtifact:
    """The student trained by `train.method` on the kept `traces` (`generated`: the teacher's generations they were
    kept from, which hold the top-k logprobs that logit KD reads)."""
    out = ctx.stage_dir("train")
    with ctx.tracker().stage("train", ctx.parent_run_id) as run:
        figures = train_logged(
            cfg, run, student.path, traces.path if traces else None, generated.path if generated else None, out
        )
    return ModelArtifact(
        label=METHOD_LABELS[cfg.train.method],
        path=str(out),
        stage="train",
        run_id=run.run_id,
        params=figures.get("params"),
        figures=figures,
        content_hash=content_hash(out),
    )
