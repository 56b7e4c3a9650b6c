"""Teacher generation: the vLLM engine vs transformers `generate` (batched and one prompt at a time), same
model, prompts and lengths, side by side; and the bytes per token that stored top-k logprobs cost.

    .venv/bin/python bench/generation.py --model demo:teacher
    .venv/bin/python bench/generation.py --model demo:large --one-by-one 16

Every side decodes exactly --new-tokens per sample (eos ignored), greedy, from the same prompts, so token counts
are identical; engine start-up and a warm-up are excluded. `demo:large` is a random-init 28M-parameter Llama on
the demo tokenizer (throughput does not depend on what the weights know), built into the cache on first use.
Logprob storage: the same prompts with k = 5, 20, 64 top logprobs per token, written in the pipeline's parquet
format (fp16 logprobs, int32 ids, zstd), size / generated tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LARGE_SHAPE = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
)


def resolve(ref: str) -> str:
    from distillery.demo import assets

    if ref != "demo:large":
        return assets.resolve_model(ref)
    dest = assets.cache_dir() / "demo" / "large-random"
    if not (dest / "config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(assets.TEACHER_DIR)
        assets.save_atomic(assets.init_model(LARGE_SHAPE, tok, seed=0), tok, dest)
    return str(dest)


def hf_generate(model_path: str, prompts: list[str], new_tokens: int, batch: int) -> tuple[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        model.generate(
            **tok(prompts[:2], return_tensors="pt", padding=True, add_special_tokens=False),
            max_new_tokens=4,
            min_new_tokens=4,
            **kw,
        )
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:teacher", help="demo:teacher, demo:large, or a local model folder")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="transformers batch size (vLLM schedules itself)")
    ap.add_argument("--one-by-one", type=int, default=16, help="prompts for the batch-size-1 transformers run")
    ap.add_argument("--logprobs", default="5,20,64", help="top-k values whose storage cost is measured")
    args = ap.parse_args()

    from distillery.config import DataConfig
    from distillery.data import load_prompts
    from distillery.engines import VLLMEngine
    from tasks.generate import write_logprobs

    model = resolve(args.model)
    n_params = sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters()
    )
    prompts = [p["prompt"] for p in load_prompts(DataConfig(source="demo", num_prompts=args.prompts))]
    sampling = {
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": args.new_tokens,
        "stop": [],
        "logprobs": 0,
        "ignore_eos": True,
    }
    engine = VLLMEngine(
        {
            "model": model,
            "dtype": "bfloat16",
            "max_model_len": 256,
            "enforce_eager": True,
            "gpu_memory_utilization": 0.9,
            "tensor_parallel_size": 1,
            "seed": 0,
            "max_logprobs": max([20, *(int(x) for x in args.logprobs.split(",") if x)]),
        }
    )
    storage = {}
    try:
        engine.generate(prompts, sampling)  # warm-up
        res = engine.generate(prompts, sampling)
        v_tokens = sum(s["num_tokens"] for p in res["samples"] for s in p)
        v_seconds = res["seconds"]
        for k in [int(x) for x in args.logprobs.split(",") if x]:
            out = engine.generate(prompts, {**sampling, "logprobs": k})
            rows = [
                {
                    "prompt_id": str(i),
                    "sample": 0,
                    **{c: s[c] for c in ("token_ids", "token_logprobs", "top_ids", "top_logprobs")},
                }
                for i, p in enumerate(out["samples"])
                for s in p
            ]
            path = Path(tempfile.mkdtemp()) / "lp.parquet"
            write_logprobs(path, rows)
            storage[k] = path.stat().st_size / sum(len(r["token_ids"]) for r in rows)
    finally:
        engine.close()
    h_tokens, h_seconds = hf_generate(model, prompts, args.new_tokens, args.batch)
    o_tokens, o_seconds = hf_generate(model, prompts[: args.one_by_one], args.new_tokens, 1)
    base = h_tokens / h_seconds
    rows = [
        ("vLLM engine", v_tokens, v_seconds),
        (f"transformers, batch {args.batch}", h_tokens, h_seconds),
        ("transformers, one prompt at a time", o_tokens, o_seconds),
    ]
    print(
        f"\nmodel {args.model} ({n_params / 1e6:.1f}M params); {args.prompts} prompts x {args.new_tokens} new "
        f"tokens, greedy, bf16; {platform.machine()}, {os.cpu_count()} cores\n"
    )
    print("| backend | tokens | seconds | tokens/s | vs transformers batched |\n|---|---|---|---|---|")
    for name, tok, sec in rows:
        print(f"| {name} | {tok} | {sec:.2f} | {tok / sec:.0f} | {tok / sec / base:.2f}x |")
    if storage:
        print("\n| top-k logprobs | bytes per generated token |\n|---|---|")
        for k, b in storage.items():
            print(f"| {k} | {b:.1f} |")
    print(
        json.dumps(
            {
                "model": args.model,
                "params": n_params,
                "vllm_tokens_per_s": v_tokens / v_seconds,
                "hf_batched_tokens_per_s": base,
                "hf_one_by_one_tokens_per_s": o_tokens / o_seconds,
                "logprob_bytes_per_token": storage,
            }
        )
    )


if __name__ == "__main__":
    main()
