"""Teacher generation throughput: the vLLM engine vs transformers `generate`, same model, prompts and batch.

    .venv/bin/python bench/generation.py [--model demo:teacher] [--prompts 64] [--new-tokens 64] [--n 1]

Both sides decode exactly --new-tokens per sample (eos ignored) greedily from the same prompts, so the token
counts are identical; engine start-up and a warm-up are excluded. Prints one table with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_generate(model_path: str, prompts: list[str], new_tokens: int, batch: int, n: int) -> tuple[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    kw = dict(do_sample=n > 1, num_return_sequences=n, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        model.generate(**tok(prompts[:2], return_tensors="pt", padding=True, add_special_tokens=False),
                       max_new_tokens=4, min_new_tokens=4, **kw)
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:teacher")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="transformers batch size (vLLM schedules itself)")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (sampling when > 1)")
    args = ap.parse_args()

    from distillery.config import DataConfig
    from distillery.data import load_prompts
    from distillery.demo.assets import resolve_model
    from distillery.engines import run_worker

    model = resolve_model(args.model)
    prompts = [p["prompt"] for p in load_prompts(DataConfig(source="demo", num_prompts=args.prompts))]
    sampling = {"n": args.n, "temperature": 1.0 if args.n > 1 else 0.0, "top_p": 1.0, "max_tokens": args.new_tokens,
                "stop": [], "seed": 0, "ignore_eos": True}
    engine = {"dtype": "bfloat16", "max_model_len": 256, "enforce_eager": True, "gpu_memory_utilization": 0.9,
              "tensor_parallel_size": 1, "seed": 0}
    # The worker generates the batch twice in one engine and times the second: start-up and warm-up excluded.
    res = run_worker("bench._vllm_twice", {"model": model, "revision": None, "trust_remote_code": False,
                                           "prompts": prompts, "sampling": sampling, "engine": engine})
    v_tokens, v_seconds = res["tokens"], res["seconds"]
    h_tokens, h_seconds = hf_generate(model, prompts, args.new_tokens, args.batch, args.n)
    rows = [("vLLM engine", v_tokens, v_seconds), ("transformers generate (batched)", h_tokens, h_seconds)]
    print(f"\nmodel {args.model} ({model}); {args.prompts} prompts x n={args.n} x {args.new_tokens} new tokens; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| backend | tokens | seconds | tokens/s | ratio vs transformers |\n|---|---|---|---|---|")
    base = h_tokens / h_seconds
    for name, tok, sec in rows:
        print(f"| {name} | {tok} | {sec:.2f} | {tok / sec:.0f} | {tok / sec / base:.2f}x |")
    print(json.dumps({"vllm_tokens_per_s": v_tokens / v_seconds, "hf_tokens_per_s": base,
                      "ratio": v_tokens / v_seconds / base}))


if __name__ == "__main__":
    main()
