"""Bad inputs are refused before any work: `distillery run` and `validate` exit 2 with one line naming the field, the
file and the line, and leave no run folder and no MLflow store behind."""

from __future__ import annotations

import json
import shutil

import pytest

from distillery.demo.assets import TEACHER_DIR

from .conftest import REPO


def jsonl(tmp, name: str, lines: list[str] | bytes):
    path = tmp / name
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join(line + "\n" for line in lines))
    return f"data.source=jsonl|data.path={path}"


def model_dir(tmp, keep: tuple[str, ...], broken_config: bool = False):
    """A copy of the demo teacher's folder with only the files named in `keep` (a name, or a .suffix)."""
    path = tmp / "model"
    path.mkdir()
    for f in TEACHER_DIR.iterdir():
        if any(f.name == k or (k.startswith(".") and f.name.endswith(k)) for k in keep):
            shutil.copy(f, path / f.name)
    if broken_config:
        (path / "config.json").write_text("{not json")
    return path


GOOD = json.dumps({"prompt": "Ana has 2 pens.", "answer": "2"})
CASES = {
    # the data file
    "bad json line": (
        lambda t: jsonl(t, "d.jsonl", [GOOD, GOOD, "{", GOOD]),
        "pipelines.smoke.data.path: ",
        "line 3: not JSON",
    ),
    "not an object": (
        lambda t: jsonl(t, "d.jsonl", [GOOD, "[1, 2]"]),
        "data.path: ",
        "line 2: not a JSON object but list",
    ),
    "empty file": (lambda t: jsonl(t, "d.jsonl", []), "data.path: ", "no prompts"),
    "blank lines only": (lambda t: jsonl(t, "d.jsonl", ["", "  "]), "data.path: ", "no prompts"),
    "no prompt field": (
        lambda t: jsonl(t, "d.jsonl", [GOOD, json.dumps({"question": "x", "answer": "1"})]),
        "data.prompt_field: ",
        "line 2: no field 'prompt' (fields: question, answer)",
    ),
    "no answer field": (
        lambda t: jsonl(t, "d.jsonl", [json.dumps({"prompt": "x"})]),
        "data.answer_field: ",
        "line 1: no field 'answer'",
    ),
    "empty prompt": (
        lambda t: jsonl(t, "d.jsonl", [json.dumps({"prompt": " ", "answer": "1"})]),
        "data.prompt_field: ",
        "is empty",
    ),
    "not utf-8": (lambda t: jsonl(t, "d.jsonl", GOOD.encode() + b"\n\xff\xfe\n"), "data.path: ", "line 2: not UTF-8"),
    "data path is a folder": (lambda t: f"data.source=jsonl|data.path={t}", "data.path: ", "is a folder"),
    "no such data file": (
        lambda t: f"data.source=jsonl|data.path={t}/nope.jsonl",
        "pipelines.smoke.data.path: ",
        "does not exist",
    ),
    "jsonl without a path": (lambda t: "data.source=jsonl", "pipelines.smoke.data: ", "path is required"),
    "template names another field": (
        lambda t: "data.prompt_template=Question {promt}",
        "pipelines.smoke.data.prompt_template: ",
        "names {promt}; only {prompt}",
    ),
    "template does not parse": (
        lambda t: "data.prompt_template={prompt",
        "data.prompt_template: ",
        "not a format string",
    ),
    # model folders
    "empty student folder": (
        lambda t: f"student.path={model_dir(t, ())}",
        "pipelines.smoke.student.path: ",
        "no config.json",
    ),
    "student without weights": (
        lambda t: f"student.path={model_dir(t, ('config.json', 'tokenizer.json'))}",
        "student.path: ",
        "no weights",
    ),
    "student without tokenizer": (
        lambda t: f"student.path={model_dir(t, ('config.json', '.safetensors'))}",
        "student.path: ",
        "no tokenizer",
    ),
    "config.json not json": (
        lambda t: f"student.path={model_dir(t, ('.json', '.safetensors'), broken_config=True)}",
        "student.path: ",
        "config.json is not JSON",
    ),
    "student path is a file": (
        lambda t: f"student.path={TEACHER_DIR / 'config.json'}",
        "student.path: ",
        "is not a folder",
    ),
    "teacher folder without weights": (
        lambda t: f"teacher.path={model_dir(t, ('.json', '.jinja'))}",
        "pipelines.smoke.teacher.path: ",
        "no weights",
    ),
    "ensemble teacher without weights": (
        lambda t: f"generate.ensemble={{teachers: [{{path: {model_dir(t, ('.json', '.jinja'))}}}]}}",
        "pipelines.smoke.generate.ensemble.teachers[0].path: ",
        "no weights",
    ),
    "no such model folder": (lambda t: f"student.path={t}/nope", "pipelines.smoke.student.path: ", "does not exist"),
    "malformed hub id": (
        lambda t: "student.path=not/a/hub",
        "pipelines.smoke.student.path: ",
        "hub ids look like org/name",
    ),
    "unknown demo model": (
        lambda t: "student.path=demo:studnet",
        "pipelines.smoke.student.path: ",
        "unknown demo model",
    ),
    # eval tasks and --set values
    "unknown eval task": (
        lambda t: "evaluate.tasks=[demo_arithh]",
        "pipelines.smoke.evaluate.tasks: ",
        "unknown task 'demo_arithh'",
    ),
    "bad --set value": (lambda t: "train.epochs=abc", "pipelines.smoke.train.epochs: ", ""),
    "unknown --set key": (lambda t: "train.epoch=1", "pipelines.smoke.train.epoch: ", "unknown key"),
    "--set without =": (lambda t: "train.epochs", "--set train.epochs: expected key=value", ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_refuses_a_broken_input_in_one_line_with_exit_2_and_leaves_nothing(case, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    make, prefix, detail = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    sets = make(tmp_path).split("|")
    monkeypatch.chdir(work)  # the smoke pipeline writes runs/ and mlflow.db under the working folder
    argv = ["run", "smoke", "--file", str(REPO / "pipelines.yaml")]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    start = "--set" if prefix.startswith("--set") else "pipelines.smoke."
    assert len(err) == 1 and err[0].startswith(start) and prefix in err[0] and detail in err[0], err
    assert "Traceback" not in err[0]
    assert list(work.iterdir()) == []  # no run folder, no MLflow store


def test_validate_reads_inside_the_files_too(tmp_path, capsys):
    from flows.cli import main

    bad = tmp_path / "prompts.jsonl"
    bad.write_text(GOOD + "\n" + '{"prompt": "x", "answer": 1,}\n')
    text = (REPO / "pipelines.yaml").read_text()
    cfg = tmp_path / "pipelines.yaml"
    at = text.index("  smoke:\n")
    line = "    data: {source: demo, num_prompts: 64, seed: 0}\n"
    cfg.write_text(text[:at] + text[at:].replace(line, f"    data: {{source: jsonl, path: {bad}}}\n", 1))
    assert "source: jsonl" in cfg.read_text()  # the smoke pipeline now reads the broken file
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"pipelines.smoke.data.path: {bad} line 2: not JSON (Expecting property name enclosed in double "
        "quotes at column 29)"
    ]
    assert main(["validate", str(REPO / "pipelines.yaml")]) == 0


def test_the_flow_itself_refuses_before_its_mlflow_run(tmp_path, monkeypatch):
    """`prefect deployment run` reaches the flow without the CLI: it checks too, before any run exists."""
    from distillery.config import ConfigError
    from flows.distill import distill

    bad = tmp_path / "d.jsonl"
    bad.write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="pipelines.smoke.data.path: .* no prompts"):
        distill.fn("smoke", ["data.source=jsonl", f"data.path={bad}"], str(REPO / "pipelines.yaml"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
