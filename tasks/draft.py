"""draft: the student as a speculative-decoding draft for the teacher: an artifact, measured in vLLM.

    distillery run demo --set draft.num_speculative_tokens=2

The draft artifact (`draft-model/`, registered with alias `draft`) is the student with the teacher's vocabulary:
refused when the tokenizers differ, the embedding padded when only its size does. Then two engine runs on the
same prompts, greedy: the teacher alone, then the teacher with the student as its
draft model (`speculative_config={"method": "draft_model", ...}`). Reported: draft acceptance rate (accepted /
proposed draft tokens), acceptance per position, mean accepted length (tokens per teacher step), teacher
tokens/s with and without the draft and their ratio, and whether the outputs are identical (greedy
speculative decoding must not change them). Greedy because the CPU build of vLLM garbles sampled
speculative output (see ../shared/STACK.md); on GPU the same code measures sampled runs too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, read_jsonl, write_manifest
from distillery.checks import check_same_vocab
from distillery.config import Pipeline
from distillery.runtime import RunContext


def draft_prompts(cfg: Pipeline) -> list[str]:
    """Held-out prompts where there are some (the demo eval split), else the pipeline's prompts."""
    from distillery.data import DEMO_EVAL_FILE, load_prompts

    if cfg.data.source == "demo":
        return [r["question"] for r in read_jsonl(DEMO_EVAL_FILE)][: cfg.draft.num_prompts]
    return [p["prompt"] for p in load_prompts(cfg.data)][-cfg.draft.num_prompts :]


def pad_vocab(model, size: int) -> None:
    """Grow the input and output embeddings to `size` rows, the new ones zero: ids past the tokenizer are never
    fed in, and a zero output row gives them a logit of 0, far below a trained model's top logits."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if size < old:
        raise ValueError(f"draft: the draft's embedding ({old}) is larger than the teacher's ({size})")
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = 0
        model.get_output_embeddings().weight[old:] = 0


def make_draft(teacher: str, student: str, dest: Path) -> dict:
    """The draft artifact: the student, refused unless its tokenizer is the teacher's (same tokens, same ids), with
    its embedding padded to the teacher's size when only the size differs (vLLM requires equal sizes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distillery.artifacts import save_model

    tok = AutoTokenizer.from_pretrained(student)
    check_same_vocab(AutoTokenizer.from_pretrained(teacher), tok, where="draft: teacher vs draft tokenizer")
    tv, dv = AutoConfig.from_pretrained(teacher).vocab_size, AutoConfig.from_pretrained(student).vocab_size
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    if tv != dv:
        pad_vocab(model, tv)
    with atomic_dir(dest) as tmp:
        save_model(model, tok, tmp)
        write_manifest(tmp, {"kind": "model", "role": "draft", "teacher": teacher, "base": student,
                             "vocab_size": tv, "padded_from": dv if tv != dv else None})
    return {"path": str(dest), "padded_from": dv if tv != dv else None}


