"""Scale-out: the shipped accelerate configs load with accelerate's own parser, and `distillery train` trains under
`accelerate launch` with two processes (DDP over gloo on CPU), the model written once by process 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO
from .test_e2e import free_port

CONFIGS = REPO / "configs" / "accelerate"
EXPECTED = {  # file: (num_processes, distributed_type, on GPUs)
    "ddp-1gpu.yaml": (1, "NO", True),
    "ddp-2gpu.yaml": (2, "MULTI_GPU", True),
    "ddp-8gpu.yaml": (8, "MULTI_GPU", True),
    "fsdp-8gpu.yaml": (8, "FSDP", True),
    "deepspeed-zero3-8gpu.yaml": (8, "DEEPSPEED", True),
    "cpu-2proc.yaml": (2, "MULTI_GPU", False),  # torchrun's launcher; the processes find no GPU: gloo
}


def test_every_config_is_shipped_and_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config_from_file(str(CONFIGS / name))  # raises on unknown keys or a bad distributed_type
    procs, dist, gpu = EXPECTED[name]
    assert isinstance(cfg, ClusterConfig)
    assert cfg.num_processes == procs and cfg.distributed_type.value == dist and cfg.num_machines == 1
    assert cfg.use_cpu is not gpu
    if gpu:
        assert cfg.gpu_ids and cfg.mixed_precision == "bf16"
    # `accelerate launch` turns each fsdp_/deepspeed_config key into its own --option: every key must be one
    options = vars(launch_command_parser().parse_args(["x.py"]))
    for key in cfg.fsdp_config:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in options, key
    for key in cfg.deepspeed_config:
        assert key in options, key
    if dist == "FSDP":
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # finish() saves one plain model
    if dist == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 3 and cfg.deepspeed_config["zero3_save_16bit_model"]


def test_train_command_refuses_missing_traces(tmp_path, capsys):
    from flows.cli import main

    assert main(["train", "smoke", "--traces", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"--traces: no such file {tmp_path / 'nope.jsonl'}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"prompt": "q", "completion": "a"}\n{"prompt": "q2", "completion"\n', "line 2: not JSON"),
        ('{"prompt": "q", "completion": "a"}\n\n{"prompt": "q2"}\n', "line 3: no field 'completion'"),
        ("\n", "no traces"),
    ],
)
def test_train_command_refuses_bad_traces_before_any_work(tmp_path, capsys, content, expected):
    from flows.cli import main

    bad = tmp_path / "kept.jsonl"
    bad.write_text(content)
    assert main(["train", "smoke", "--traces", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"--traces: {bad}") and expected in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_under_accelerate_launch_two_cpu_processes(tmp_path, mlflow_uri):
    from distillery.demo import task

    traces = tmp_path / "kept.jsonl"
    with traces.open("w") as f:
        for i, p in enumerate(task.problems(seed=7, count=64)):
            f.write(json.dumps({**p.as_record(), "prompt_id": i}) + "\n")
    out = tmp_path / "model"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "cpu-2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "flows.cli",
        "train",
        "smoke",
        "--traces",
        str(traces),
        "--out",
        str(out),
        "--file",
        str(REPO / "pipelines.yaml"),
        "--set",
        "train.max_steps=4",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.logging_steps=1",
    ]
    # one thread per process: two processes on a 2-core box; the children find this checkout's modules
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "process 0 of 2 (MULTI_CPU, gloo" in log and "process 1 of 2 (MULTI_CPU, gloo" in log
    assert log.count("steps 4, final loss") == 1  # only process 0 reports (and saves)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["figures"]["steps"] == 4 and manifest["figures"]["world_size"] == 2
    assert manifest["method"] == "sft" and (out / "model.safetensors").stat().st_size > 0
    assert not list(tmp_path.glob(".model.tmp-*"))  # one writer: no second temp folder left behind

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == manifest["figures"]["params"]

    # one MLflow run, logged by process 0 alone: a loss point per step, not one per process
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and f"MLflow run {runs[0].info.run_id}" in log
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["distillery.entrypoint"] == "distillery train"
    assert run.data.params["method"] == "sft" and run.data.metrics["world_size"] == 2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["filtered:unknown"]  # traces name no teacher
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
