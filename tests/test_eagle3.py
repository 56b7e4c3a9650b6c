"""draft.kind eagle3: the teacher features an EAGLE-3 head reads (against vLLM's numbering and the teacher's own
logits), the packing speculators' shift expects, training and the saved format, the refusals, and the demo-eagle3
pipeline through the CLI with the head served by vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.config import ConfigError, load_pipeline, parse_overrides

from .conftest import REPO

TEACHER = REPO / "distillery" / "demo" / "assets" / "teacher"


@pytest.fixture(scope="module")
def teacher():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()


def samples(gold_records, n: int) -> list[dict]:
    """Rows in the generate stage's layout (prompt_text, completion, finish_reason)."""
    return [{"prompt_text": r["prompt"], "completion": r["completion"], "finish_reason": "stop"} for r in gold_records][
        :n
    ]


def test_layer_ids_follow_speculators_and_fit_shallow_teachers():
    from distillery.eagle3 import layer_ids

    assert layer_ids(32) == [2, 16, 29]  # speculators' default (Llama-3-8B)
    assert layer_ids(28) == [2, 14, 25]
    assert layer_ids(4) == [1, 2, 3]  # the demo teacher: [2, 2, 1] would repeat a layer
    assert layer_ids(5) == [1, 3, 4]
    assert layer_ids(4, [0, 1, 3]) == [0, 1, 3]
    with pytest.raises(ValueError, match="target_layers: the teacher has 4 layers"):
        layer_ids(4, [1, 2, 4])
    with pytest.raises(ValueError, match="3 layers"):
        layer_ids(3)


def test_features_are_what_vllm_reads_and_the_target_is_the_teachers_logits(teacher, tokenizer):
    """aux block j is the input of layer `layers[j]` (vLLM's aux id = the layer's input), taken here by hooks on
    the layers themselves; the norm and lm_head of the teacher on `last` give back its logits exactly."""
    import torch

    from distillery.eagle3 import teacher_features

    ids = torch.tensor([tokenizer("Question: Ann has 3 apples. She buys 2 more.")["input_ids"]])
    layers = [1, 2, 3]
    seen = {}
    hooks = [
        teacher.model.layers[i].register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"])),
            with_kwargs=True,
        )
        for i in layers
    ]
    try:
        aux, last = teacher_features(teacher, ids, torch.ones_like(ids), layers)
    finally:
        for h in hooks:
            h.remove()
    h = teacher.config.hidden_size
    assert aux.shape == (1, ids.shape[1], 3 * h) and last.shape == (1, ids.shape[1], h)
    for j, i in enumerate(layers):
        torch.testing.assert_close(aux[..., j * h : (j + 1) * h], seen[i])
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    torch.testing.assert_close(teacher.lm_head(teacher.model.norm(last)), logits)


