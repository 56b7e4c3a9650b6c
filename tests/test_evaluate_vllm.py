"""evaluate.backend vllm: lm-eval's own vLLM model type, in a worker process, scores like the hf backend."""

from __future__ import annotations

import shutil

import pytest

from distillery.config import EvaluateConfig
from tasks.evaluate import vllm_model_args


def test_vllm_model_args_carry_the_parallelism_and_engine_settings():
    cfg = EvaluateConfig(backend="vllm", tensor_parallel_size=2, data_parallel_size=4, max_gen_toks=96, seed=7)
    args = vllm_model_args(
        "/m",
        cfg,
        {
            "dtype": "bfloat16",
            "max_model_len": 4096,
            "enforce_eager": True,
            "gpu_memory_utilization": 0.8,
            "kv_cache_gib": 4,
        },
        trust_remote_code=False,
    )
    assert args == {
        "pretrained": "/m",
        "dtype": "bfloat16",
        "trust_remote_code": False,
        "tensor_parallel_size": 2,
        "data_parallel_size": 4,
        "max_gen_toks": 96,
        "seed": 7,
        "batch_size": "auto",
        "enforce_eager": True,
        "gpu_memory_utilization": 0.8,
        "max_model_len": 4096,
    }


@pytest.mark.slow
@pytest.mark.vllm
def test_pruned_model_scores_alike_in_lm_eval_vllm_and_hf(tmp_path):
    """One engine start checks two things: a width- and depth-pruned model (explicit head_dim, fewer heads and KV
    heads) loads in vLLM, and lm-eval's vLLM backend, in its worker process, decodes (fp32, greedy) and scores the
    way the hf backend does."""
    from distillery.config import PruneConfig
    from distillery.demo import task
    from distillery.demo.assets import TEACHER_DIR
    from tasks.evaluate import evaluate_model, local_task_dir
    from tasks.prune import prune

    cfg = PruneConfig(
        drop_layers=1, width={"intermediate_size": 256, "num_attention_heads": 2}, calibration_samples=16, max_length=96
    )
    prune(str(TEACHER_DIR), [p.question + p.trace for p in task.problems(seed=7, count=16)], cfg, tmp_path / "m")
    ev = EvaluateConfig(
        tasks=["demo_arith"],
        limit=16,
        batch_size=16,
        max_gen_toks=24,
        backend="vllm",
        throughput_prompts=2,
        throughput_new_tokens=8,
    )
    include = local_task_dir(ev.tasks)
    prompts = ["Question: Mia has 2 pens.\nAnswer:"]
    try:
        v = evaluate_model(
            str(tmp_path / "m"),
            ev,
            include,
            prompts,
            vllm_settings={"dtype": "float32", "max_model_len": 256, "enforce_eager": True},
        )
        h = evaluate_model(str(tmp_path / "m"), ev.model_copy(update={"backend": "hf"}), include, prompts)
    finally:
        shutil.rmtree(include, ignore_errors=True)
    assert (v["backend"], h["backend"]) == ("vllm", "hf")
    assert v["tasks"]["demo_arith"]["n"] == h["tasks"]["demo_arith"]["n"] == 16
    got = [s["response"] for s in v["samples"]["demo_arith"]]
    want = [s["response"] for s in h["samples"]["demo_arith"]]
    assert len(got) == len(want) == 16 and any(got)
    # fp32 greedy both ways: the same text, bar a rare near-tie in the kernels' summation order
    assert sum(a == b for a, b in zip(got, want, strict=True)) >= 15, list(zip(got, want, strict=True))
    assert abs(v["figures"]["accuracy"] - h["figures"]["accuracy"]) <= 1 / 16
