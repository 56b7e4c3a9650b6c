"""Build the demo kit: tokenizer, eval splits, and the demo teacher (trained here, on gold traces).

    python -m distillery.demo.build_teacher [--examples 40000] [--epochs 2]
    python -m distillery.demo.build_teacher --continue-from distillery/demo/assets/teacher --data-seed 8 --lr 1e-3 \
    --stop-in 0.87 0.93

The committed teacher is the second command run after the first (17 and 10 minutes on 2 cores): 2 epochs on
40,000 gold traces from random init (greedy accuracy 0.785), then training on 40,000 new ones at half the
learning rate until greedy accuracy on 100 dev problems lies in [0.87, 0.93] (750 steps; 0.915 on the eval split).
Run to the end, the second phase reaches 0.98, which leaves students no room to differ.

`demo:teacher-b`, the second teacher of several-teacher distillation (same tokenizer), is the committed teacher
trained on 250 steps of other problems at twice the learning rate:
    python -m distillery.demo.build_teacher --continue-from distillery/demo/assets/teacher --data-seed 9 --lr 2e-3 \
    --epochs 1 --max-steps 250 --seed 1 --out distillery/demo/assets/teacher-b

Writes distillery/demo/assets/teacher (safetensors + tokenizer), evals/demo_arith/test.jsonl (in distribution)
and evals/demo_arith_ood/test.jsonl (names and items training never uses), then prints what the teacher gives
(`distillery.demo.profile`: accuracy in and out of distribution, entropy and top-1 mass on its own T = 1
samples) and records it in demo_teacher.json. The result is committed, so `make demo` never trains the teacher;
re-run this only to change the demo task.
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
OOD_FILE = REPO / "evals" / "demo_arith_ood" / "test.jsonl"


def eval_rows(problems: list[task.Problem]) -> list[dict]:
    return [{"question": p.question, "answer": str(p.answer), "kind": p.kind} for p in problems]


# The problems the build checks its accuracy on while training: never eval ones (2 of the 100 happen to share a
# question with the 80,000 training problems).
DEV_SEED = 2024


def accuracy_stop(tokenizer_path: str, band: tuple[float, float], every: int, log: list):
    """A callback that checks greedy accuracy on 100 dev problems every `every` steps and stops training as soon
    as it is inside `band`: the demo teacher must leave its students room (in-distribution accuracy 85-95%)."""
    from transformers import AutoTokenizer, TrainerCallback

    from distillery.demo import profile

    tok = AutoTokenizer.from_pretrained(tokenizer_path, padding_side="left")
    held = {p.question for p in task.eval_problems()}
    dev = list(task.problems(seed=DEV_SEED, count=100, exclude=held))

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every:
                return
            model.eval()
            acc = profile.accuracy(profile.greedy_answers("", dev, loaded=(tok, model)), dev)
            model.train()
            log.append({"step": state.global_step, "dev_accuracy": acc})
            print(f"step {state.global_step}: dev accuracy {acc:.2f}", flush=True)
            if band[0] <= acc <= band[1]:
                control.should_training_stop = True

    return Stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=40000, help="gold traces the teacher trains on")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=7, help="seed of the training problems")
    ap.add_argument(
        "--continue-from",
        type=Path,
        default=None,
        help="a teacher to train further (its tokenizer is kept) instead of a random init",
    )
    ap.add_argument(
        "--stop-in",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="stop as soon as greedy accuracy on 100 dev problems is within [LOW, HIGH]",
    )
    ap.add_argument("--check-every", type=int, default=50, help="steps between those checks")
    ap.add_argument(
        "--tokenizer-from",
        type=Path,
        default=None,
        help="start from random init on this model's tokenizer (a second teacher that shares the first's vocab)",
    )
    ap.add_argument("--out", type=Path, default=assets.TEACHER_DIR, help="where the teacher goes")
    args = ap.parse_args(argv)

    from distillery.demo.profile import profile
    from distillery.methods import sft
    from distillery.training import SFTParams

    evals, ood = task.eval_problems(), task.ood_eval_problems()
    write_jsonl(EVAL_FILE, eval_rows(evals))
    write_jsonl(OOD_FILE, eval_rows(ood))
    gold = list(task.problems(seed=args.data_seed, count=args.examples, exclude={p.question for p in evals}))
    work = Path(tempfile.mkdtemp(prefix="distillery-teacher-"))
    previous = []
    if args.continue_from:
        init = work / "init"
        shutil.copytree(args.continue_from, init)
        meta = init / "demo_teacher.json"
        if meta.exists():
            prior = json.loads(meta.read_text())
            previous = [*prior.pop("previous", []), prior]
    else:
        if args.tokenizer_from:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from)
        else:
            tokenizer = assets.build_tokenizer([p.question + p.trace for p in gold[:5000]])
            tokenizer.chat_template = assets.DEMO_CHAT_TEMPLATE
        init = assets.save_atomic(
            assets.init_model(assets.TEACHER_SHAPE, tokenizer, args.seed), tokenizer, work / "init"
        )
    params = SFTParams(
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=64,
        max_steps=args.max_steps,
        seed=args.seed,
        logging_steps=50,
        warmup_ratio=0.03,
    )
    checks: list[dict] = []
    callbacks = [accuracy_stop(str(init), tuple(args.stop_in), args.check_every, checks)] if args.stop_in else []
    figures = sft(str(init), [p.as_record() for p in gold], work / "trained", params, callbacks=callbacks)
    measured = profile(str(work / "trained"), samples=2)
    print(json.dumps({**figures, **measured}, indent=2))
    dest = args.out
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(work / "trained", dest, ignore=shutil.ignore_patterns("manifest.json"))
    (dest / "demo_teacher.json").write_text(
        json.dumps(
            {
                "examples": args.examples,
                "epochs": args.epochs,
                "lr": args.lr,
                "seed": args.seed,
                "data_seed": args.data_seed,
                "continued_from": str(args.continue_from) if args.continue_from else None,
                "tokenizer_from": str(args.tokenizer_from) if args.tokenizer_from else None,
                "stop_in": args.stop_in,
                "dev_checks": checks,
                "eval_accuracy_greedy": measured["accuracy"],
                **measured,
                **figures,
                "previous": previous,
            },
            indent=2,
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
