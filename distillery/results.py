"""What stages hand each other: typed results, never dicts.

    generate -> Traces            filter -> Traces (kept, with heldout and report)
    train    -> ModelArtifact     prune  -> [ModelArtifact]  (the unhealed one first when it is kept, the pruned last)
    quantize -> [ModelArtifact]   one per format
    evaluate -> {label: Evaluation}
    draft    -> ModelArtifact     (stage "draft", its figures the acceptance and speed-up)

Every result names its files (`path`), the MLflow run that made it, its figures, and a content hash of what it
wrote, so a later stage (or a later run) can tell what it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The stages whose models are full precision: what prune, quantize and draft start from.
FULL_PRECISION = ("init", "train", "prune")


@dataclass(frozen=True)
class Traces:
    """Rows of prompt/completion jsonl: the teacher's generations, or the kept ones after the filter."""

    path: str
    stage: str  # generate | filter
    run_id: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    content_hash: str | None = None
    heldout: str | None = None  # filter: whole prompts held out of training, for held-out NLL
    report: dict[str, Any] | None = None  # filter: what each rule dropped


@dataclass(frozen=True)
class ModelArtifact:
    """A model folder (safetensors, tokenizer, manifest) and where it came from."""

    label: str  # the table's and the registry's name: teacher, student, student-sft, student-nf4, draft, ...
    path: str
    stage: str  # reference (the teacher) | init (the untrained student) | train | prune | prune-unhealed | ...
    run_id: str | None = None
    params: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    content_hash: str | None = None
    artifact: str = "model"  # its artifact path on the stage's MLflow run: model, nf4, int8, draft-model

    @property
    def full_precision(self) -> bool:
        return self.stage in FULL_PRECISION


@dataclass(frozen=True)
class Evaluation:
    """One model's evaluate result: the figures the table and the registry use, and lm-eval's detail."""

    label: str
    path: str
    figures: dict[str, Any]
    detail: dict[str, Any] = field(default_factory=dict)  # per task results, samples, engine


def latest_full_precision(models: list[ModelArtifact], stage: str, fallback: ModelArtifact) -> ModelArtifact:
    """The full-precision student a later stage starts from: the named stage's (`stage`), or with "latest" the last
    one made; `fallback` (the untrained student) when no stage made one."""
    full = [m for m in models if m.full_precision]
    if stage == "latest":
        return full[-1] if full else fallback
    return next((m for m in full if m.stage == stage), fallback)
