"""Logit distillation from stored top-k teacher logprobs: exact alignment, a student that learns, NaN refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distillery.artifacts import read_jsonl
from distillery.config import load_pipeline, parse_overrides
from distillery.kd import build_examples, load_logprobs, make_trainer

from .conftest import REPO, run_pipeline_cli


@pytest.fixture(scope="module")
def greedy_traces(tmp_path_factory):
    from tasks.generate import generate

    tmp = tmp_path_factory.mktemp("kd")
    cfg = load_pipeline(
        REPO / "pipelines.yaml",
        "smoke",
        parse_overrides(
            [
                f"output_dir={tmp / 'runs'}",
                f"generate.cache_dir={tmp / 'cache'}",
                "data.num_prompts=32",
                "generate.n=1",
                "generate.temperature=0",
                "generate.logprobs=8",
            ]
        ),
    )
    res = generate(cfg, tmp / "gen")
    return read_jsonl(Path(res["path"])), load_logprobs(tmp / "gen" / "logprobs.parquet")


def test_examples_align_teacher_topk_with_the_trained_tokens(greedy_traces, tokenizer):
    rows, lps = greedy_traces
    examples = build_examples(rows, lps, tokenizer, max_length=256)
    assert len(examples) == len(rows)
    for ex in examples:
        comp = [i for i, lab in enumerate(ex["labels"]) if lab != -100]
        assert comp[0] == ex["prompt_length"] and len(ex["top_ids"]) == len(ex["input_ids"])
        # greedy generation: the sampled token is the teacher's top-1 at every completion position
        assert all(ex["top_ids"][i][0] == ex["labels"][i] for i in comp)
        assert ex["labels"][comp[-1]] == tokenizer.eos_token_id  # the student is taught to stop


def _train(examples, student, tmp_path, steps=40, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=3e-3,
        use_cpu=True,
        report_to=[],
        logging_steps=1 if steps <= 3 else 10,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = make_trainer(
        model,
        tok,
        examples,
        args,
        **{"temperature": 2.0, "alpha": 1.0, "divergence": "forward_kl", "beta": 0.5, "tail": "bucket", **kw},
    )
    trainer.train()
    return trainer


def test_logit_kd_student_learns_the_teacher_distribution(greedy_traces, tokenizer, tiny_student, tmp_path):
    rows, lps = greedy_traces
    examples = build_examples(rows, lps, tokenizer, max_length=256)
    trainer = _train(examples, tiny_student, tmp_path, steps=60)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    assert {"kd_loss", "ce_loss"} <= set(logs[-1])


def test_without_t2_the_soft_term_is_divided_by_t_squared(greedy_traces, tokenizer, tiny_student, tmp_path):
    """scale_t2=false (the temperature experiment's control) logs the soft term / T² of the same first step."""
    rows, lps = greedy_traces
    examples = build_examples(rows, lps, tokenizer, max_length=256)[:8]
    first = {}
    for scale in (True, False):
        trainer = _train(examples, tiny_student, tmp_path, steps=1, temperature=4.0, scale_t2=scale)
        first[scale] = next(h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h)
    assert first[False] == pytest.approx(first[True] / 16, rel=1e-4)


def test_chunked_training_is_the_whole_batch_training(greedy_traces, tokenizer, tiny_student, tmp_path):
    """kd.chunk_size > 0 (the default at 32k+ vocabularies) builds the output layer's logits a few positions at a
    time from the model's last hidden states: the same losses, step after step, as the whole batch's logits."""
    rows, lps = greedy_traces
    examples = build_examples(rows, lps, tokenizer, max_length=256)[:16]
    curves = {}
    for chunk in (0, 37):
        trainer = _train(examples, tiny_student, tmp_path, steps=3, alpha=0.5, chunk_size=chunk)
        curves[chunk] = [(h["kd_loss"], h["ce_loss"]) for h in trainer.state.log_history if "loss" in h]
    assert len(curves[0]) == 3
    for whole, chunked in zip(curves[0], curves[37], strict=True):
        assert chunked == pytest.approx(whole, rel=1e-4)


def test_nan_teacher_logprobs_stop_training(greedy_traces, tokenizer, tiny_student, tmp_path):
    rows, lps = greedy_traces
    examples = build_examples(rows, lps, tokenizer, max_length=256)
    for ex in examples:
        for i, lab in enumerate(ex["labels"]):
            if lab != -100:
                ex["top_logprobs"][i] = [float("nan")] * len(ex["top_logprobs"][i])
    with pytest.raises(FloatingPointError, match="distillation loss is nan"):
        _train(examples, tiny_student, tmp_path, steps=2)


def test_logit_kd_needs_stored_logprobs():
    from distillery.config import ConfigError

    with pytest.raises(ConfigError, match="logit_kd needs the teacher's top-k"):
        load_pipeline(REPO / "pipelines.yaml", "demo-kd", parse_overrides(["generate.logprobs=0"]))


@pytest.mark.slow
def test_gkd_on_policy_steps_with_the_live_teacher(tiny_student, gold_records, tmp_path):
    """TRL's GKDTrainer, on-policy half the time, JSD beta 0.5, the demo teacher frozen: a few real steps."""
    import json
    import math

    from distillery.config import GKDSection
    from distillery.demo.assets import TEACHER_DIR
    from distillery.methods import gkd
    from distillery.training import SFTParams

    out = tmp_path / "gkd"
    figures = gkd(
        str(tiny_student),
        str(TEACHER_DIR),
        gold_records[:32],
        out,
        SFTParams(max_steps=4, batch_size=8, learning_rate=3e-3, logging_steps=1, max_length=128),
        GKDSection(lmbda=0.5, beta=0.5, max_new_tokens=16),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    losses = [h["loss"] for h in manifest["loss_history"] if "loss" in h]
    assert figures["steps"] == 4 and len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    assert manifest["method"] == "gkd" and (out / "model.safetensors").exists()


def _on_policy(student, records, out, **section):
    from distillery.config import OnPolicySection
    from distillery.demo.assets import TEACHER_DIR
    from distillery.methods import on_policy
    from distillery.training import SFTParams

    params = SFTParams(max_steps=4, batch_size=8, learning_rate=3e-3, logging_steps=1, max_length=128)
    cfg = OnPolicySection(**{"sft_first": False, "max_new_tokens": 16, "max_steps": 3, **section})
    return on_policy(str(student), str(TEACHER_DIR), records, out, params, cfg)


def test_demo_onpolicy_trains_sft_then_on_the_students_own_rollouts(tiny_student, gold_records, tmp_path):
    """demo-onpolicy's train settings, shrunk: SFT steps, then TRL's DistillationTrainer (reverse KL, transformers
    rollouts on CPU) from that student against the frozen demo teacher: a positive finite loss at each step, the
    student saved with the rollouts' settings in its manifest, both phases counted."""
    import json
    import math

    from distillery.artifacts import write_jsonl
    from distillery.methods import run_method

    sets = [
        "train.max_steps=2",
        "train.batch_size=8",
        "train.logging_steps=1",
        "train.on_policy.max_steps=3",
        "train.on_policy.max_new_tokens=16",
    ]
    cfg = load_pipeline(REPO / "pipelines.yaml", "demo-onpolicy", parse_overrides(sets))
    write_jsonl(tmp_path / "kept.jsonl", gold_records[:32])
    out = tmp_path / "on-policy"
    figures = run_method(cfg, str(tiny_student), str(tmp_path / "kept.jsonl"), None, out)
    manifest = json.loads((out / "manifest.json").read_text())
    losses = [h["loss"] for h in manifest["loss_history"] if "loss" in h]
    assert figures["steps"] == 3 and len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert manifest["method"] == "on_policy" and manifest["on_policy"]["beta"] == 1.0
    assert manifest["on_policy"]["vllm"] is False and (out / "model.safetensors").exists()
    assert figures["sft_steps"] == 2 and figures["total_steps"] == 5
    assert manifest["base"] == str(tiny_student) and (tmp_path / "on-policy-sft" / "manifest.json").is_file()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_on_policy_loss_is_zero_when_the_student_is_the_teacher(gold_records, tmp_path, beta):
    """The exact form at its fixed point: a student that is a copy of the teacher has divergence 0 from it on its
    own samples, whatever beta and temperature (a teacher scored with dropout, grads or another temperature than the
    student would not be)."""
    import json

    from distillery.demo.assets import TEACHER_DIR

    out = tmp_path / "self"
    _on_policy(TEACHER_DIR, gold_records[:16], out, beta=beta, temperature=2.0, learning_rate=1e-9, max_steps=2)
    losses = [h["loss"] for h in json.loads((out / "manifest.json").read_text())["loss_history"] if "loss" in h]
    assert len(losses) == 2 and all(abs(x) < 1e-5 for x in losses), losses


def test_on_policy_vllm_rollouts_need_a_gpu(tiny_student, gold_records, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(ValueError, match="train.on_policy.generation: vllm rollouts run colocated on a GPU"):
        _on_policy(tiny_student, gold_records[:8], tmp_path / "x", generation="vllm")


def test_a_models_own_rescored_topk_are_its_distribution_at_the_traces_tokens(greedy_traces, tokenizer, tiny_student):
    """topk_logprobs (a teacher assistant's soft targets, bench/methods.py ^TARGETS) is the model's log-softmax at
    the position before each completion token, best first; a copy of the model pays ≈ 0 on them at every T."""
    import torch
    from transformers import AutoModelForCausalLM

    from distillery.losses import topk_kd
    from distillery.scoring import topk_logprobs

    rows, lps = greedy_traces
    rows = rows[:6]
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    prompts = [tokenizer(r["prompt_text"], add_special_tokens=False)["input_ids"] for r in rows]
    comps = [list(lps[(r["prompt_id"], r["sample"])]["token_ids"]) for r in rows]
    scored = topk_logprobs(model, prompts, comps, k=8, pad_id=tokenizer.pad_token_id, batch_size=4)
    for p, c, s in zip(prompts, comps, scored, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
        full = logits.float().log_softmax(-1)
        assert s["token_ids"] == c and len(s["top_ids"]) == len(c)
        assert torch.allclose(
            torch.tensor(s["token_logprobs"]), full.gather(-1, torch.tensor(c)[:, None])[:, 0], atol=1e-4
        )  # alone, unpadded: the same numbers as in a padded batch
        top = full.topk(8, dim=-1)
        assert s["top_ids"] == top.indices.tolist()
        for t in (1.0, 2.0, 4.0):
            loss = topk_kd(logits[None], torch.tensor([s["top_ids"]]), torch.tensor([s["top_logprobs"]]), t)
            assert float(loss) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="empty prompt"):
        topk_logprobs(model, [[]], [[5]], k=2, pad_id=tokenizer.pad_token_id)


def test_kept_traces_alone_lead_to_the_teachers_logprobs(tmp_path):
    """`distillery train --traces run/filter/kept.jsonl` with logit_kd: the logprobs are in the generate folder the
    filter's manifest names as its source."""
    import json

    from distillery.methods import generated_dir

    gen, filt = tmp_path / "generate", tmp_path / "filter"
    gen.mkdir(), filt.mkdir()
    (gen / "logprobs.parquet").write_bytes(b"")
    (filt / "manifest.json").write_text(json.dumps({"source": str(gen / "traces.jsonl")}))
    assert generated_dir(filt / "kept.jsonl", None) == gen
    assert generated_dir(filt / "kept.jsonl", str(tmp_path / "elsewhere" / "traces.jsonl")) == tmp_path / "elsewhere"
    assert generated_dir(gen / "traces.jsonl", None) == gen  # generated traces given directly


def _feature(student, records, out, kd=None, **feat):
    from distillery.config import FeatureSection, KDConfig
    from distillery.demo.assets import TEACHER_DIR
    from distillery.methods import feature
    from distillery.training import SFTParams

    params = SFTParams(max_steps=feat.pop("steps", 3), batch_size=8, learning_rate=feat.pop("lr", 3e-3))
    params.logging_steps, params.max_length = 1, 128
    return feature(str(student), str(TEACHER_DIR), records, out, params, kd or KDConfig(), FeatureSection(**feat))


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_feature_loss_is_zero_when_the_student_is_the_teacher(gold_records, tmp_path, loss):
    """The exact form at its fixed point: a copy of the teacher, identity projections at equal widths, alpha 1
    (no CE): the KD and feature terms are 0 on every layer pair (a teacher with dropout, or misaligned hidden-state
    indices, would not be)."""
    from distillery.config import KDConfig
    from distillery.demo.assets import TEACHER_DIR

    out = tmp_path / loss
    kd = KDConfig(alpha=1.0, temperature=2.0)
    _feature(TEACHER_DIR, gold_records[:16], out, kd, loss=loss, layers=[[0, 0], [2, 2], [4, 4]], lr=1e-9, steps=2)
    history = json.loads((out / "manifest.json").read_text())["loss_history"]
    parts = [(h["loss"], h["feature_loss"], h["kd_loss"]) for h in history if "loss" in h]
    assert len(parts) == 2 and all(abs(x) < 1e-5 for p in parts for x in p), parts


def test_demo_feature_learns_the_projection_and_the_student(tiny_student, gold_records, tmp_path):
    """demo-feature's settings through run_method on the 64-wide demo student against the 256-wide teacher: each
    student block paired with the teacher's at the same depth, the projections trained (the feature term falls),
    finite losses, the student saved without them."""
    import math

    from distillery.artifacts import write_jsonl
    from distillery.methods import run_method

    sets = ["train.max_steps=12", "train.batch_size=8", "train.logging_steps=1", "train.learning_rate=1e-2"]
    cfg = load_pipeline(REPO / "pipelines.yaml", "demo-feature", parse_overrides(sets))
    write_jsonl(tmp_path / "kept.jsonl", gold_records[:48])
    out = tmp_path / "feature"
    figures = run_method(cfg, str(tiny_student), str(tmp_path / "kept.jsonl"), None, out)
    manifest = json.loads((out / "manifest.json").read_text())
    feats = [h["feature_loss"] for h in manifest["loss_history"] if "feature_loss" in h]
    assert figures["steps"] == 12 and len(feats) == 12 and all(math.isfinite(x) for x in feats)
    assert sum(feats[-3:]) / 3 < 0.8 * sum(feats[:3]) / 3, feats  # the projection and student learn to match
    assert manifest["feature"]["pairs"] == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert manifest["feature"]["widths"] == [64, 256] and manifest["method"] == "feature"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("maps" in k for k in f.keys())  # noqa: SIM118


def test_feature_layers_out_of_range_are_refused(tiny_student, gold_records, tmp_path):
    with pytest.raises(ValueError, match=r"train.feature.layers: pair \[5, 4\] is out of range: the student has"):
        _feature(tiny_student, gold_records[:8], tmp_path / "x", layers=[[5, 4]])


@pytest.mark.slow
def test_demo_heal_pipeline_through_the_cli(tmp_path):
    """demo-heal, shrunk, through the real CLI: NF4, then healing adapters on it distilled from the full-precision
    student; both evaluated, the healed one loaded through its base folder, its adapters counted and measured."""

    from mlflow.tracking import MlflowClient

    from distillery.healing import base_of

    sets = ["data.num_prompts=64", "generate.backend=transformers", "train.max_steps=20", "evaluate.limit=8"]
    sets += ["quantize.heal.steps=6", "quantize.heal.batch_size=8", f"output_dir={tmp_path / 'runs'}"]
    r, uri = run_pipeline_cli("demo-heal", sets, tmp_path)
    assert "| student-nf4-healed" in r.stdout and "| student-nf4 " in r.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("distillery").experiment_id])
    q = next(x for x in runs if x.info.run_name == "quantize").data.metrics
    assert q["nf4-healed.heal_steps"] == 6 and 0 < q["nf4-healed.adapter_params"] < q["nf4.params"] / 2
    assert q["nf4-healed.peak_bytes"] > 0 and math.isfinite(q["nf4-healed.heal_final_kd"])
    healed = next((tmp_path / "runs").rglob("nf4-healed/adapter_config.json")).parent
    assert base_of(healed) == healed.parent / "nf4"  # relative: the run folder can move
    ev = next(x for x in runs if x.info.run_name == "evaluate").data.metrics
    assert {"accuracy.student-nf4", "accuracy.student-nf4-healed"} <= set(ev), sorted(ev)


def test_cross_tokenizer_distils_a_student_with_its_own_tokenizer(gold_records, tmp_path):
    """demo-xtok's settings through run_method: TRL's GOLD (hybrid ULD) from the demo teacher into the student on a
    tokenizer of its own; finite losses, the student saved with its own tokenizer, both vocabularies recorded. The
    same student is refused by logit_kd (vocabulary check), and cross_tokenizer refuses a shared vocabulary."""
    from transformers import AutoTokenizer

    from distillery.artifacts import write_jsonl
    from distillery.checks import DistillationCheckError
    from distillery.demo.assets import TEACHER_DIR, resolve_model
    from distillery.methods import run_method

    sets = ["train.max_steps=3", "train.batch_size=8", "train.logging_steps=1"]
    cfg = load_pipeline(REPO / "pipelines.yaml", "demo-xtok", parse_overrides(sets))
    write_jsonl(tmp_path / "kept.jsonl", gold_records[:24])
    student = resolve_model(cfg.student.path)
    out = tmp_path / "xtok"
    figures = run_method(cfg, student, str(tmp_path / "kept.jsonl"), None, out)
    manifest = json.loads((out / "manifest.json").read_text())
    losses = [h["loss"] for h in manifest["loss_history"] if "loss" in h]
    assert figures["steps"] == 3 and len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert manifest["method"] == "cross_tokenizer" and manifest["vocab"]["student"] != manifest["vocab"]["teacher"]
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(student).get_vocab()

    kd = load_pipeline(REPO / "pipelines.yaml", "demo-xtok", parse_overrides([*sets, "train.method=gkd"]))
    with pytest.raises(DistillationCheckError, match="train.method cross_tokenizer distils across tokenizers"):
        run_method(kd, student, str(tmp_path / "kept.jsonl"), None, tmp_path / "gkd")
    with pytest.raises(DistillationCheckError, match="share one vocabulary; use logit_kd"):
        run_method(cfg, str(TEACHER_DIR), str(tmp_path / "kept.jsonl"), None, tmp_path / "same")


def test_born_again_student_is_a_fresh_model_of_the_teachers_shape():
    """demo:student-teacher (demo-born-again's student): the teacher's architecture and tokenizer, none of its
    weights; the feature method then pairs each block with the same block through identity-initialised maps."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distillery.demo.assets import TEACHER_DIR, resolve_model
    from distillery.feature import layer_pairs

    cfg = load_pipeline(REPO / "pipelines.yaml", "demo-born-again", [])
    path = resolve_model(cfg.student.path, seed=1)
    mine, teacher = AutoConfig.from_pretrained(path), AutoConfig.from_pretrained(TEACHER_DIR)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(mine, k) == getattr(teacher, k), k
    assert AutoTokenizer.from_pretrained(path).get_vocab() == AutoTokenizer.from_pretrained(TEACHER_DIR).get_vocab()
    a = AutoModelForCausalLM.from_pretrained(path).model.layers[0].mlp.up_proj.weight
    b = AutoModelForCausalLM.from_pretrained(TEACHER_DIR).model.layers[0].mlp.up_proj.weight
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert layer_pairs(4, 4, None) == [(1, 1), (2, 2), (3, 3), (4, 4)]
