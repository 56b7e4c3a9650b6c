"""Content-addressed stages: a finished stage is reused by any later run whose stage would compute the same thing.

A stage's key hashes what decides its output: the config sections it reads (`SECTIONS`; seeds are in them), the
content hashes of its inputs (the results the flow hands it), and the code (every .py of distillery/, tasks/ and
flows/, and the versions of the libraries that compute). When a stage finishes, its typed result is recorded under
`<output_dir>/.stages/<stage>-<key>.json` (atomically, after the stage's own files); a later run with the same key
finds the record, checks that the files are still there with the same content hash, and takes the result instead of
running the stage. A changed setting changes that stage's key, so it runs again; its new output changes the inputs,
so the stages downstream of it run again; the stages upstream keep their keys and are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from distillery.artifacts import atomic_write_text, content_hash
from distillery.results import Evaluation, ModelArtifact, Traces

REPO = Path(__file__).resolve().parents[1]
TYPES = {t.__name__: t for t in (Traces, ModelArtifact, Evaluation)}
LIBRARIES = ("torch", "transformers", "trl", "peft", "vllm", "lm_eval", "bitsandbytes", "datasets", "accelerate")

# The config sections each stage's output depends on, besides its inputs' content. Generous on purpose: a section
# listed that does not matter costs a recomputation; one missed would reuse a stale result.
SECTIONS: dict[str, tuple[str, ...]] = {
    "generate": ("teacher", "data", "generate"),
    "filter": ("filter", "data", "evaluate.tasks", "generate.max_tokens"),
    "train": ("train", "teacher", "student", "data", "filter.verifier", "filter.answer_pattern", "generate"),
    "prune": ("prune", "student", "data", "train.bf16"),
    "quantize": ("quantize", "student"),
    "evaluate": ("evaluate", "teacher", "student", "data"),
    "draft": ("draft", "teacher", "student", "data", "generate", "evaluate"),
}


@cache
def code_version() -> str:
    """The project's source and the computing libraries' versions: a change to either makes every key new."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for folder in ("distillery", "tasks", "flows"):
        for f in sorted((REPO / folder).rglob("*.py")):
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}=={version(lib.replace('_', '-'))}".encode())
        except PackageNotFoundError:
            h.update(f"{lib} absent".encode())
    return h.hexdigest()


def section(cfg, dotted: str) -> Any:
    value = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def stage_key(stage: str, cfg, inputs: list[Any]) -> str:
    """The key of `stage` run with `cfg` on `inputs` (results, or None for a missing one)."""
    doc = {
        "stage": stage,
        "config": {s: section(cfg, s) for s in SECTIONS[stage]},
        "inputs": [fingerprint(x) for x in inputs],
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(x: Any) -> Any:
    """What identifies an input: its content hash; a model without one (the teacher, a hub id) by its path and, for
    a local folder, its content."""
    if x is None or isinstance(x, str | int | float):
        return x
    if isinstance(x, list | tuple):
        return [fingerprint(v) for v in x]
    if getattr(x, "content_hash", None):
        return x.content_hash
    path = Path(x.path)
    return _folder_hash(str(path.resolve()), _stat_signature(path)) if path.exists() else x.path


def _stat_signature(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@cache
def _folder_hash(path: str, signature: tuple) -> str:
    """A local model's content hash, once per process while its files are unchanged (a 7B teacher is hashed once,
    not once per stage)."""
    return content_hash(path)


def encode(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {"__type__": type(x).__name__, **{f.name: encode(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, list | tuple):
        return [encode(v) for v in x]
    if isinstance(x, dict):
        return {k: encode(v) for k, v in x.items()}
    return x


def decode(x: Any) -> Any:
    if isinstance(x, dict) and "__type__" in x:
        kind = TYPES[x["__type__"]]
        return kind(**{k: decode(v) for k, v in x.items() if k != "__type__"})
    if isinstance(x, list):
        return [decode(v) for v in x]
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    return x


def record_path(output_dir: str | Path, stage: str, key: str) -> Path:
    return Path(output_dir).resolve() / ".stages" / f"{stage}-{key[:40]}.json"


def record(output_dir: str | Path, stage: str, key: str, result: Any, run_dir: str, parent_run_id: str) -> None:
    """Written after the stage's own files are complete: its presence says the result can be reused."""
    doc = {"stage": stage, "key": key, "run_dir": run_dir, "parent_run_id": parent_run_id, "result": encode(result)}
    atomic_write_text(record_path(output_dir, stage, key), json.dumps(doc, indent=2))


def lookup(output_dir: str | Path, stage: str, key: str) -> tuple[Any, dict] | None:
    """The recorded result of (`stage`, `key`) and its record, or None when there is none or its files changed or
    went (then the record is dropped and the stage runs again)."""
    path = record_path(output_dir, stage, key)
    try:
        doc = json.loads(path.read_text())
        result = decode(doc["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if doc.get("key") != key or not all(_intact(x) for x in _artifacts(result)):
        path.unlink(missing_ok=True)
        return None
    return result, doc


def _artifacts(result: Any) -> list:
    if isinstance(result, list):
        return [a for x in result for a in _artifacts(x)]
    if isinstance(result, dict):
        return [a for x in result.values() for a in _artifacts(x)]
    return [result] if result is not None else []


def _intact(x) -> bool:
    """The files a result names are all there, with the content it was recorded with. An Evaluation is its own
    record (its path is the model it measured, which the key holds by content)."""
    if isinstance(x, Evaluation):
        return True
    paths = [x.path] + ([x.heldout] if isinstance(x, Traces) and x.heldout else [])
    if not all(Path(p).exists() for p in paths):
        return False
    if isinstance(x, Traces) and x.content_hash:
        return content_hash(Path(x.path).parent) == x.content_hash
    if isinstance(x, ModelArtifact) and x.content_hash:
        return content_hash(x.path) == x.content_hash
    return True