def measure_draft(teacher: str, student: str, prompts: list[str], cfg: Pipeline, out_dir: Path) -> dict:
    from distillery.engines import require_vllm, run_worker

    require_vllm()
    made = make_draft(teacher, student, out_dir.parent / f"{out_dir.name}-model")
    draft = made["path"]
    d = cfg.draft
    base = {"model": teacher, "prompts": prompts, "max_tokens": d.max_tokens, "enforce_eager": d.enforce_eager,
            "max_model_len": d.max_model_len, "dtype": cfg.generate.dtype,
            "gpu_memory_utilization": cfg.generate.gpu_memory_utilization}
    alone = run_worker("tasks.draft", {**base, "draft": None}, kv_cache_gib=cfg.generate.kv_cache_gib)
    spec = run_worker("tasks.draft", {**base, "draft": draft, "k": d.num_speculative_tokens},
                      kv_cache_gib=cfg.generate.kv_cache_gib)
    m = spec["metrics"]
    proposed, accepted, drafts = m.get("num_draft_tokens", 0), m.get("num_accepted_tokens", 0), m.get("num_drafts", 0)
    per_pos = m.get("accepted_per_pos", [])
    figures = {
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_accepted_length": 1 + accepted / drafts if drafts else 1.0,
        "teacher_tokens_per_s": alone["tokens"] / alone["seconds"],
        "teacher_with_draft_tokens_per_s": spec["tokens"] / spec["seconds"],
        "num_drafts": drafts, "num_draft_tokens": proposed, "num_accepted_tokens": accepted,
        "outputs_identical": float(alone["texts"] == spec["texts"]),
        "vocab_padded": float(made["padded_from"] is not None),
    }
    figures["speedup"] = figures["teacher_with_draft_tokens_per_s"] / figures["teacher_tokens_per_s"]
    for i, n in enumerate(per_pos):
        figures[f"acceptance_pos_{i + 1}"] = n / drafts if drafts else 0.0
    with atomic_dir(out_dir) as tmp:
        (tmp / "samples.json").write_text(json.dumps(
            [{"prompt": p, "teacher": a, "with_draft": s}
             for p, a, s in zip(prompts[:10], alone["texts"], spec["texts"], strict=False)], indent=2))
        write_manifest(tmp, {"kind": "draft", "teacher": teacher, "draft": draft, "student": student,
                             "num_speculative_tokens": d.num_speculative_tokens, "figures": figures})
    return {"draft": draft, "figures": figures}


def _worker(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    from vllm import LLM, SamplingParams
    from vllm.v1.metrics.reader import Counter, Vector

    kwargs = {}
    if spec["draft"]:
        kwargs["speculative_config"] = {"method": "draft_model", "model": spec["draft"],
                                        "num_speculative_tokens": spec["k"]}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              enforce_eager=spec["enforce_eager"], gpu_memory_utilization=spec["gpu_memory_utilization"],
              disable_log_stats=False, seed=0, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    llm.generate(spec["prompts"][:2], params, use_tqdm=False)  # warm-up, excluded from timing and counters
    before = _spec_counters(llm.get_metrics(), Counter, Vector)
    start = time.perf_counter()
    outs = llm.generate(spec["prompts"], params, use_tqdm=True)
    seconds = time.perf_counter() - start
    after = _spec_counters(llm.get_metrics(), Counter, Vector)
    metrics = {k: after[k] - before.get(k, 0) for k in after if k != "accepted_per_pos"}
    metrics["accepted_per_pos"] = [a - b for a, b in zip(after.get("accepted_per_pos", []),
                                                         before.get("accepted_per_pos", [0] * 64), strict=False)]
    texts = [o.outputs[0].text for o in outs]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    Path(spec["result_file"]).write_text(json.dumps({"texts": texts, "tokens": tokens, "seconds": seconds,
                                                     "metrics": metrics}))


def _spec_counters(snapshot, Counter, Vector) -> dict:
    out: dict = {}
    for m in snapshot:
        name = m.name.removeprefix("vllm:spec_decode_")
        if isinstance(m, Counter) and m.name.startswith("vllm:spec_decode_"):
            out[name] = out.get(name, 0) + m.value
        elif isinstance(m, Vector) and m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            prev = out.get("accepted_per_pos", [0] * len(m.values))
            out["accepted_per_pos"] = [a + b for a, b in zip(prev, m.values, strict=False)]
    return out


@task(name="draft", cache_policy=NO_CACHE)
def draft_task(cfg: Pipeline, ctx: RunContext, teacher: str, draft: str) -> dict:
    with ctx.tracker().stage("draft", ctx.parent_run_id) as run:
        run.log_params({"draft_model": draft, **cfg.draft.model_dump()})
        result = measure_draft(teacher, draft, draft_prompts(cfg), cfg, ctx.stage_dir("draft"))
        run.log_metrics(result["figures"])
        run.log_artifact(ctx.stage_dir("draft") / "samples.json")
        run.log_artifact(result["draft"], "draft-model")  # registered with alias `draft` when there is a registry
    return {**result, "run_id": run.run_id}


if __name__ == "__main__":
    _worker(sys.argv[1])
