"""Worker for bench/generation.py: one engine, the batch generated twice, the second timed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    from vllm import LLM, SamplingParams

    e, s = spec["engine"], spec["sampling"]
    llm = LLM(model=spec["model"], dtype=e["dtype"], max_model_len=e["max_model_len"],
              enforce_eager=e["enforce_eager"], seed=e["seed"])
    params = SamplingParams(n=s["n"], temperature=s["temperature"], top_p=s["top_p"], max_tokens=s["max_tokens"],
                            ignore_eos=s["ignore_eos"])
    llm.generate(spec["prompts"], params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(spec["prompts"], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for r in outs for o in r.outputs)
    Path(spec["result_file"]).write_text(json.dumps({"tokens": tokens, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1])
