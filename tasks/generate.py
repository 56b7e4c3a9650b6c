"""generate: the teacher answers every prompt n times, with vLLM (offline batch) or transformers.

    distillery run demo --set generate.n=8

Output: <run>/generate/traces.jsonl, one row per sample: prompt id, prompt, the exact prompt text the teacher
saw, reference answer, completion, token count, finish reason, teacher id and sampling parameters. The vLLM
engine runs in a child process (`python -m tasks.generate SPEC`) so its memory is gone when the stage ends.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, read_jsonl, write_jsonl, write_manifest
from distillery.config import GenerateConfig, Pipeline
from distillery.data import load_prompts, render_prompt
from distillery.demo.assets import resolve_model
from distillery.runtime import RunContext


def sampling_dict(g: GenerateConfig) -> dict:
    return {"n": g.n, "temperature": g.temperature, "top_p": g.top_p, "max_tokens": g.max_tokens,
            "stop": g.stop, "seed": g.seed}


def generate(cfg: Pipeline, out_dir: Path) -> dict:
    """Generate traces for the pipeline's prompts; returns {path, figures}."""
    from transformers import AutoTokenizer

    teacher = resolve_model(cfg.teacher.path)
    prompts = load_prompts(cfg.data)
    if not prompts:
        raise ValueError("generate: the data section produced no prompts")
    tok = AutoTokenizer.from_pretrained(teacher, revision=cfg.teacher.revision,
                                        trust_remote_code=cfg.teacher.trust_remote_code)
    for p in prompts:
        p["prompt_text"] = render_prompt(tok, p["prompt"], cfg.data)
    g = cfg.generate
    if g.backend == "vllm":
        from distillery.engines import require_vllm, run_worker

        require_vllm()
        spec = {"model": teacher, "revision": cfg.teacher.revision, "trust_remote_code": cfg.teacher.trust_remote_code,
                "prompts": [p["prompt_text"] for p in prompts], "sampling": sampling_dict(g),
                "engine": {"dtype": g.dtype, "max_model_len": g.max_model_len, "enforce_eager": g.enforce_eager,
                           "gpu_memory_utilization": g.gpu_memory_utilization,
                           "tensor_parallel_size": g.tensor_parallel_size, "seed": g.seed}}
        result = run_worker("tasks.generate", spec, kv_cache_gib=g.kv_cache_gib)
        samples = result["samples"]
        seconds = result["seconds"]
    else:
        samples, seconds = _generate_transformers(teacher, cfg, [p["prompt_text"] for p in prompts])
    teacher_id = cfg.teacher.path if not cfg.teacher.path.startswith("demo:") else f"{cfg.teacher.path}@{teacher}"
    sampling = sampling_dict(g)
    rows = []
    for p, outs in zip(prompts, samples, strict=True):
        for i, o in enumerate(outs):
            rows.append({"prompt_id": p["id"], "prompt": p["prompt"], "prompt_text": p["prompt_text"],
                         "answer": p["answer"], "sample": i, "completion": o["text"],
                         "num_tokens": o["num_tokens"], "finish_reason": o["finish_reason"],
                         "teacher": teacher_id, "teacher_revision": cfg.teacher.revision,
                         "backend": g.backend, "sampling": sampling})
    tokens = sum(r["num_tokens"] for r in rows)
    figures = {"prompts": len(prompts), "samples": len(rows), "generated_tokens": tokens,
               "generate_seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
               "mean_completion_tokens": tokens / len(rows)}
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "traces.jsonl", rows)
        write_manifest(tmp, {"kind": "traces", "teacher": teacher_id, "backend": g.backend,
                             "sampling": sampling, "figures": figures})
    return {"path": str(out_dir / "traces.jsonl"), "figures": figures}


def _generate_transformers(model_path: str, cfg: Pipeline, prompts: list[str]) -> tuple[list[list[dict]], float]:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = cfg.generate
    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left",
                                        trust_remote_code=cfg.teacher.trust_remote_code)
    dtype = "auto" if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, revision=cfg.teacher.revision,
                                                 trust_remote_code=cfg.teacher.trust_remote_code).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    torch.manual_seed(g.seed)
    out: list[list[dict]] = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(prompts), g.batch_size), desc="generate (transformers)"):
        batch = prompts[i : i + g.batch_size]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=g.temperature > 0, temperature=g.temperature or None,
                                 top_p=g.top_p, max_new_tokens=g.max_tokens, num_return_sequences=g.n,
                                 pad_token_id=tok.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1] :]
        for j in range(len(batch)):
            outs = []
            for row in new[j * g.n : (j + 1) * g.n]:
                ids = row.tolist()
                finished = tok.eos_token_id in ids
                ids = ids[: ids.index(tok.eos_token_id)] if finished else ids
                text = tok.decode(ids, skip_special_tokens=True)
                stopped = [s for s in g.stop if s in text]
                if stopped:
                    text = text[: min(text.index(s) for s in stopped)]
                outs.append({"text": text, "num_tokens": len(ids) + int(finished),
                             "finish_reason": "stop" if finished or stopped else "length"})
            out.append(outs)
    return out, time.perf_counter() - start


def _worker(spec_file: str) -> None:
    """Child-process entry: build the engine, generate, write the result file."""
    spec = json.loads(Path(spec_file).read_text())
    from vllm import LLM, SamplingParams

    e = spec["engine"]
    llm = LLM(model=spec["model"], revision=spec["revision"], trust_remote_code=spec["trust_remote_code"],
              dtype=e["dtype"], max_model_len=e["max_model_len"], enforce_eager=e["enforce_eager"],
              gpu_memory_utilization=e["gpu_memory_utilization"], tensor_parallel_size=e["tensor_parallel_size"],
              seed=e["seed"])
    from vllm.platforms import current_platform

    s = spec["sampling"]
    # Per-request seeds crash vLLM's CPU sampler ("CPU Generator does not use offset"); there the engine seed
    # above makes a run reproducible on its own.
    request_seed = None if current_platform.is_cpu() else s["seed"]
    params = SamplingParams(n=s["n"], temperature=s["temperature"], top_p=s["top_p"], max_tokens=s["max_tokens"],
                            stop=s["stop"] or None, seed=request_seed, ignore_eos=s.get("ignore_eos", False))
    start = time.perf_counter()
    outputs = llm.generate(spec["prompts"], params, use_tqdm=True)
    seconds = time.perf_counter() - start
    samples = [[{"text": o.text, "num_tokens": len(o.token_ids), "finish_reason": o.finish_reason}
                for o in req.outputs] for req in outputs]
    Path(spec["result_file"]).write_text(json.dumps({"samples": samples, "seconds": seconds}))


@task(name="generate", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def generate_task(cfg: Pipeline, ctx: RunContext) -> dict:
    tracker = ctx.tracker()
    with tracker.stage("generate", ctx.parent_run_id) as run:
        run.log_params({"teacher": cfg.teacher.path, "teacher_revision": cfg.teacher.revision,
                        **cfg.generate.model_dump(), "data": cfg.data.model_dump()})
        result = generate(cfg, ctx.stage_dir("generate"))
        run.log_metrics(result["figures"])
        rows = read_jsonl(Path(result["path"]))
        run.log_dict(rows[:50], "traces_sample.json")
        run.log_artifact(Path(result["path"]).parent / "manifest.json")
    return result


if __name__ == "__main__":
    _worker(sys.argv[1])
