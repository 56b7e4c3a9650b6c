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

import json
import math
import time
from pathlib import Path

from prefect import flow, runtime

from distillery import console, logged_models, model_uris, registry
from distillery.artifacts import atomic_write_text
from distillery.concurrency import LEASE_TAG, gpu_slot
from distillery.config import MODEL_STAGES, ConfigError, Pipeline, load_pipeline, parse_overrides
from distillery.console import say
from distillery.demo.assets import resolve_model
from distillery.lifecycle import PROCESS_TAG, process_gone, reap, stop_on_signals, this_process
from distillery.prefect_ui import flow_run_name, link_mlflow_run, publish_report
from distillery.preflight import preflight
from distillery.results import ModelArtifact, latest_full_precision
from distillery.runtime import RunContext
from distillery.stagecache import lookup, record, stage_key
from distillery.tracking import NullTracker, StageRun, Tracker, tracking_uri
from tasks.draft import draft_task
from tasks.evaluate import evaluate_task
from tasks.filter import filter_task
from tasks.generate import generate_task
from tasks.prune import prune_task
from tasks.quantize import quantize_task
from tasks.report import report_task
from tasks.train import train_task

RUN_RECORD = "run.json"  # in each run folder: which pipeline and MLflow parent run it belongs to
DEFAULT_FILE = str(Path(__file__).resolve().parents[1] / "pipelines.yaml")


@flow(name="distill", log_prints=True, flow_run_name=flow_run_name)
def distill(
    pipeline: str = "demo",
    overrides: list[str] | None = None,
    config_file: str = DEFAULT_FILE,
    track: bool = True,
    resume: str | None = None,
    fresh: bool = False,
) -> dict:
    """Run one pipeline of `config_file`; `overrides` are `key=value` strings like `train.epochs=1`. `resume`: a run
    folder, or "latest", to continue in (its folder and MLflow parent run); `fresh`: run every stage, reusing none."""
    cfg = load_pipeline(config_file, pipeline, parse_overrides(overrides))
    if problems := preflight(cfg, pipeline):  # a deployment run too: refused before its MLflow run exists
        raise ConfigError(problems)
    with stop_on_signals():  # SIGTERM ends the run KILLED, as Ctrl-C does
        tracker, parent, ctx = open_run(cfg, pipeline, config_file, overrides, track, resume, reuse=not fresh)
        if track:
            link_mlflow_run(pipeline, ctx.tracking_uri, tracker.experiment_id, parent.run_id)
        try:
            with gpu_slot(cfg.concurrency, on_lease=lambda lease: parent.set_tags({LEASE_TAG: lease})):
                result = run_stages(cfg, ctx, tracker)
        except BaseException as e:
            tracker.finish(parent, e)
            raise
        tracker.finish(parent)
    return {**result, "mlflow_run_id": ctx.parent_run_id, "run_dir": ctx.run_dir}


