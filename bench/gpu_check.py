"""The GPU check: r1-distill's stages at the published sizes, random init, nothing from the hub, in one command.

    python bench/gpu_check.py                  # on a GPU: R1-Distill-Qwen-7B and Qwen2.5-1.5B shapes (bf16)
    python bench/gpu_check.py --sizes tiny     # anywhere: the r1-rehearsal pipeline itself (what CI runs on CPU)

It runs the real pipeline (`distillery run r1-rehearsal`, real vLLM, TRL, bitsandbytes, MLflow, Prefect): at `real`
sizes with the models swapped for random-init ones of the published shapes (tokenizers, templates and embedding
sizes from distillery/rehearsal.py), a filter that keeps every trace (random weights answer nothing right), LoRA
bf16 training, NF4, and the student as the teacher's draft at batch 1; `tiny` runs r1-rehearsal as it is. Then
transformers `generate` on the same prompts for the vLLM ratio. Prints, and writes `<out>/gpu_check.json`:

- vLLM vs transformers generation tokens/s (teacher, same prompts, same token budget) and their ratio;
- training tokens/s and MFU (6 · params · tokens / s against the measured bf16 matmul peak, and the card's);
- NF4 weight memory against bf16, and the quantize stage's peak memory;
- draft: tokens per teacher step (mean accepted length) and speed-up at batch 1, greedy.

About 10 minutes on one H100/H200 (most of it building and saving 9 GB of random weights and three vLLM starts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# dense bf16 tensor-core peaks from the data sheets (SXM), for the "of spec" MFU
CARD_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def build_real(role: str, dest: Path, device: str) -> Path:
    """A random-init model of the published shape with the rehearsal's tokenizer, bf16, as safetensors."""
    import torch
    from transformers import Qwen2ForCausalLM

    from distillery import rehearsal
    from distillery.artifacts import atomic_dir, save_model

    if (dest / "config.json").exists():
        return dest
    kind = rehearsal.TOKENIZER_OF[role]
    tok = rehearsal.load_tokenizer(kind)
    config = rehearsal.qwen2_config(role, tok, "real")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    with atomic_dir(dest) as tmp:
        save_model(model, tok, tmp)
        rehearsal.publish_config(tmp, kind)
    del model
    return dest


def overrides(sizes: str, models: dict[str, Path], a) -> list[str]:
    if sizes == "tiny":
        return []
    return [
        f"teacher.path={models['teacher']}",
        f"student.path={models['student']}",
        "stages=[generate, filter, train, quantize, draft]",
        f"data.num_prompts={a.prompts}",
        f"generate.max_tokens={a.new_tokens}",
        "generate.n=1",
        "generate.logprobs=20",
        "generate.max_model_len=1024",
        "generate.enforce_eager=false",
        "generate.gpu_memory_utilization=0.45",  # room for the draft's second model and the trainer's leftovers
        # random weights: nothing is right and nothing stops; keep every trace so training has data
        "filter.verifier=none",
        "filter.require_think=false",
        "filter.drop_truncated=false",
        "filter.near_dedupe=false",
        "filter.max_tokens=null",
        f"train.max_steps={a.train_steps}",
        "train.bf16=true",
        "train.max_length=512",
        "train.batch_size=8",
        "train.gradient_accumulation_steps=1",
        "train.logging_steps=5",
        "quantize.formats=[nf4]",
        "draft.num_prompts=8",
        f"draft.max_tokens={a.new_tokens}",
        "draft.max_num_seqs=1",
        "draft.enforce_eager=false",
        "draft.sample_temperature=null",
    ]


