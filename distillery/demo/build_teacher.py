"""Build the demo kit: tokenizer, eval split, and the demo teacher (trained here, on gold traces).

    python -m distillery.demo.build_teacher [--examples 40000] [--epochs 2]

Writes distillery/demo/assets/teacher (safetensors + tokenizer) and evals/demo_arith/test.jsonl. The result is
committed, so `make demo` never trains the teacher; re-run this only to change the demo task.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from distillery.artifacts import write_jsonl
from distillery.demo import assets, task

REPO = Path(__file__).resolve().parents[2]
EVAL_FILE = REPO / "evals" / "demo_arith" / "test.jsonl"


def greedy_accuracy(model_path: str, problems: list[task.Problem], max_new_tokens: int = 48) -> float:
    """Quick greedy check used while building; the pipeline's own numbers come from lm-eval."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    correct = 0
    for i in range(0, len(problems), 64):
        batch = problems[i : i + 64]
        enc = tok([p.question for p in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(task.extract_answer(t) == str(p.answer) for t, p in zip(texts, batch, strict=True))
    return correct / len(problems)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=40000, help="gold traces the teacher trains on")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from tasks.train import SFTParams, sft

    evals = task.eval_problems()
    write_jsonl(EVAL_FILE, [{"question": p.question, "answer": str(p.answer)} for p in evals])
    gold = list(task.problems(seed=7, count=args.examples, exclude={p.question for p in evals}))
    corpus = [p.question + p.trace for p in gold[:5000]]
    tokenizer = assets.build_tokenizer(corpus)
    tokenizer.chat_template = assets.DEMO_CHAT_TEMPLATE
    work = Path(tempfile.mkdtemp(prefix="distillery-teacher-"))
    init = assets.save_atomic(assets.init_model(assets.TEACHER_SHAPE, tokenizer, args.seed), tokenizer,
                              work / "init")
    params = SFTParams(epochs=args.epochs, learning_rate=args.lr, batch_size=64, max_steps=args.max_steps,
                       seed=args.seed, logging_steps=50, warmup_ratio=0.03)
    figures = sft(str(init), [p.as_record() for p in gold], work / "trained", params)
    acc = greedy_accuracy(str(work / "trained"), evals)
    print(json.dumps({**figures, "eval_accuracy": acc}, indent=2))
    dest = assets.TEACHER_DIR
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(work / "trained", dest, ignore=shutil.ignore_patterns("manifest.json"))
    (dest / "demo_teacher.json").write_text(json.dumps(
        {"examples": args.examples, "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
         "eval_accuracy_greedy": acc, **figures}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