def run_stages(cfg: Pipeline, ctx: RunContext, tracker) -> dict:
    """The stages the pipeline lists, in order; each hands the next typed results (distillery.results). A stage a
    run already finished with the same settings, inputs and code is reused, not run (distillery.stagecache)."""
    stages = cfg.stages
    teacher = ModelArtifact(
        label="teacher", path=model_input(ctx, tracker, "teacher", cfg.teacher.path), stage="reference"
    )
    student = ModelArtifact(
        label="student", path=model_input(ctx, tracker, "student", cfg.student.path, cfg.train.seed), stage="init"
    )
    # several teachers (generate.ensemble): each one is an input of generate and evaluated beside `teacher`
    others = [
        ModelArtifact(
            label=f"teacher{i + 2}", path=model_input(ctx, tracker, f"teacher{i + 2}", t.path), stage="reference"
        )
        for i, t in enumerate(cfg.generate.ensemble.teachers if cfg.generate.ensemble else [])
    ]
    models: list[ModelArtifact] = []  # every model a stage makes, in order
    traces = kept = None

    def once(stage: str, inputs: list, run):
        return reuse_or_run(stage, cfg, ctx, tracker, inputs, run)

    if "generate" in stages:
        traces = once("generate", [teacher, *others], lambda: generate_task(cfg, ctx))
    if "filter" in stages:
        kept = once("filter", [traces], lambda: filter_task(cfg, ctx, traces))
    if "train" in stages:
        models.append(
            once("train", [kept, student, traces, teacher], lambda: train_task(cfg, ctx, kept, student, traces))
        )
    if "prune" in stages:
        start = latest_full_precision(models, "latest", student)
        models += once("prune", [start, kept], lambda: prune_task(cfg, ctx, start, kept))
    if "quantize" in stages:
        source = latest_full_precision(models, cfg.quantize.source, student)
        heal_on = kept if cfg.quantize.heal else None  # the traces are an input only when healing uses them
        models += once("quantize", [source, heal_on], lambda: quantize_task(cfg, ctx, source, heal_on))
    evals = None
    if "evaluate" in stages:
        todo = [teacher, *others, *([student] if cfg.evaluate.include_untrained else []), *models]
        heldout = kept.heldout if kept else None
        evals = once("evaluate", [todo, kept], lambda: evaluate_task(cfg, ctx, todo, heldout))
    draft = None
    draft_source = latest_full_precision(models, cfg.draft.source, student)
    if "draft" in stages:  # an EAGLE-3 head is made from the teacher's samples, not from the student
        made_from = traces if cfg.draft.kind == "eagle3" else draft_source
        draft = once("draft", [teacher, made_from], lambda: draft_task(cfg, ctx, teacher, draft_source, traces))
    model_ids = log_models(cfg, ctx, tracker, teacher, student, models, evals, draft)
    gate = None
    if cfg.registry and models:
        gate = registry.register_run(
            tracker, ctx, cfg.registry, models, evals, logged=cfg.log_models, model_ids=model_ids
        )
    draft_label = None if cfg.draft.kind == "eagle3" else draft_source.label
    if cfg.registry and draft:
        registry.register_draft(tracker, ctx, cfg.registry, draft, draft_label or "eagle3", model_ids.get(draft.label))
    table = report_task(ctx, evals, draft, draft_label) if evals else None
    if table:
        publish_report(ctx.pipeline, table, ctx.run_dir)
    return {"models": models, "table": table, "gate": gate}


def log_models(cfg: Pipeline, ctx: RunContext, tracker, teacher, student, models, evals, draft) -> dict[str, str]:
    """Every model of the run as an MLflow logged model (distillery.logged_models): the teacher (and the untrained
    student, when evaluated) as references, the run's students with weights when log_models or registered."""
    if isinstance(tracker, NullTracker):
        return {}
    registered = set(cfg.registry.stages or MODEL_STAGES) if cfg.registry else set()
    todo = [(teacher, False)] + ([(student, False)] if evals and student.label in evals else [])
    todo += [(m, cfg.log_models or m.stage in registered) for m in models]
    if draft:
        todo.append((draft, cfg.log_models or cfg.registry is not None))
    measured = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`mlflow.parentRunId` = '{ctx.parent_run_id}' and tags.`distillery.stage` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    ids = logged_models.log_run_models(
        tracker.client,
        tracker.experiment_id,
        ctx.pipeline,
        ctx.parent_run_id,
        todo,
        evals,
        measured[0].info.run_id if measured else None,
    )
    say(f"logged models: {', '.join(ids)} (MLflow experiment {cfg.experiment}, Models)")
    return ids


def model_input(ctx: RunContext, tracker, role: str, ref: str, seed: int = 0) -> str:
    """The local folder of the teacher or student. An MLflow model URI is resolved to one version now (an alias may
    move later) and that is the run's lineage: tags distillery.<role>.uri / name / version / run_id on the parent."""
    if not model_uris.is_uri(ref):
        return resolve_model(ref, seed=seed)
    resolved = model_uris.resolve(ref)
    path = str(model_uris.download(resolved))
    if not isinstance(tracker, NullTracker):
        StageRun(tracker.client, ctx.parent_run_id).set_tags(resolved.tags(role))
    where = f"v{resolved.version} of {resolved.name}" if resolved.version else f"run {resolved.run_id}"
    say(f"{role}: {ref} is {where}, in {path}")
    return path