def matmul_peak(device: str, dtype) -> float:
    import torch

    n = 8192 if device == "cuda" else 1024
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x @ y
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def transformers_tokens_per_s(teacher: str, prompts: list[str], new_tokens: int, device: str) -> float:
    """Batched `generate` of the same prompts at the same sampling settings, all at once (left padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16).to(device).eval()
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=True, temperature=0.6, top_p=0.95, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.generate(**{k: v[:2] for k, v in enc.items()}, **{**kwargs, "max_new_tokens": 4})  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**enc, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1] :]
    # tokens up to and including the first eos count, as vLLM counts them
    eos = torch.tensor(model.generation_config.eos_token_id or [], device=new.device).flatten()
    done = torch.isin(new, eos).long().cumsum(-1)
    tokens = int(((done == 0) | ((done == 1) & torch.isin(new, eos))).sum())
    del model
    return tokens / seconds


def main(argv: list[str] | None = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", choices=["real", "tiny"], default="real" if cuda else "tiny")
    p.add_argument("--out", default="runs/gpu-check", help="work folder: models, runs, MLflow store, gpu_check.json")
    p.add_argument("--prompts", type=int, default=64, help="real sizes: generation prompts (default 64)")
    p.add_argument("--new-tokens", type=int, default=256, help="real sizes: tokens per completion (default 256)")
    p.add_argument("--train-steps", type=int, default=20, help="real sizes: LoRA steps (default 20)")
    a = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"gpu_check: {a.sizes} sizes on {torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)

    models: dict[str, Path] = {}
    if a.sizes == "real":
        for role in ("teacher", "student"):
            t = time.perf_counter()
            models[role] = build_real(role, out / "models" / role, device)
            print(f"  built {role} in {time.perf_counter() - t:.0f} s: {models[role]}", flush=True)
        if cuda:
            torch.cuda.empty_cache()

    # the pipeline, as a user runs it
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    cli = str(Path(sys.executable).parent / "distillery")
    cmd = [cli, "run", "r1-rehearsal", "--verbose", "--file", str(REPO / "pipelines.yaml")]  # all in pipeline.log
    for item in overrides(a.sizes, models, a):
        cmd += ["--set", item]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    (out / "pipeline.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"gpu_check: the pipeline failed (exit {proc.returncode}); see {out / 'pipeline.log'}", file=sys.stderr)
        print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
        return 1
    pipeline_seconds = time.perf_counter() - t
    run_dir = max((out / "runs" / "r1-rehearsal").glob("2*"), key=lambda d: d.stat().st_mtime)

    def manifest(*parts: str) -> dict:
        return json.loads((run_dir.joinpath(*parts) / "manifest.json").read_text())

    gen, train, nf4 = manifest("generate"), manifest("train"), manifest("quantize", "nf4")
    draft = manifest("draft")["figures"]
    teacher = models.get("teacher") or gen["teacher"].split("@", 1)[1]
    traces = [json.loads(line) for line in (run_dir / "generate" / "traces.jsonl").open()]
    prompts = list(dict.fromkeys(r["prompt_text"] for r in traces))
    budget = gen["sampling"]["max_tokens"]

    vllm_tps = gen["figures"]["tokens_per_s"]
    hf_tps = transformers_tokens_per_s(str(teacher), prompts, budget, device)
    tf = train["figures"]
    peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32)
    mfu = 6 * tf["params"] * tf["tokens_seen"] / max(tf["train_seconds"], 1e-9) / peak
    card = next((v for k, v in CARD_PEAKS.items() if cuda and k in torch.cuda.get_device_name()), None)
    nf = nf4["figures"]
    figures = {
        "sizes": a.sizes,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "prompts": len(prompts),
        "max_new_tokens": budget,
        "vllm_tokens_per_s": vllm_tps,
        "transformers_tokens_per_s": hf_tps,
        "vllm_over_transformers": vllm_tps / hf_tps if hf_tps else None,
        "train_tokens_per_s": tf["train_tokens_per_s"],
        "train_params": tf["params"],
        "train_steps": tf["steps"],
        "mfu_vs_measured_peak": mfu,
        "measured_matmul_peak_flops": peak,
        "mfu_vs_card": 6 * tf["params"] * tf["tokens_seen"] / max(tf["train_seconds"], 1e-9) / card if card else None,
        "nf4_memory_bytes": nf["memory_bytes"],
        "nf4_full_precision_bytes": nf["full_precision_bytes"],
        "nf4_compression": nf["compression"],
        "nf4_peak_bytes": nf["peak_bytes"],
        "draft_tokens_per_step": draft.get("mean_accepted_length"),
        "draft_acceptance_rate": draft.get("acceptance_rate"),
        "draft_speedup": draft.get("speedup"),
        "draft_outputs_identical": draft.get("outputs_identical"),
        "pipeline_seconds": pipeline_seconds,
        "total_seconds": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    nan = float("nan")
    card_mfu = f", {figures['mfu_vs_card']:.1%} of the card's" if card else ""
    rows = [
        ("generation, teacher", f"vLLM {vllm_tps:,.0f} vs transformers {hf_tps:,.0f} tok/s: {vllm_tps / hf_tps:.2f}x"),
        ("LoRA training, student", f"{tf['train_tokens_per_s']:,.0f} tok/s, MFU {mfu:.1%} of measured peak{card_mfu}"),
        (
            "NF4 student",
            f"{nf['memory_bytes'] / 2**20:,.0f} MiB ({nf['compression']:.2f}x smaller than as loaded), "
            f"quantize peak {nf['peak_bytes'] / 2**20:,.0f} MiB",
        ),
        (
            "draft, batch 1" if a.sizes == "real" else "draft",
            f"{draft.get('mean_accepted_length', nan):.2f} tokens per teacher step, speed-up "
            f"{draft.get('speedup', nan):.2f}x, outputs identical: {bool(draft.get('outputs_identical'))}",
        ),
    ]
    print("\n".join(f"  {k:<24} {v}" for k, v in rows))
    print(f"gpu_check: done in {figures['total_seconds']:.0f} s; {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
