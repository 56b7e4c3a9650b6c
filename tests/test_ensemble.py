"""Several teachers (generate.ensemble): the averaged distribution's exact form, the refusals, and both merges
through the generate and filter stages into training on the demo teachers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from distillery.artifacts import read_jsonl
from distillery.config import ConfigError, load_pipeline, parse_overrides

from .conftest import REPO


@pytest.fixture(scope="module")
def two_models(tokenizer):
    from distillery.demo import assets

    return [assets.init_model(assets.STUDENT_SHAPE, tokenizer, seed=s).eval() for s in (0, 1)]


def _full_logprobs(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_mixture_is_the_weighted_mean_of_the_teachers_probabilities(two_models, tokenizer):
    """log(0.75 p_0 + 0.25 p_1) at every completion token, its top-k and the sampled token's value, computed here
    from each model's full distribution; the disagreement is H(mix) - sum w H(p_t)."""
    import torch

    from distillery.ensemble import mixture_topk

    prompts = [tokenizer("Ann has 3 apples.", add_special_tokens=False)["input_ids"], [5, 6]]
    comps = [tokenizer(" She buys 2 more.", add_special_tokens=False)["input_ids"], [7, 8, 9]]
    rows, figs = mixture_topk(two_models, [3.0, 1.0], prompts, comps, 4, tokenizer.pad_token_id, batch_size=2)
    tokens = sum(map(len, comps))
    h_mix = h_w = 0.0
    for (p, c), row in zip(zip(prompts, comps, strict=True), rows, strict=True):
        lp = [_full_logprobs(m, p + c)[len(p) - 1 : len(p) + len(c) - 1] for m in two_models]
        mix = torch.log(0.75 * lp[0].exp() + 0.25 * lp[1].exp())
        top = mix.topk(4, dim=-1)
        assert row["top_ids"] == top.indices.tolist()
        assert torch.allclose(torch.tensor(row["top_logprobs"]), top.values, atol=1e-5)
        assert torch.allclose(torch.tensor(row["token_logprobs"]), mix.gather(-1, torch.tensor(c)[:, None])[:, 0])
        h_mix += float(-(mix.exp() * mix).sum())
        h_w += sum(w * float(-(x.exp() * x).sum()) for w, x in zip((0.75, 0.25), lp, strict=True))
    assert math.isclose(figs["ensemble_mixture_entropy"], h_mix / tokens, rel_tol=1e-4)
    assert math.isclose(figs["ensemble_disagreement"], (h_mix - h_w) / tokens, rel_tol=1e-3, abs_tol=1e-6)
    assert figs["ensemble_disagreement"] > 0


def test_a_teacher_averaged_with_itself_is_itself(two_models, tokenizer):
    import torch

    from distillery.ensemble import mixture_topk

    p, c = [5, 6, 7], [8, 9, 10, 11]
    (row,), figs = mixture_topk([two_models[0]] * 2, None, [p], [c], 8, tokenizer.pad_token_id)
    own = _full_logprobs(two_models[0], p + c)[len(p) - 1 : -1].topk(8, dim=-1)
    assert row["top_ids"] == own.indices.tolist()
    assert torch.allclose(torch.tensor(row["top_logprobs"]), own.values, atol=1e-5)
    assert abs(figs["ensemble_disagreement"]) < 1e-5 and figs["ensemble_argmax_agree"] == 1.0