def reuse_or_run(stage: str, cfg: Pipeline, ctx: RunContext, tracker, inputs: list, run):
    """`run()`, recorded under its stage key; or, when a run already finished this stage with the same key, that
    result, with a child run (tags distillery.reused_from_*) saying where it came from."""
    key = stage_key(stage, cfg, inputs)
    found = lookup(cfg.output_dir, stage, key) if ctx.reuse else None
    if found is None:
        n = f"[{cfg.stages.index(stage) + 1}/{len(cfg.stages)}]"
        say(f"{n} {stage} ...")
        start = time.monotonic()
        result = run()
        record(cfg.output_dir, stage, key, result, ctx.run_dir, ctx.parent_run_id)
        say(f"{n} {stage} done in {_duration(time.monotonic() - start)}{headline(stage, result)}")
        return result
    result, doc = found
    resumed = doc["run_dir"] == ctx.run_dir  # this run finished it before it was interrupted
    where = "this run, before it was interrupted" if resumed else doc["run_dir"]
    say(f"{stage}: reused from {where}: same settings, inputs and code (key {key[:12]})")
    if not resumed:  # a resumed run has this stage's child run already
        tags = {
            "distillery.reused_from_dir": doc["run_dir"],
            "distillery.reused_from_parent": doc["parent_run_id"],
            "distillery.stage_key": key,
        }
        with tracker.stage(stage, ctx.parent_run_id, tags=tags) as child:
            child.log_metrics(figures_of(result))
    return result


# the figures a stage's end line shows, of those it has
HEADLINES = {
    "generate": ("samples", "mean_completion_tokens", "tokens_per_s"),
    "filter": ("kept", "keep_rate"),
    "train": ("steps", "final_loss", "train_tokens_per_s"),
    "prune": ("params",),
    "quantize": ("memory_bytes",),
    "evaluate": ("accuracy",),
    "draft": ("acceptance_rate", "mean_accepted_length", "speedup"),
}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def headline(stage: str, result) -> str:
    """': samples 16,000, tokens_per_s 9,531' from a stage's result; per model for stages that make several."""
    keys = HEADLINES.get(stage, ())

    def shown(v) -> bool:
        return v is not None and not (isinstance(v, float) and not math.isfinite(v))

    def pick(figures: dict) -> str:
        return ", ".join(f"{k} {_num(figures[k])}" for k in keys if shown(figures.get(k)))

    if isinstance(result, dict):
        parts = [f"{label} {pick(e.figures)}" for label, e in result.items() if pick(e.figures)]
    elif isinstance(result, list):
        parts = [f"{m.label} {pick(m.figures)}" for m in result if pick(m.figures)]
    else:
        parts = [pick(result.figures)] if result is not None and pick(result.figures) else []
    return ": " + "; ".join(parts) if parts else ""


def figures_of(result) -> dict:
    """A stage result's figures as MLflow metrics: a model's by name, each model's `<figure>.<label>`."""
    if isinstance(result, dict):
        return {f"{k}.{label}": v for label, e in result.items() for k, v in e.figures.items()}
    if isinstance(result, list):
        return {f"{k}.{m.label}": v for m in result for k, v in m.figures.items()}
    return dict(result.figures)


