"""Dataset lineage in MLflow: trace files logged as dataset inputs of a run (`mlflow.log_input` semantics),
named by teacher and sampling, with a digest of their content, so the MLflow UI shows what a student saw."""

from __future__ import annotations

import json
from pathlib import Path


def log_traces_input(run, path: Path, name: str, context: str) -> None:
    """Log the jsonl at `path` as a dataset input of `run` (a StageRun; a NullRun does nothing)."""
    from distillery.tracking import NullRun, despite_insert_race

    if isinstance(run, NullRun):  # tracking off (its attributes are all no-op callables)
        return
    import pandas as pd
    from mlflow.data import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    df = pd.read_json(path, lines=True)
    meta = {}
    manifest = Path(path).parent / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        meta = {k: m.get(k) for k in ("teacher", "teacher_revision", "sampling", "backend") if m.get(k) is not None}
    cols = [c for c in ("prompt_id", "prompt", "completion", "answer", "num_tokens") if c in df.columns]
    teacher = meta.get("teacher") or (df["teacher"].iloc[0] if "teacher" in df.columns and len(df) else "unknown")
    ds = from_pandas(df[cols], source=str(Path(path).resolve()), name=f"{name}:{teacher}")
    tags = [InputTag("mlflow.data.context", context)]
    tags += [InputTag(f"distillery.{k}", json.dumps(v) if not isinstance(v, str) else v) for k, v in meta.items()]
    inputs = [DatasetInput(ds._to_mlflow_entity(), tags=tags)]
    # Two runs logging the same dataset (same name and digest) to one experiment at once: the loser of MLflow's
    # look-up-then-insert links the dataset the other inserted.
    despite_insert_race(lambda: run.client.log_inputs(run.run_id, datasets=inputs))