def test_a_teacher_on_another_tokenizer_is_refused(tokenizer):
    from transformers import AutoTokenizer

    from distillery.checks import DistillationCheckError
    from distillery.demo.assets import resolve_model
    from distillery.ensemble import check_same_tokenizer

    other = AutoTokenizer.from_pretrained(resolve_model("demo:student-othertok"))
    with pytest.raises(DistillationCheckError, match=r"generate.ensemble.teachers\[0\].*share one tokenizer"):
        check_same_tokenizer(tokenizer, other, "generate.ensemble.teachers[0] (demo:student-othertok)")
    check_same_tokenizer(tokenizer, tokenizer, "same")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.method=sft"], "only train.method logit_kd reads the averaged"),
        (["generate.logprobs=0", "train.method=sft"], "set logprobs > 0"),
        (["generate.ensemble.weights=[1, 2, 3]"], "3 given for 2 teachers"),
        (["generate.ensemble.merge=traces", "generate.ensemble.weights=[1, 1]"], "traces are merged by verifier"),
        (["generate.ensemble.teachers=[]"], "at least 1"),
        (["generate.ensemble.teachers=[{path: 'demo:nobody'}]"], "unknown demo model"),
    ],
)
def test_ensemble_settings_are_checked(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(REPO / "pipelines.yaml", "demo-ensemble", parse_overrides(sets))


def _generate(tmp: Path, pipeline: str, sets: list[str]):
    from tasks.filter import run_filter
    from tasks.generate import generate

    cfg = load_pipeline(
        REPO / "pipelines.yaml",
        pipeline,
        parse_overrides(
            [
                f"output_dir={tmp / 'runs'}",
                f"generate.cache_dir={tmp / 'cache'}",
                "data.num_prompts=24",
                "generate.backend=transformers",
                "generate.max_tokens=64",
                *sets,
            ]
        ),
    )
    gen = generate(cfg, tmp / "gen")
    return cfg, gen, run_filter(cfg, Path(gen["path"]), tmp / "filter")


def test_demo_ensemble_stores_the_two_teachers_average_and_trains_on_it(tmp_path):
    """demo-ensemble, shrunk: the stored top-k is the mixture of demo:teacher and demo:teacher-b recomputed here
    from both models; a second run reuses every shard and mixture; logit_kd trains on it."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.demo.assets import resolve_model
    from distillery.kd import load_logprobs
    from distillery.methods import run_method

    cfg, gen, kept = _generate(tmp_path, "demo-ensemble", [])
    figs = gen["figures"]
    assert 0 < figs["ensemble_disagreement"] and 0 < figs["ensemble_argmax_agree"] < 1
    assert figs["ensemble_teacher1_sampled_logprob"] < figs["ensemble_teacher0_sampled_logprob"] < 0
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert len(manifest["logprobs"]["ensemble_average"]["teachers"]) == 2
    stored = load_logprobs(tmp_path / "gen" / "logprobs.parquet")
    tok = AutoTokenizer.from_pretrained(resolve_model("demo:teacher"))
    models = [AutoModelForCausalLM.from_pretrained(resolve_model(r)).eval() for r in ("demo:teacher", "demo:teacher-b")]
    for r in read_jsonl(Path(gen["path"]))[:3]:
        lp = stored[(r["prompt_id"], r["sample"])]
        p = tok(r["prompt_text"], add_special_tokens=False)["input_ids"]
        c = list(lp["token_ids"])
        per = [_full_logprobs(m, p + c)[len(p) - 1 : -1] for m in models]
        mix = torch.log((per[0].exp() + per[1].exp()) / 2)
        want = mix.gather(-1, torch.tensor([list(x) for x in lp["top_ids"]]))
        got = torch.tensor([list(x) for x in lp["top_logprobs"]], dtype=torch.float32)
        assert (got - want).abs().max() < 2e-2  # float16 storage
        assert [list(x)[0] for x in lp["top_ids"]] == mix.argmax(-1).tolist()

    again = _generate(tmp_path, "demo-ensemble", [])[1]["figures"]
    assert again["shards_cached"] == again["shards"] and again["ensemble_disagreement"] == figs["ensemble_disagreement"]

    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"max_steps": 4, "batch_size": 8, "logging_steps": 1})}
    )
    out = run_method(cfg, resolve_model("demo:student"), kept["path"], gen["path"], tmp_path / "student")
    assert out["steps"] == 4 and math.isfinite(out["final_loss"])


def test_demo_ensemble_traces_merge_both_teachers_by_the_verifier(tmp_path):
    """demo-ensemble-traces, shrunk, with top-k kept: every prompt answered by both teachers (samples 0 and 1),
    each trace's own top-k under its own key, the filter's report per teacher."""
    from distillery.kd import load_logprobs

    _, gen, kept = _generate(tmp_path, "demo-ensemble-traces", ["generate.logprobs=4"])
    rows = read_jsonl(Path(gen["path"]))
    assert len(rows) == 48 and gen["figures"]["teacher0_samples"] == gen["figures"]["teacher1_samples"] == 24
    authors = {r["sample"]: r["teacher"] for r in rows}
    assert authors[0] != authors[1] and "teacher-b" in authors[1]
    stored = load_logprobs(tmp_path / "gen" / "logprobs.parquet")
    assert {(r["prompt_id"], r["sample"]) for r in rows} == set(stored)
    by = kept["report"]["by_teacher"]
    assert [b["input"] for b in by] == [24, 24] and sum(b["kept"] for b in by) == kept["report"]["kept"]


def test_logit_kd_from_two_teachers_through_the_cli(tmp_path):
    """demo-ensemble, shrunk, through the real CLI, Prefect and MLflow: generate averaged both teachers (its run
    logs their disagreement), the train run used logit KD and finished, and the second teacher is evaluated beside
    the first. (The CLI test of logit_kd: one teacher differs only in what generate stores.)"""
    from mlflow.tracking import MlflowClient

    from .conftest import run_pipeline_cli

    sets = ["data.num_prompts=64", "generate.backend=transformers", "train.max_steps=5", "evaluate.limit=8"]
    r, uri = run_pipeline_cli("demo-ensemble", sets, tmp_path)
    client = MlflowClient(uri)
    runs = {x.info.run_name: x for x in client.search_runs([client.get_experiment_by_name("distillery").experiment_id])}
    train = runs["train"]
    assert train.info.status == "FINISHED" and train.data.params["method"] == "logit_kd"
    assert "kd_loss" in train.data.metrics and "ce_loss" in train.data.metrics
    assert runs["generate"].data.metrics["ensemble_disagreement"] > 0
    assert "| student-kd" in r.stdout and "| teacher2" in r.stdout
