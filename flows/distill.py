"""The distillation DAG: generate → filter → train → prune → quantize → evaluate → draft → report.

    distillery run demo                                  # in-process, ephemeral Prefect API
    prefect deployment run 'distill/demo'                # through a server, after `distillery serve`

One MLflow parent run per pipeline run, a child per stage. Stages pass typed results (distillery.results: paths,
run ids, figures, content hashes), never live models, so each heavy stage can own its process and memory. The
stages run holding one slot of the global concurrency limit (`concurrency.limit_name`), so two runs never share a
GPU: the second waits. The models made are registered, and the registry gate decides whether alias `champion`
moves (distillery/registry.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, runtime

from distillery import registry
from distillery.concurrency import gpu_slot
from distillery.config import ConfigError, Pipeline, load_pipeline, parse_overrides
from distillery.demo.assets import resolve_model
from distillery.preflight import preflight
from distillery.results import ModelArtifact, latest_full_precision
from distillery.runtime import RunContext
from distillery.tracking import NullTracker, Tracker, tracking_uri
from tasks.draft import draft_task
from tasks.evaluate import evaluate_task
from tasks.filter import filter_task
from tasks.generate import generate_task
from tasks.prune import prune_task
from tasks.quantize import quantize_task
from tasks.report import report_task
from tasks.train import train_task

DEFAULT_FILE = str(Path(__file__).resolve().parents[1] / "pipelines.yaml")


@flow(name="distill", log_prints=True)
def distill(
    pipeline: str = "demo", overrides: list[str] | None = None, config_file: str = DEFAULT_FILE, track: bool = True
) -> dict:
    """Run one pipeline of `config_file`; `overrides` are `key=value` strings like `train.epochs=1`."""
    cfg = load_pipeline(config_file, pipeline, parse_overrides(overrides))
    if problems := preflight(cfg, pipeline):  # a deployment run too: refused before its MLflow run exists
        raise ConfigError(problems)
    tracker, parent, ctx = open_run(cfg, pipeline, config_file, overrides, track)
    try:
        with gpu_slot(cfg.concurrency):
            result = run_stages(cfg, ctx, tracker)
    except BaseException:
        tracker.end(parent, ok=False)
        raise
    tracker.end(parent, ok=True)
    return {**result, "mlflow_run_id": ctx.parent_run_id, "run_dir": ctx.run_dir}


def run_stages(cfg: Pipeline, ctx: RunContext, tracker) -> dict:
    """The stages the pipeline lists, in order; each hands the next typed results (distillery.results)."""
    stages = cfg.stages
    teacher = ModelArtifact(label="teacher", path=resolve_model(cfg.teacher.path), stage="reference")
    student = ModelArtifact(label="student", path=resolve_model(cfg.student.path, seed=cfg.train.seed), stage="init")
    models: list[ModelArtifact] = []  # every model a stage makes, in order
    traces = kept = None

    if "generate" in stages:
        traces = generate_task(cfg, ctx)
    if "filter" in stages:
        kept = filter_task(cfg, ctx, traces)
    if "train" in stages:
        models.append(train_task(cfg, ctx, kept, student, generated=traces))
    if "prune" in stages:
        models += prune_task(cfg, ctx, latest_full_precision(models, "latest", student), kept)
    if "quantize" in stages:
        models += quantize_task(cfg, ctx, latest_full_precision(models, cfg.quantize.source, student))
    evals = None
    if "evaluate" in stages:
        untrained = [student] if cfg.evaluate.include_untrained else []
        evals = evaluate_task(cfg, ctx, [teacher, *untrained, *models], kept.heldout if kept else None)
    draft = None
    draft_source = latest_full_precision(models, cfg.draft.source, student)
    if "draft" in stages:
        draft = draft_task(cfg, ctx, teacher, draft_source)
    gate = None
    if cfg.registry and models:
        gate = registry.register_run(tracker, ctx, cfg.registry, models, evals, logged=cfg.log_models)
    if cfg.registry and draft:
        registry.register_draft(tracker, ctx, cfg.registry, draft, draft_source.label)
    table = report_task(ctx, evals, draft, draft_source.label) if evals else None
    return {"models": models, "table": table, "gate": gate}


def open_run(cfg: Pipeline, pipeline: str, config_file: str, overrides: list[str] | None, track: bool):
    tracker = Tracker(cfg.experiment) if track else NullTracker()
    flow_run_id = runtime.flow_run.id or ""
    parent = tracker.start(
        pipeline,
        tags={
            "distillery.pipeline": pipeline,
            "prefect.flow_run_id": flow_run_id,
            "distillery.config_file": config_file,
            "mlflow.note.content": cfg.description,
        },
    )
    run_dir = Path(cfg.output_dir).resolve() / pipeline / f"{time.strftime('%Y%m%d-%H%M%S')}-{parent.run_id[:8]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    parent.log_params({"overrides": " ".join(overrides or []), **cfg.model_dump()})
    parent.log_text(cfg.model_dump_json(indent=2), "pipeline.json")
    ctx = RunContext(
        pipeline=pipeline,
        run_dir=str(run_dir),
        parent_run_id=parent.run_id,
        experiment=cfg.experiment,
        tracking_uri=tracking_uri() if track else "none",
    )
    print(f"pipeline {pipeline}: artifacts in {run_dir}; MLflow run {parent.run_id} at {ctx.tracking_uri}")
    return tracker, parent, ctx
