"""Each stage's plain function on tiny local models: real TRL, real bitsandbytes, real lm-eval, no Prefect."""

from __future__ import annotations

import json
import math

import pytest

from distillery.artifacts import MANIFEST, read_jsonl
from distillery.checks import DistillationCheckError, check_pad_not_eos, check_same_vocab
from distillery.config import EvaluateConfig, PruneConfig, QuantizeConfig, load_pipeline, parse_overrides
from distillery.methods import sft
from distillery.training import SFTParams

from .conftest import REPO


@pytest.fixture(scope="module")
def trained(tiny_student, gold_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "model"
    figures = sft(
        str(tiny_student),
        gold_records,
        out,
        SFTParams(max_steps=6, batch_size=16, learning_rate=3e-3, logging_steps=2, max_length=128),
    )
    return out, figures


def test_sft_trains_on_completions_and_saves_atomically(trained, tiny_student):
    out, figures = trained
    manifest = json.loads((out / MANIFEST).read_text())
    losses = [h["loss"] for h in manifest["loss_history"] if "loss" in h]
    assert figures["steps"] == 6 and len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # it learns
    assert (out / "model.safetensors").exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert figures["tokens_seen"] > 0 and figures["trainable_params"] > 250_000  # the whole 0.28M student


def test_sft_masks_the_prompt(tiny_student, tokenizer):
    """TRL's labels are -100 on every prompt and pad token and cover the completion + eos."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rec = {"prompt": "Question: Mia has 2 pens.\nAnswer:", "completion": " <think>2=2.</think> The answer is 2."}
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_student),
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([rec, {**rec, "completion": " The answer is 2."}]),
        args=SFTConfig(output_dir="/tmp/x", use_cpu=True, report_to=[], completion_only_loss=True),
    )
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    n_prompt = len(tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    assert (labels[:n_prompt] == -100).all()
    kept = ids[labels != -100].tolist()
    assert tokenizer.decode(kept) == rec["completion"] + tokenizer.eos_token
    assert (batch["labels"][1][batch["input_ids"][1] == tokenizer.pad_token_id] == -100).all()


def test_refuses_pad_equal_to_eos(tiny_student, gold_records, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_student)
    tok.pad_token = tok.eos_token
    with pytest.raises(DistillationCheckError, match="pad token equals eos"):
        check_pad_not_eos(tok, "student")
    tok.save_pretrained(tiny_student.parent / "padeos")
    import shutil

    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_student / f, tiny_student.parent / "padeos" / f)
    with pytest.raises(DistillationCheckError, match="pad token equals eos"):
        sft(str(tiny_student.parent / "padeos"), gold_records, tmp_path / "o", SFTParams(max_steps=1))
    assert not (tmp_path / "o").exists()


def test_refuses_different_vocab(tokenizer):
    from distillery.demo.assets import build_tokenizer

    other = build_tokenizer(["completely different corpus"] * 20)
    with pytest.raises(DistillationCheckError, match="vocabularies differ"):
        check_same_vocab(tokenizer, other, "teacher vs student")
    check_same_vocab(tokenizer, tokenizer, "same")


def test_lora_trains_and_merges(tiny_student, gold_records, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    figures = sft(str(tiny_student), gold_records, out, SFTParams(max_steps=2, batch_size=8, lora={"r": 4, "alpha": 8}))
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_student).parameters())
    assert figures["trainable_params"] < base / 10
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain model, no adapter files needed
    assert sum(p.numel() for p in merged.parameters()) == base and not (out / "adapter_config.json").exists()


def test_depth_pruning_drops_least_important_layer(trained, gold_records, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.prune import prune

    src, _ = trained
    texts = [r["prompt"] + r["completion"] for r in gold_records]
    res = prune(str(src), texts, PruneConfig(drop_layers=2, calibration_samples=16), tmp_path / "pruned")
    imp = res["importance"]
    assert len(imp) == 4 and all(v >= 0 for v in imp)
    assert res["dropped"] == sorted(sorted(range(4), key=lambda i: imp[i])[:2])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    out = model.generate(
        **tok(["Question: Tom has 3 pens.\nAnswer:"], return_tensors="pt", add_special_tokens=False),
        max_new_tokens=5,
        do_sample=False,
    )  # the KV cache indices still line up
    assert out.shape[1] > 5
    assert res["figures"]["params_after"] < res["figures"]["params_before"]


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantize_saves_reloads_and_shrinks(trained, tmp_path, fmt):
    from tasks.quantize import quantize

    src, _ = trained
    res = quantize(str(src), fmt, QuantizeConfig(), tmp_path / fmt)
    f = res["figures"]
    assert f["reload_max_abs_diff"] <= 1e-3
    assert f["memory_bytes"] < f["full_precision_bytes"]
    assert f["peak_bytes"] > f["memory_bytes"]  # loading and a forward pass need at least the weights
    cfg = json.loads((tmp_path / fmt / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_8bit" if fmt == "int8" else "load_in_4bit"] is True
    assert (tmp_path / fmt / "model.safetensors").exists()


def test_peak_probe_measures_each_model_as_a_fresh_process_would(trained):
    """One probe process, a forked child per model: the larger teacher peaks higher than the student, and each
    figure is the one a process of its own measures (within 10%: allocator noise), whatever was measured before."""
    from distillery.demo.assets import TEACHER_DIR
    from tasks.quantize import PeakProbe, peak_memory

    src, _ = trained
    with PeakProbe() as probe:
        shared = [probe(TEACHER_DIR), probe(src), probe(TEACHER_DIR)]
    alone = [peak_memory(TEACHER_DIR), peak_memory(src)]
    assert shared[0] > shared[1] > 0
    assert shared[0] == pytest.approx(alone[0], rel=0.1) and shared[2] == pytest.approx(alone[0], rel=0.1)
    assert shared[1] == pytest.approx(alone[1], rel=0.1)
    with PeakProbe() as probe, pytest.raises(RuntimeError, match="peak-memory probe of /no/such/model failed"):
        probe("/no/such/model")


def test_lm_eval_on_local_task(tmp_path):
    """Real lm-eval, local task and data, the demo teacher: accuracy with stderr, throughput, memory."""
    from distillery.demo.assets import TEACHER_DIR
    from tasks.evaluate import evaluate_model, local_task_dir

    cfg = EvaluateConfig(tasks=["demo_arith"], limit=16, batch_size=16, max_gen_toks=96, throughput_new_tokens=8)
    res = evaluate_model(str(TEACHER_DIR), cfg, local_task_dir(cfg.tasks), ["Question: Ana has 2 pens.\nAnswer:"] * 2)
    f = res["figures"]
    assert res["tasks"]["demo_arith"]["n"] == 16
    assert 0.5 <= f["accuracy"] <= 1.0 and f["accuracy_stderr"] is not None  # the teacher can do the task
    assert f["tokens_per_s"] > 0 and f["memory_bytes"] > 0 and f["params"] > 1_000_000
    assert res["samples"]["demo_arith"][0]["response"]


def test_generate_transformers_backend(tmp_path):
    from tasks.generate import generate

    cfg = load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides(["data.num_prompts=4", "generate.n=2"]))
    res = generate(cfg, tmp_path / "gen")
    rows = read_jsonl(res["path"])
    assert len(rows) == 8 and {r["sample"] for r in rows} == {0, 1}
    assert all(r["teacher"].startswith("demo:teacher") and r["sampling"]["n"] == 2 for r in rows)
    assert res["figures"]["generated_tokens"] == sum(r["num_tokens"] for r in rows)
    assert json.loads((tmp_path / "gen" / MANIFEST).read_text())["kind"] == "traces"


def test_heldout_perplexity_tells_the_teacher_from_a_random_student(tiny_student, gold_records):
    """Perplexity of completion tokens only: the teacher predicts gold traces far better than a random init."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.demo.assets import TEACHER_DIR
    from tasks.evaluate import perplexity

    rows = gold_records[:16]
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    teacher = perplexity(AutoModelForCausalLM.from_pretrained(TEACHER_DIR).eval(), tok, rows)
    student = perplexity(AutoModelForCausalLM.from_pretrained(tiny_student).eval(), tok, rows, batch_size=5)
    assert 1.0 <= teacher < 1.5 and student > 100  # a random init is near-uniform over 512 tokens


def test_filter_holds_out_whole_prompts_for_perplexity(tmp_path):
    from distillery.artifacts import read_jsonl, write_jsonl
    from tasks.filter import run_filter

    rows = [
        {**r, "prompt_id": f"p{i}", "sample": 0, "num_tokens": 20, "finish_reason": "stop", "prompt_text": r["prompt"]}
        for i, r in enumerate(_problems(6))
    ]
    write_jsonl(tmp_path / "traces.jsonl", rows)
    cfg = load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides(["filter.holdout_prompts=2"]))
    res = run_filter(cfg, tmp_path / "traces.jsonl", tmp_path / "filter")
    kept, held = read_jsonl(res["path"]), read_jsonl(res["heldout"])
    assert [r["prompt_id"] for r in held] == ["p4", "p5"]
    assert {r["prompt_id"] for r in kept} == {"p0", "p1", "p2", "p3"}
    assert res["report"]["heldout"] == {"prompts": 2, "traces": 2}


