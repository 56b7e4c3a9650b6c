"""The chunked distillation loss vs the naive one: peak memory and time for forward + backward, side by side.

    .venv/bin/python bench/kd_loss.py [--vocab 32768] [--hidden 512] [--tokens 4096] [--k 64] [--chunk 512]

Both compute the same top-k logit-KD loss (distillery.losses) from student hidden states through an output
projection of size [hidden, vocab]. Naive: project every position at once ([tokens, vocab] logits, plus the
softmax and its gradient). Chunked: `chunked_kd_from_hidden`, chunk positions at a time under activation
checkpointing. Each variant runs in a fresh process; peak memory is the growth of the process's peak RSS over
its RSS once the inputs exist.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(variant: str, a) -> dict:
    import torch

    from distillery.losses import chunked_kd_from_hidden, topk_kd

    torch.manual_seed(0)
    torch.set_num_threads(2)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False)
    hidden = torch.randn(a.tokens, a.hidden, requires_grad=True)
    labels = torch.randint(0, a.vocab, (a.tokens,))
    top_ids = torch.randint(0, a.vocab, (a.tokens, a.k))
    top_lp = torch.log_softmax(torch.randn(a.tokens, a.k), -1) - 0.1
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "naive":
        loss = topk_kd(head(hidden), top_ids, top_lp, 2.0, labels=labels)
    else:
        loss = chunked_kd_from_hidden(
            hidden, head, None, labels, 2.0, chunk_size=a.chunk, top_ids=top_ids, top_logprobs=top_lp
        )
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "loss": loss.item(),
        "peak_mb": (peak - base) / 1024,
        "seconds": seconds,
        "grad_norm": hidden.grad.norm().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--variant", choices=["naive", "chunked"])
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run(a.variant, a)))
        return
    args = [f"--vocab={a.vocab}", f"--hidden={a.hidden}", f"--tokens={a.tokens}", f"--k={a.k}", f"--chunk={a.chunk}"]
    res = {}
    for v in ("naive", "chunked"):
        out = subprocess.run(
            [sys.executable, __file__, *args, f"--variant={v}"], capture_output=True, text=True, check=True
        )
        res[v] = json.loads(out.stdout.strip().splitlines()[-1])
    n, c = res["naive"], res["chunked"]
    print(
        f"\ntop-k KD loss, forward + backward: {a.tokens} tokens, vocab {a.vocab}, hidden {a.hidden}, k {a.k}, "
        f"chunk {a.chunk}\n"
    )
    print("| variant | peak extra memory MB | seconds | loss |\n|---|---|---|---|")
    for r in (n, c):
        print(f"| {r['variant']} | {r['peak_mb']:.0f} | {r['seconds']:.2f} | {r['loss']:.6f} |")
    print(
        f"\nchunked / naive: memory {c['peak_mb'] / n['peak_mb']:.3f}x, time {c['seconds'] / n['seconds']:.2f}x; "
        f"same loss: {abs(n['loss'] - c['loss']) < 1e-4 * abs(n['loss'])}, "
        f"same grad norm: {abs(n['grad_norm'] - c['grad_norm']) < 1e-3 * n['grad_norm']}"
    )


if __name__ == "__main__":
    main()