def test_packing_shifts_each_sample_as_speculators_does(teacher, tokenizer, gold_records):
    """Feature t-1 goes with token t and target t; positions restart at 1 and document ids change per sample; the
    loss is on completion tokens only."""
    import torch

    from distillery.eagle3 import packed, teacher_features, tokenize_samples

    rows = tokenize_samples(tokenizer, samples(gold_records, 2), 256)
    batch = packed(teacher, rows, [1, 2, 3], "cpu")
    n0, n1 = (len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (1, n0 + n1 - 2)
    assert batch["input_ids"][0, : n0 - 1].tolist() == rows[0]["input_ids"][1:]
    assert batch["document_ids"][0].tolist() == [0] * (n0 - 1) + [1] * (n1 - 1)
    assert batch["position_ids"][0].tolist() == list(range(1, n0)) + list(range(1, n1))
    assert batch["loss_mask"][0, : n0 - 1].tolist() == [bool(m) for m in rows[0]["loss_mask"][1:]]
    assert not batch["loss_mask"][0, 0] and batch["loss_mask"][0, n0 - 2]
    ids = torch.tensor([rows[1]["input_ids"]])
    aux, last = teacher_features(teacher, ids, torch.ones_like(ids), [1, 2, 3])
    # the second sample alone gives the same features as inside the padded batch (padding never leaks)
    torch.testing.assert_close(batch["hidden_states"][0, n0 - 1 :], aux[0, :-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch["verifier_last_hidden_states"][0, n0 - 1 :], last[0, 1:], atol=1e-5, rtol=1e-4)


def test_a_trained_head_predicts_the_teacher_and_saves_in_speculators_format(gold_records, tmp_path):
    from speculators.models.eagle3 import Eagle3DraftModel

    from distillery.config import Eagle3Config
    from distillery.eagle3 import is_eagle3, train_eagle3

    e = Eagle3Config(steps=40, tokens_per_step=512, logging_steps=10, ttt_steps=2, draft_vocab_size=128)
    figures = train_eagle3(str(TEACHER), samples(gold_records, 64), tmp_path / "head", e)
    history = json.loads((tmp_path / "head" / "manifest.json").read_text())["loss_history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert figures["accuracy_pos_1"] > 0.5 and figures["steps"] == 40
    assert is_eagle3(tmp_path / "head") and not is_eagle3(TEACHER)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3] and config["draft_vocab_size"] == 128
    head = Eagle3DraftModel.from_pretrained(tmp_path / "head")
    assert int(head.t2d.sum()) == 128  # the pruned vocabulary: the 128 tokens the samples use most
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize(
    "sets, message",
    [
        (["draft.distill.steps=5"], "draft.distill: aligns a standalone draft"),
        (["stages=[draft]"], "needs stage 'generate'"),
        (["draft.eagle3.target_layers=[1,1,2]"], "three distinct layer numbers"),
        (["draft.eagle3.loss=mse"], "draft.eagle3.loss"),
    ],
)
def test_eagle3_settings_are_refused_in_one_line(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(REPO / "pipelines.yaml", "demo-eagle3", parse_overrides(sets))


def test_demo_eagle3_config_and_its_serve_command():
    from distillery.serving import server_command

    cfg = load_pipeline(REPO / "pipelines.yaml", "demo-eagle3", [])
    assert cfg.draft.kind == "eagle3" and "train" not in cfg.stages  # no student needed: source is not checked
    argv = server_command("demo-teacher", draft="/nonexistent")
    assert '"method": "draft_model"' in argv[-1]


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_eagle3_through_the_cli_served_by_vllm(tmp_path):
    """demo-eagle3, shrunk, through the CLI, Prefect and MLflow: the head trains on the teacher's samples, vLLM
    serves it as the teacher's EAGLE-3 draft without changing the greedy outputs and accepts more than a head
    would by chance, the draft is a logged model with its files, and serve-model picks method eagle3 for it."""
    from mlflow.tracking import MlflowClient

    from distillery.serving import check_draft, server_command

    from .conftest import run_pipeline_cli

    sets = [
        "data.num_prompts=160",
        "generate.backend=transformers",
        "generate.max_tokens=64",
        "draft.num_prompts=8",
        "draft.max_tokens=48",
        "draft.eagle3.steps=60",
        "draft.eagle3.tokens_per_step=1024",
    ]
    r, uri = run_pipeline_cli("demo-eagle3", sets, tmp_path)
    (run_dir,) = (tmp_path / "runs" / "demo-eagle3").iterdir()
    f = json.loads((run_dir / "draft" / "manifest.json").read_text())["figures"]
    assert f["outputs_identical"] == 1.0 and f["num_drafts"] > 0
    # 1/512 per token for a head that learned nothing; the demo teacher's text is very predictable once learned
    assert f["acceptance_rate"] > 0.2, f
    assert f["eagle3_samples"] == 160 and "sampled_acceptance_rate" not in f
    assert "draft done" in r.stderr and "acceptance_rate" in r.stderr
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("distillery").experiment_id
    draft_run = next(x for x in client.search_runs([exp]) if x.info.run_name == "draft")
    assert "eagle3_loss" in draft_run.data.metrics
    assert "eagle3_loss_curve.png" in [a.path for a in client.list_artifacts(draft_run.info.run_id)]
    (model,) = [m for m in client.search_logged_models([exp]) if m.name == "draft"]
    assert model.model_type == "speculators" and str(model.status).endswith("READY")
    head = Path(json.loads((run_dir / "draft" / "manifest.json").read_text())["draft"])
    check_draft(str(TEACHER), str(head))
    assert '"method": "eagle3"' in server_command(str(TEACHER), draft=str(head))[-1]


def test_draft_bench_pairs_arms_over_seeds():
    """bench/draft.py --seeds: each arm's mean over seeds and its difference to the first arm, paired by seed (the
    seed-to-seed spread both arms share cancels)."""
    import statistics

    from bench.draft import render_seeds, summarize

    base = [0.50, 0.60, 0.70]

    def row(arm, seed, a):
        return {"arm": arm, "seed": seed, "acceptance_rate": a, "mean_accepted_length": 1 + 4 * a}

    rows = [row("distilled", s, a) for s, a in enumerate(base)]
    rows += [row("eagle3", s, a + d) for s, (a, d) in enumerate(zip(base, [0.10, 0.12, 0.08], strict=True))]
    summary = summarize(rows, ["distilled", "eagle3"])
    diff = summary[1]["acceptance_rate_minus_distilled"]
    assert diff["mean"] == pytest.approx(0.10) and diff["n"] == 3
    assert diff["high"] - diff["low"] < 0.1  # paired: the 0.1-wide spread across seeds is gone
    assert summary[0]["acceptance_rate"]["mean"] == pytest.approx(statistics.mean(base))
    assert "acceptance_rate_minus_distilled" not in summary[0]
    assert "0.100 ± " in render_seeds(summary)


def test_a_head_for_a_qwen2_teacher_at_151k_with_a_pruned_vocabulary(gold_records, tmp_path):
    """Real shapes: the rehearsal teacher (Qwen2 architecture, R1-Distill's 151k vocabulary and chat template). The
    head is speculators' Llama layer of the teacher's width; its output vocabulary keeps the tokens the samples use
    (all of them, when they fit), mapped back to the teacher's ids."""
    import torch
    from speculators.models.eagle3 import Eagle3DraftModel
    from transformers import AutoTokenizer

    from distillery.config import Eagle3Config
    from distillery.demo.assets import resolve_model
    from distillery.eagle3 import tokenize_samples, train_eagle3

    teacher = resolve_model("rehearsal:teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    rows = [
        {
            "prompt_text": tok.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
            ),
            "completion": r["completion"],
            "finish_reason": "stop",
        }
        for r in gold_records[:16]
    ]
    e = Eagle3Config(steps=2, tokens_per_step=256, logging_steps=1, draft_vocab_size=1024)
    figures = train_eagle3(teacher, rows, tmp_path / "head", e)
    assert figures["steps"] == 2
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["transformer_layer_config"]["model_type"] == "llama"
    assert config["transformer_layer_config"]["vocab_size"] == 152064 and config["draft_vocab_size"] == 1024
    head = Eagle3DraftModel.from_pretrained(tmp_path / "head")
    tokenized = tokenize_samples(tok, rows, 2048)
    used = {t for r in tokenized for t, m in zip(r["input_ids"], r["loss_mask"], strict=True) if m}
    assert len(used) < 1024
    kept = set(torch.nonzero(head.t2d).flatten().tolist())
    assert used <= kept  # every token the teacher wrote can be drafted
    assert (torch.arange(1024) + head.d2t).tolist() == sorted(kept)  # draft id -> teacher id, as vLLM reads it
