"""pipelines.yaml is parsed into typed models; a bad file is refused with one line naming the field, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.config import STAGES, ConfigError, load_file, load_pipeline, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_every_yaml_in_the_repo_is_valid():
    f = load_file(REPO / "pipelines.yaml")
    assert {"demo", "smoke", "r1-distill", "demo-kd", "demo-gkd"} <= set(f.pipelines)
    assert f.pipelines["demo-kd"].train.method == "logit_kd" and f.pipelines["demo-kd"].generate.logprobs > 0
    assert f.pipelines["demo-gkd"].train.method == "gkd"
    assert (
        f.pipelines["demo-onpolicy"].train.method == "on_policy"
        and f.pipelines["demo-onpolicy"].train.on_policy.sft_first
    )
    assert f.pipelines["demo"].stages == list(STAGES)
    r1 = f.pipelines["r1-distill"]
    assert r1.teacher.path.startswith("deepseek-ai/") and r1.generate.backend == "vllm"
    assert r1.train.lora is not None and r1.data.chat_template
    assert r1.evaluate.backend == "vllm" and r1.draft.distill is not None
    assert f.pipelines["demo-draft"].draft.distill.beta == 0.0  # forward KL, DistillSpec's choice for greedy
    for y in (REPO / "evals").rglob("*.yaml"):
        assert yaml.safe_load(y.read_text())["task"]


def bad_file(tmp_path, mutate) -> Path:
    data = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    mutate(data["pipelines"])
    out = tmp_path / "pipelines.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


CASES = [
    (lambda p: p["demo"]["train"].update(learning_rate=0), "pipelines.demo.train.learning_rate: must be > 0"),
    (lambda p: p["demo"]["train"].update(lr=0.1), "pipelines.demo.train.lr: unknown key"),
    (lambda p: p["demo"]["generate"].update(n="many"), "pipelines.demo.generate.n: "),
    (lambda p: p["demo"]["generate"].update(top_p=1.5), "pipelines.demo.generate.top_p: must be <= 1"),
    (lambda p: p["demo"].update(stages=["generate", "fliter"]), "pipelines.demo.stages.1: must be one of"),
    (
        lambda p: p["demo"].update(stages=["train"]),
        "pipelines.demo: stages: train.method 'sft' learns from the teacher's traces",
    ),
    (
        lambda p: p["demo"]["teacher"].update(path="./no/such/model"),
        "pipelines.demo.teacher.path: model path does not exist",
    ),
    (lambda p: p["demo"]["student"].update(path="demo:nope"), "pipelines.demo.student.path: unknown demo model"),
    (lambda p: p["demo"].pop("teacher"), "pipelines.demo.teacher: required key is missing"),
    (lambda p: p["smoke"]["evaluate"].update(limit=-1), "pipelines.smoke.evaluate.limit: must be > 0"),
    (lambda p: p["demo"]["generate"].update(temperature=0), "pipelines.demo.generate: n = 2 with temperature 0"),
    (lambda p: p["demo"].update(schedule={"cron": "61 * * * *"}), "pipelines.demo.schedule.cron: not a valid cron"),
    (
        lambda p: p["demo"].update(schedule={"cron": "0 3 * * *", "interval": 3600}),
        "pipelines.demo.schedule: set exactly one of cron and interval",
    ),
    (lambda p: p["demo"].update(schedule={}), "pipelines.demo.schedule: set exactly one of cron and interval"),
    (lambda p: p["demo"].update(schedule={"interval": 0}), "pipelines.demo.schedule.interval: must be > 0"),
    (
        lambda p: p["demo"].update(schedule={"cron": "0 3 * * *", "timezone": "Mars/Olympus"}),
        "pipelines.demo.schedule.timezone: unknown timezone 'Mars/Olympus'",
    ),
    (
        lambda p: p["demo"].update(schedule={"interval": 60, "overrides": ["train.epochs"]}),
        "pipelines.demo.schedule.overrides: 'train.epochs': expected key=value",
    ),
    (
        lambda p: p["demo"].update(schedule={"interval": 60, "overrides": ["train.epochs=-1"]}),
        "pipelines.demo.schedule.overrides: train.epochs: must be > 0",
    ),
    (
        lambda p: p["demo"].update(schedule={"interval": 60, "overrides": ["train.lr=0.1"]}),
        "pipelines.demo.schedule.overrides: train.lr: unknown key",
    ),
    (lambda p: p["demo"].update(schedule={"interval": 60, "oops": 1}), "pipelines.demo.schedule.oops: unknown key"),
    (lambda p: p["demo"].update(concurrency={"slots": 0}), "pipelines.demo.concurrency.slots: must be >= 1"),
    (
        lambda p: p["demo-onpolicy"]["train"]["on_policy"].update(teacher_server={"base_url": "http://x", "top_k": 4}),
        "pipelines.demo-onpolicy.train.on_policy: teacher_server.top_k: 4 with beta 1.0",
    ),
    (
        lambda p: p["demo-onpolicy"]["train"]["on_policy"].update(
            teacher_server={"base_url": "http://x"}, temperature=0.9
        ),
        "pipelines.demo-onpolicy.train.on_policy: temperature: 0.9 with teacher_server",
    ),
    (lambda p: p["demo"]["draft"].update(distill={"beta": 2}), "pipelines.demo.draft.distill.beta: must be <= 1"),
    (lambda p: p["demo"]["draft"].update(sample_temperature=0), "pipelines.demo.draft.sample_temperature: must be > 0"),
    (lambda p: p["demo"]["evaluate"].update(backend="sglang"), "pipelines.demo.evaluate.backend: must be one of"),
    (
        lambda p: p["demo"]["evaluate"].update(tensor_parallel_size=0),
        "pipelines.demo.evaluate.tensor_parallel_size: must be >= 1",
    ),
    (
        lambda p: p["smoke"].update(concurrency={"slots": 2}),
        "pipelines.smoke.concurrency.slots: limit 'distillery-gpu' has 1 slot(s) in pipelines.demo",
    ),
]


@pytest.mark.parametrize("mutate,expected", CASES)
def test_bad_file_names_the_field(tmp_path, mutate, expected):
    path = bad_file(tmp_path, mutate)
    with pytest.raises(ConfigError) as e:
        load_file(path)
    assert any(line.startswith(expected) for line in e.value.lines), e.value.lines


def test_cli_validate_exit_codes(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", str(REPO / "pipelines.yaml")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    path = bad_file(tmp_path, CASES[0][0])
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["pipelines.demo.train.learning_rate: must be > 0"]


def test_cli_run_refuses_before_any_work(tmp_path):
    """A bad --set or an unknown pipeline stops `run` with exit 2 before a Prefect or MLflow run exists."""
    for args, expected in (
        (["run", "demo", "--set", "train.epochs=-1"], "pipelines.demo.train.epochs: must be > 0"),
        (["run", "nope"], "pipelines.nope: unknown pipeline"),
        (["run", "demo", "--set", "oops"], "--set oops: expected key=value"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args, "--file", str(REPO / "pipelines.yaml")],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().startswith(expected), r.stderr
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_file(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("pipelines: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_file(tmp_path / "broken.yaml")


def test_overrides_are_typed():
    cfg = load_pipeline(
        REPO / "pipelines.yaml",
        "demo",
        parse_overrides(["train.learning_rate=1e-4", "quantize.formats=[nf4]", "train.bf16=true"]),
    )
    assert cfg.train.learning_rate == 1e-4 and cfg.quantize.formats == ["nf4"] and cfg.train.bf16 is True


def test_schedule_and_concurrency_sections(tmp_path):
    def mutate(p):
        p["demo"]["schedule"] = {
            "cron": "0 3 * * 1-5",
            "timezone": "Europe/Berlin",
            "active": False,
            "overrides": ["train.epochs=1", "quantize.formats=[nf4]"],
        }
        p["smoke"]["schedule"] = {"interval": 900}
        p["smoke"]["concurrency"] = {"enabled": False}

    data = yaml.safe_load(bad_file(tmp_path, mutate).read_text())
    data["concurrency"] = {"limit_name": "lab-gpus", "slots": 2}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(data))
    f = load_file(tmp_path / "pipelines.yaml")
    demo, smoke = f.pipelines["demo"], f.pipelines["smoke"]
    assert demo.schedule.cron == "0 3 * * 1-5" and demo.schedule.active is False
    assert demo.schedule.overrides == ["train.epochs=1", "quantize.formats=[nf4]"]
    assert smoke.schedule.interval == 900 and smoke.schedule.timezone == "UTC" and smoke.schedule.active
    # the file-level section is every pipeline's default; a pipeline's own section wins
    assert (demo.concurrency.limit_name, demo.concurrency.slots, demo.concurrency.enabled) == ("lab-gpus", 2, True)
    assert smoke.concurrency.enabled is False
    assert load_pipeline(tmp_path / "pipelines.yaml", "demo").concurrency.limit_name == "lab-gpus"
    # the shipped file: no schedules, the default limit
    shipped = load_file(REPO / "pipelines.yaml").pipelines["smoke"]
    assert shipped.concurrency.limit_name == "distillery-gpu" and shipped.concurrency.slots == 1


def test_deploy_refuses_without_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "deploy",
            "--work-pool",
            "local",
            "--file",
            str(REPO / "pipelines.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("PREFECT_API_URL is not set")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "deploy",
            "--work-pool",
            "local",
            "--pipelines",
            "nope",
            "--file",
            str(REPO / "pipelines.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and r.stderr.startswith("--pipelines: unknown pipeline 'nope'")


@pytest.mark.parametrize("cmd", [[], ["validate"], ["run"], ["serve"], ["deploy"], ["list"]])
def test_every_command_has_help(cmd):
    r = subprocess.run([sys.executable, "-m", "flows.cli", *cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: distillery" in r.stdout


def test_r1_distill_ships_a_nightly_schedule_that_starts_paused():
    from flows.deploy import schedules_for

    cfg = load_pipeline(REPO / "pipelines.yaml", "r1-distill")
    (nightly,) = schedules_for(cfg)
    assert (nightly.cron, nightly.timezone, nightly.active) == ("0 2 * * *", "UTC", False)