def open_run(
    cfg: Pipeline,
    pipeline: str,
    config_file: str,
    overrides: list[str] | None,
    track: bool,
    resume: str | None = None,
    reuse: bool = True,
):
    """The run's MLflow parent and folder: new ones, or with `resume` (a run folder, "latest") or a Prefect retry of
    a crashed flow run (the same flow run id), the interrupted run's own, reopened."""
    tracker = Tracker(cfg.experiment) if track else NullTracker()
    flow_run_id = runtime.flow_run.id or ""
    tags = {
        "distillery.pipeline": pipeline,
        "prefect.flow_run_id": flow_run_id,
        "distillery.config_file": config_file,
        "mlflow.note.content": cfg.description,
        PROCESS_TAG: this_process(),
    }
    previous = resumable(cfg, pipeline, resume, flow_run_id, tracker)
    if previous is None:
        parent = tracker.start(pipeline, tags=tags)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.output_dir).resolve() / pipeline / f"{stamp}-{parent.run_id[:8]}"
    else:
        run_dir, parent_id = previous
        parent = StageRun(tracker.client, parent_id) if track else tracker.start(pipeline)
    if track:  # runs of this pipeline whose process died (kill -9, a lost machine) end FAILED, not RUNNING for good
        for dead in reap(tracker.client, tracker.experiment_id, pipeline, by=parent.run_id):
            say(f"pipeline {pipeline}: run {dead} had died without ending; marked FAILED")
    run_dir.mkdir(parents=True, exist_ok=True)
    console.move_log(run_dir)  # quiet `distillery run`: the log so far, and the rest, in run_dir/run.log
    if previous is None:
        parent.log_params({"overrides": " ".join(overrides or []), **cfg.model_dump()})
        parent.log_text(cfg.model_dump_json(indent=2), "pipeline.json")
    elif track:
        tracker.client.update_run(parent.run_id, status="RUNNING")
        resumes = int(tracker.client.get_run(parent.run_id).data.tags.get("distillery.resumes", "0")) + 1
        parent.set_tags({**tags, "distillery.resumes": resumes, "distillery.end_reason": "resumed"})
        say(f"pipeline {pipeline}: resuming {run_dir} (MLflow run {parent.run_id}, resume {resumes})")
    parent.set_tags({"distillery.run_dir": str(run_dir)})
    atomic_write_text(
        run_dir / RUN_RECORD,
        json.dumps({"pipeline": pipeline, "parent_run_id": parent.run_id, "flow_run_id": flow_run_id}, indent=2),
    )
    ctx = RunContext(
        pipeline=pipeline,
        run_dir=str(run_dir),
        parent_run_id=parent.run_id,
        experiment=cfg.experiment,
        tracking_uri=tracking_uri() if track else "none",
        reuse=reuse,
    )
    say(f"pipeline {pipeline}: artifacts in {run_dir}; MLflow run {parent.run_id} at {ctx.tracking_uri}")
    return tracker, parent, ctx


def resumable(cfg: Pipeline, pipeline: str, resume: str | None, flow_run_id: str, tracker) -> tuple[Path, str] | None:
    """(run folder, MLflow parent run id) of the run to continue, or None for a new run."""
    if resume is None and flow_run_id and not isinstance(tracker, NullTracker):
        same = tracker.client.search_runs(
            [tracker.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=20
        )
        parents = [r for r in same if "mlflow.parentRunId" not in r.data.tags and "distillery.run_dir" in r.data.tags]
        if parents:  # `prefect flow-run retry`: the flow run is the one that crashed
            return Path(parents[0].data.tags["distillery.run_dir"]), parents[0].info.run_id
    if resume is None:
        return None
    if resume == "latest":
        done = sorted(
            (Path(cfg.output_dir).resolve() / pipeline).glob(f"*/{RUN_RECORD}"), key=lambda p: p.stat().st_mtime
        )
        if not done:
            raise ConfigError([f"--resume latest: no run of pipeline {pipeline} under {cfg.output_dir}/{pipeline}"])
        folder = done[-1].parent
    else:
        folder = Path(resume).resolve()
    try:
        rec = json.loads((folder / RUN_RECORD).read_text())
    except (OSError, ValueError):
        raise ConfigError([f"--resume {resume}: {folder} is not a run folder (no readable {RUN_RECORD})"]) from None
    if rec.get("pipeline") != pipeline:
        raise ConfigError(
            [f"--resume {resume}: {folder} is a run of pipeline {rec.get('pipeline')!r}, not {pipeline!r}"]
        )
    if not isinstance(tracker, NullTracker):
        tags = tracker.client.get_run(rec["parent_run_id"]).data.tags
        if tags.get(PROCESS_TAG) and process_gone(tags[PROCESS_TAG]) is False:
            raise ConfigError([f"--resume {resume}: run {rec['parent_run_id']} is still running ({tags[PROCESS_TAG]})"])
    return folder, rec["parent_run_id"]
