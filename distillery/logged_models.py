"""Every model a run makes as an MLflow logged model (MLflow 3's first-class model), so the experiment's Models view
lines up the teacher and the students of any pipeline, and `models:/` URIs load them with the transformers flavor.

- Each student (train, prune, quantize, the draft) is logged from its folder with `mlflow.transformers` (task
  text-generation; a bitsandbytes checkpoint keeps its quantization_config and loads quantized), linked to the stage
  run that made it (`source_run_id`). With `log_models: false` only the registered ones carry weights; the others,
  like the teacher and the untrained student, are references: a logged model without weights whose tag
  `distillery.path` says where the weights are.
- Each carries the evaluation's figures under one set of names, whatever the pipeline or the method
  (METRICS); the registry's versions point at these models (distillery/registry.py).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from distillery.eagle3 import is_eagle3
from distillery.results import Evaluation, ModelArtifact

# the logged model's metric <- the evaluate (or draft) figure it comes from; `recovery` and `heldout_nll` derived
METRICS = {
    "accuracy": "accuracy",
    "accuracy_stderr": "accuracy_stderr",
    "ood_accuracy": "ood_accuracy",
    "ood_accuracy_stderr": "ood_accuracy_stderr",
    "params": "params",
    "memory_bytes": "memory_bytes",
    "peak_bytes": "peak_bytes",
    "tokens_per_s": "tokens_per_s",
    "acceptance_rate": "acceptance_rate",
    "mean_accepted_length": "mean_accepted_length",
    "speedup": "speedup",
}
# the flavor's own defaults name torchvision (../shared/STACK.md); what loading a distillery model needs
PIP_REQUIREMENTS = ["torch", "transformers", "accelerate", "safetensors", "bitsandbytes"]


def model_metrics(model: ModelArtifact, evaluation: Evaluation | None, teacher_accuracy: float | None) -> dict:
    """The logged model's metrics: its evaluation's figures (and a quantized model's peak memory from its stage),
    recovery against the teacher, held-out NLL per token; only finite numbers."""
    figures: dict[str, Any] = {**model.figures, **(evaluation.figures if evaluation else {})}
    out = {name: figures.get(src) for name, src in METRICS.items()}
    acc = figures.get("accuracy")
    if acc is not None and teacher_accuracy:
        out["recovery"] = acc / teacher_accuracy
    if figures.get("heldout_perplexity"):
        out["heldout_nll"] = math.log(figures["heldout_perplexity"])
    clean = {}
    for k, v in out.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            clean[k] = v
    return clean


def log_run_models(
    client,
    experiment_id: str,
    pipeline: str,
    parent_run_id: str,
    models: list[tuple[ModelArtifact, bool]],
    evals: dict[str, Evaluation] | None,
    evaluate_run_id: str | None = None,
) -> dict[str, str]:
    """Log each (model, with weights) as a logged model of the experiment; returns label -> model id. Metrics are
    logged on the run that measured them: the evaluate stage's (`evaluate_run_id`), the draft's own."""
    from mlflow.entities import LoggedModelStatus

    teacher = (evals or {}).get("teacher")
    teacher_acc = teacher.figures.get("accuracy") if teacher else None
    ids = {}
    for m, weights in models:
        kind = "reference" if m.stage in ("reference", "init") else ("transformers" if weights else "reference")
        if (Path(m.path) / "adapter_config.json").is_file():  # adapters on a base folder: no transformers flavor
            kind = "reference"
        if kind == "transformers" and is_eagle3(m.path):  # speculators' format: the folder as vLLM loads it
            kind = "speculators"
        tags = {
            "distillery.pipeline": pipeline,
            "distillery.parent_run_id": parent_run_id,
            "distillery.stage": m.stage,
            "distillery.label": m.label,
            "distillery.path": m.path,
        }
        if m.content_hash:
            tags["distillery.content_hash"] = m.content_hash
        source_run = m.run_id or parent_run_id
        lm = client.create_logged_model(
            experiment_id, name=m.label, source_run_id=source_run, tags=tags, model_type=kind
        )
        try:
            if kind == "transformers":
                with tempfile.TemporaryDirectory() as tmp:
                    folder = Path(tmp) / "model"
                    save_flavor(m.path, folder)
                    client.log_model_artifacts(lm.model_id, str(folder))
            elif kind == "speculators":
                client.log_model_artifacts(lm.model_id, m.path)
            evaluation = (evals or {}).get(m.label)
            metrics = model_metrics(m, evaluation, teacher_acc)
            measured_by = evaluate_run_id if evaluation is not None and evaluate_run_id else source_run
            for key, value in metrics.items():
                client.log_metric(measured_by, key, value, model_id=lm.model_id)
        except BaseException:
            client.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
        ids[m.label] = lm.model_id
    return ids


def save_flavor(model_dir: str, dest: Path) -> None:
    """The transformers flavor of a model folder, from the checkpoint as it is (no load of the weights)."""
    import logging

    import mlflow.transformers

    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # "a local checkpoint is given ..." notices
    mlflow.transformers.save_model(
        transformers_model=str(model_dir),
        path=str(dest),
        task="text-generation",
        pip_requirements=PIP_REQUIREMENTS,
    )
