"""Checks of what a pipeline will read, before anything starts: no run folder, no MLflow run, no Prefect run for
an input that would fail an hour later.

    problems = preflight(cfg, "demo")   # one line each: `pipelines.demo.<field>: <file> line N: what is wrong`

The config model has already checked types, ranges and that local paths exist; this reads inside them: every
line of a jsonl data file parses and has the configured fields, there is at least one prompt, the prompt template
formats, model folders hold a config, weights and a tokenizer, and the eval tasks exist (evals/ or lm-eval's).
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from distillery.config import BUILTIN_PREFIXES, LOCAL_PREFIXES, DataConfig, Pipeline

EVALS = Path(__file__).resolve().parents[1] / "evals"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def preflight(cfg: Pipeline, name: str) -> list[str]:
    at = f"pipelines.{name}"
    problems = [f"{at}.data.{p}" for p in data_problems(cfg.data)]
    problems += [
        f"{at}.{role}.path: {p}" for role in ("teacher", "student") for p in model_problems(getattr(cfg, role).path)
    ]
    if "generate" in cfg.stages and cfg.generate.ensemble:
        problems += [
            f"{at}.generate.ensemble.teachers[{i}].path: {p}"
            for i, t in enumerate(cfg.generate.ensemble.teachers)
            for p in model_problems(t.path)
        ]
    if "evaluate" in cfg.stages:
        problems += [f"{at}.evaluate.tasks: {p}" for p in task_problems(cfg.evaluate.tasks)]
    return problems


def data_problems(d: DataConfig) -> list[str]:
    """The first problem of the data's prompts, as `field: where: what`; [] when they are usable."""
    if problem := template_problem(d.prompt_template):
        return [f"prompt_template: {problem}"]
    if d.source != "jsonl":
        return []  # demo: built in; hub: the id's form is checked by the config, its rows need the network
    fields = {"prompt_field": d.prompt_field, "answer_field": d.answer_field}
    found = jsonl_problem(Path(d.path), fields, nonempty="prompt_field", what="prompts")
    return [f"{found[0]}: {found[1]}"] if found else []


def jsonl_problem(
    path: Path, fields: dict[str, str], nonempty: str | None = None, what: str = "rows"
) -> tuple[str, str] | None:
    """The first line of a jsonl file that is not UTF-8 JSON object text with every one of `fields` (role -> field
    name), or whose `nonempty` field is blank, or a file with no rows: (the role it concerns, or "path"; what is
    wrong, naming file and line). None when every line is usable."""
    if path.is_dir():
        return "path", f"{path} is a folder, not a jsonl file"
    count = 0
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode()
            except UnicodeDecodeError as e:
                return "path", f"{path} line {i}: not UTF-8 text ({e.reason} at byte {e.start})"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return "path", f"{path} line {i}: not JSON ({e.msg} at column {e.colno})"
            if not isinstance(row, dict):
                return "path", f"{path} line {i}: not a JSON object but {type(row).__name__}"
            for role, name in fields.items():
                if name not in row:
                    return role, f"{path} line {i}: no field {name!r} (fields: {', '.join(row) or 'none'})"
            if nonempty and not str(row[fields[nonempty]]).strip():
                return nonempty, f"{path} line {i}: field {fields[nonempty]!r} is empty"
            count += 1
    return None if count else ("path", f"{path}: no {what} (the file has no JSON lines)")


def template_problem(template: str) -> str | None:
    """A format string that names anything but {prompt}, or does not parse, fails on the first prompt."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        return f"{template!r} is not a format string ({e})"
    if extra := sorted(fields - {"prompt"}):
        return f"{template!r} names {{{extra[0]}}}; only {{prompt}} is filled in"
    return None


def model_problems(ref: str) -> list[str]:
    """A local model folder that from_pretrained would fail on: missing config, weights or tokenizer; an MLflow model
    URI that names no model, version, alias or run in the tracking store."""
    from distillery import model_uris

    if model_uris.is_uri(ref):
        try:
            model_uris.resolve(ref)
        except model_uris.ModelUriError as e:
            return [str(e).removeprefix(f"{ref}: ")]
        return []
    if ref.startswith(BUILTIN_PREFIXES) or not ref.startswith(LOCAL_PREFIXES):
        return []  # demo models are built on demand; hub ids are checked for their form by the config
    path = Path(ref).expanduser()
    if not path.is_dir():
        return [f"{ref} is not a folder"]
    if not (path / "config.json").is_file():
        return [f"{ref} has no config.json: not a model folder (save it with save_pretrained)"]
    if not any(any(path.glob(g)) for g in WEIGHT_GLOBS):
        return [f"{ref} has no weights (*.safetensors)"]
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return [f"{ref} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])})"]
    try:
        json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return [f"{ref}/config.json is not JSON ({e})"]
    return []


def task_problems(tasks: list[str]) -> list[str]:
    """Eval tasks that are neither a local task under evals/ nor one lm-eval knows."""
    missing = [t for t in tasks if not (EVALS / t).is_dir()]
    if not missing:
        return []
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.origin:
        return [f"task {missing[0]!r} is not under evals/ and lm-eval is not installed to look it up"]
    # The names lm-eval's task YAMLs declare, read as text (0.6 s, where indexing them all takes ~10 s); a name
    # this misses (a task built in Python) is looked up in lm-eval's own index before it is refused.
    declared = re.compile(r"^(?:task|group|tag):\s*([\w.\-]+)\s*$", re.M)
    known = set()
    for f in (Path(spec.origin).parent / "tasks").rglob("*.yaml"):
        known.update(declared.findall(f.read_text(errors="ignore")))
    if unknown := [t for t in missing if t not in known]:
        from lm_eval.tasks import TaskManager

        indexed = set(TaskManager().all_tasks)
        unknown = [t for t in unknown if t not in indexed]
    return [f"unknown task {t!r} (not under evals/, not an lm-eval task)" for t in unknown]