def _problems(n):
    from distillery.demo import task

    return [p.as_record() for p in task.problems(seed=3, count=n)]


def test_lineage_is_skipped_when_tracking_is_off(tmp_path):
    """`distillery run --no-track`: the stages get a NullRun, whose every attribute is a no-op callable."""
    from distillery.lineage import log_traces_input
    from distillery.tracking import NullTracker

    path = tmp_path / "traces.jsonl"
    path.write_text('{"prompt": "Q", "completion": " A", "teacher": "t"}\n')
    with NullTracker().stage("generate", None) as run:
        assert log_traces_input(run, path, "generated", context="generated") is None


def test_lineage_survives_another_run_inserting_the_same_dataset_first(tmp_path, mlflow_uri):
    """Two runs logging identical traces at once: MLflow's check-then-insert loses the race with a unique-key
    error for one of them; that run links the now existing dataset instead of failing its stage."""
    from mlflow.exceptions import MlflowException

    from distillery.lineage import log_traces_input
    from distillery.tracking import Tracker

    path = tmp_path / "traces.jsonl"
    path.write_text('{"prompt": "Q", "completion": " A", "teacher": "t"}\n')
    tracker = Tracker("lineage", mlflow_uri)
    first, second = tracker.start("a"), tracker.start("b")
    log_traces_input(first, path, "filtered", context="training")
    real, calls = second.client.log_inputs, []

    def racing(run_id, datasets=None, **kw):  # the other run's insert landed between lookup and insert
        calls.append(run_id)
        if len(calls) == 1:
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                "datasets.name, datasets.digest"
            )
        return real(run_id, datasets=datasets, **kw)

    second.client.log_inputs = racing
    log_traces_input(second, path, "filtered", context="training")
    assert len(calls) == 2
    inputs = tracker.client.get_run(second.run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["filtered:t"]

    def broken(run_id, datasets=None, **kw):  # any other error is not retried
        raise MlflowException("connection reset")

    second.client.log_inputs = broken
    try:
        with pytest.raises(MlflowException, match="connection reset"):
            log_traces_input(second, path, "filtered", context="training")
    finally:
        second.client.log_inputs = real
