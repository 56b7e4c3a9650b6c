"""The training methods beyond plain SFT: hard labels, QLoRA, DPO from judged pairs, and the NaN stop."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from distillery.config import DPOSection, load_pipeline, parse_overrides
from distillery.demo.assets import TEACHER_DIR
from distillery.methods import dpo, sft
from distillery.preferences import preference_pairs
from distillery.training import SFTParams, hard_label_records

from .conftest import REPO

PARAMS = dict(batch_size=8, learning_rate=3e-3, logging_steps=1, max_length=128)


def regex_verifier():
    from distillery.config import FilterConfig
    from distillery.verify import VERIFIERS

    cfg = FilterConfig()
    return lambda text, ref: VERIFIERS["regex"](text, ref, cfg)


def test_hard_labels_are_the_reference_answers_once_per_prompt():
    rows = [
        {"prompt_id": "a", "prompt": "Q1\nAnswer:", "answer": "7", "completion": " <think>3+4=7.</think> x"},
        {"prompt_id": "a", "prompt": "Q1\nAnswer:", "answer": "7", "completion": " <think>4+3=7.</think> y"},
        {"prompt_id": "b", "prompt": "Q2\nAnswer:", "answer": "-2", "completion": " z"},
    ]
    recs = hard_label_records(rows, " The answer is {answer}.", chat=False)
    assert recs == [
        {"prompt": "Q1\nAnswer:", "completion": " The answer is 7."},
        {"prompt": "Q2\nAnswer:", "completion": " The answer is -2."},
    ]
    chat = hard_label_records(rows[:1], "{answer}", chat=True)
    assert chat[0]["completion"] == [{"role": "assistant", "content": "7"}]


def test_hard_method_needs_no_teacher_stages():
    cfg = load_pipeline(
        REPO / "pipelines.yaml",
        "smoke",
        parse_overrides(
            ["stages=[train,evaluate]", "train.method=hard", "train.hard_label_template= The answer is {answer}."]
        ),
    )
    assert cfg.train.method == "hard" and "generate" not in cfg.stages
    from distillery.config import ConfigError

    with pytest.raises(ConfigError, match="needs stage 'filter'"):
        load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides(["stages=[train,evaluate]"]))
    with pytest.raises(ConfigError, match="hard_label_template: must contain"):
        load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides(["train.hard_label_template=x"]))


def test_qlora_trains_adapters_on_a_quantized_base_and_ships_a_plain_model(tiny_student, gold_records, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    figures = sft(
        str(tiny_student),
        gold_records[:32],
        out,
        SFTParams(max_steps=3, **PARAMS, lora={"r": 4, "alpha": 8, "quantize": "nf4"}),
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_student)
    assert figures["trainable_params"] < base.num_parameters() / 5
    assert figures["merge_max_abs_logit_diff"] < 1e-2  # the merged model is the one that was trained
    shipped = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert shipped.num_parameters() == base.num_parameters() and not (out / "adapter_config.json").exists()
    assert all(p.dtype == torch.float32 for p in shipped.parameters())
    # the base under the adapter went through the low-bit format: the shipped weights are not the original ones
    assert not torch.equal(shipped.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_verifier_pairs_a_correct_sample_against_a_wrong_one():
    d = DPOSection(samples=4, pairs_per_prompt=2)
    prompts = [{"prompt_id": "p1", "prompt": "Q1", "answer": "9"}, {"prompt_id": "p2", "prompt": "Q2", "answer": "3"}]
    right, wrong = " <think>4+5=9.</think> The answer is 9.", " <think>4+5=8.</think> The answer is 8."
    samples = [[wrong, right, wrong, " The answer is 1."], [" The answer is 3."] * 4]  # p2: all alike, no pair
    pairs, stats = preference_pairs(prompts, samples, d, regex_verifier())
    assert [(p["prompt_id"], p["chosen"]) for p in pairs] == [("p1", right)]  # one correct sample: one pair
    assert pairs[0]["rejected"] in (wrong, " The answer is 1.")
    assert stats == {
        "dpo_prompts": 2,
        "dpo_samples": 8,
        "dpo_pairs": 1,
        "dpo_prompts_paired": 1,
        "dpo_sample_pass_rate": 5 / 8,
    }


def test_teacher_judge_prefers_what_the_teacher_would_say(gold_records):
    """The demo teacher (99.5% accurate) scores its own kind of trace above a corrupted one."""
    d = DPOSection(judge="teacher", samples=2, min_margin=0.05)
    rows = [{**r, "prompt_id": str(i)} for i, r in enumerate(gold_records[:8])]
    samples = [[r["completion"].replace("The answer is", "The answer is 1"), r["completion"]] for r in rows]
    pairs, stats = preference_pairs(rows, samples, d, regex_verifier(), str(TEACHER_DIR))
    assert len(pairs) == 8 and stats["dpo_sample_pass_rate"] == 0.5
    assert all(p["chosen"] == r["completion"] and p["margin"] >= 0.05 for p, r in zip(pairs, rows, strict=True))


def test_dpo_from_teacher_judged_student_samples(tiny_student, gold_records, tmp_path):
    """The random-init student samples; the teacher judges; TRL's DPOTrainer moves the student toward the chosen
    samples (reward margin > 0 after a few steps)."""
    rows = [{**r, "prompt_id": str(i)} for i, r in enumerate(gold_records[:16])]
    out = tmp_path / "dpo"
    d = DPOSection(judge="teacher", sft_first=False, samples=4, max_new_tokens=24, beta=0.1, learning_rate=1e-3)
    figures = dpo(
        str(tiny_student),
        str(TEACHER_DIR),
        rows,
        out,
        SFTParams(max_steps=4, **PARAMS),
        d,
        regex_verifier(),
        chat=False,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert figures["dpo_pairs"] >= 8 and figures["steps"] == 4 and manifest["method"] == "dpo"
    assert figures["dpo_reward_margin"] > 0
    assert all(math.isfinite(h["loss"]) for h in manifest["loss_history"] if "loss" in h)


def test_dpo_refuses_when_no_sample_can_be_told_apart(tiny_student, gold_records, tmp_path):
    """A random-init student never answers right: the verifier finds nothing to prefer."""
    rows = [{**r, "prompt_id": str(i)} for i, r in enumerate(gold_records[:4])]
    d = DPOSection(judge="verifier", sft_first=False, samples=2, max_new_tokens=8)
    with pytest.raises(ValueError, match="no preference pairs"):
        dpo(
            str(tiny_student),
            str(TEACHER_DIR),
            rows,
            tmp_path / "o",
            SFTParams(max_steps=1, **PARAMS),
            d,
            regex_verifier(),
            chat=False,
        )
    assert not (tmp_path / "o").exists()


def test_nan_loss_stops_the_train_stage_and_fails_its_mlflow_run(tiny_student, gold_records, tmp_path, mlflow_uri):
    """A corrupt student checkpoint (one NaN weight) makes the first loss NaN: the train stage raises at that step,
    its MLflow run ends FAILED, and no model is left where the next stage would look."""
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    from distillery.results import ModelArtifact, Traces
    from distillery.runtime import RunContext
    from distillery.tracking import Tracker
    from tasks.train import train_task

    bad = tmp_path / "nan-student"
    shutil.copytree(tiny_student, bad)
    weights = load_file(bad / "model.safetensors")
    weights["lm_head.weight"][5, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    traces = tmp_path / "kept.jsonl"
    traces.write_text("".join(json.dumps({**r, "prompt_id": str(i)}) + "\n" for i, r in enumerate(gold_records)))

    cfg = load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides(["train.max_steps=3"]))
    tracker = Tracker("nan-test", mlflow_uri)
    parent = tracker.start("smoke")
    ctx = RunContext(
        pipeline="smoke",
        run_dir=str(tmp_path / "run"),
        parent_run_id=parent.run_id,
        experiment="nan-test",
        tracking_uri=mlflow_uri,
    )
    with pytest.raises(FloatingPointError, match=r"train: non-finite loss \(nan\) at step 0"):
        train_task.fn(cfg, ctx, Traces(str(traces), "filter"), ModelArtifact("student", str(bad), "init"))
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train", "FAILED")]
    assert not Path(ctx.stage_dir("train")).exists()
    assert torch.isnan(weights["lm_head.weight"]).any()  # the test really fed a NaN
