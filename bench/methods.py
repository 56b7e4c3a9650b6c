"""The methods experiment: what each way of learning from the teacher buys, over seeds, with intervals.

    .venv/bin/python bench/methods.py                                   # pipeline demo-methods, every arm
    .venv/bin/python bench/methods.py --arms hard sft logit_kd --data-seeds 5 --init-seeds 2 \\
        --budget short=150 --budget demo=1500
    .venv/bin/python bench/methods.py --arm kd_t4=logit_kd:train.kd.temperature=4   # an arm of your own

The teacher's traces (with top-k logprobs) are generated and filtered once. Then, for every budget (optimizer
steps, the same for every arm), every student-init seed (the random-init student) and every data-order seed
(train.seed), each arm trains the student from the same start with the pipeline's train settings:
  hard      the dataset's answers only, no teacher (question -> "The answer is N")
  sft       SFT on the teacher's sampled traces (sequence-level KD)
  logit_kd  the teacher's stored top-k distribution at every trace token (word-level KD, T²-scaled, mixed with CE)
  gkd       TRL GKD, on-policy: student samples scored by the live teacher, started from the sft arm's student
            of the same seeds (as in the GKD paper), for the budget's steps again
  on_policy TRL DistillationTrainer: every completion the student's own rollout, reverse KL to the live teacher's
            full distribution at each token; from the sft arm's student, for the budget's steps again, as gkd
  feature   hidden states of every student block, projected to the teacher's width, matched to the teacher's at the
            same depth (cosine), plus logit KD on the live teacher's full distribution (train.kd's T and alpha)
  sft_more  the sft arm's student trained by SFT for the budget's steps again: GKD's equal-step control
  dpo       sft, then DPO on pairs of the student's own samples judged by the verifier (its sampling and DPO
            epoch come on top of the budget)
  kd_teacher_b   logit_kd on demo:teacher-b's own top-k at the teacher's trace tokens (the second teacher alone)
  kd_ensemble    logit_kd on the mixture (equal weights) of both teachers' distributions at those tokens: what
                 generate.ensemble.merge average stores
  sft_ensemble   SFT on the verified traces of both teachers (generate.ensemble.merge traces): twice the traces,
                 the same steps
An arm spec NAME=METHOD[@FROM][^TARGETS][:KEY=VALUE,...] adds variants: FROM is an arm whose student it starts
from; TARGETS an arm whose student gives the soft targets instead of the teacher (logit_kd on the teacher's own
traces, with that student's top-k: a teacher-assistant chain); KEY=VALUE are pipeline overrides, e.g.
student.path=demo:student-mid for another student size (demo:student-tiny 0.15M, demo:student 0.28M,
demo:student-mid 1.0M, demo:student-teacher 2.9M: the teacher's own shape, for born-again distillation).

Every model and the teacher are measured the same way, on prompts no model trained on: greedy accuracy on the
in-distribution eval split and on the out-of-distribution split (longer chains), fidelity (the student's
greedy final answer equals the teacher's, in and out of distribution), and teacher-forced NLL per token on
held-out teacher samples; with --shape, also the entropy of its own T=1 samples and how many distinct step orders
and phrasings they use. Each figure is reported as the mean over seeds with a Student-t 95% interval, and as the
paired difference to sft over the same seeds with its interval (what "A beats B" needs).
One MLflow parent run, one child run per (budget, arm, init seed, data seed), all with the same metric names; the
aggregated table and the plot go on the parent, and to --out.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import arms_parser, bench_run, machine, publish, served_teacher, teacher_traces  # noqa: E402 - after the path is set

METRICS = ["accuracy", "ood_accuracy", "fidelity", "ood_fidelity", "heldout_nll"]
SHAPE_METRICS = [
    "entropy_nats_per_token",
    "distinct_order_per_prompt",
    "distinct_closer_per_prompt",
    "gold_trace_share",
]


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    start_from: str | None = None  # an arm whose trained student (same seeds) this one continues
    overrides: tuple[str, ...] = field(default=())
    targets_from: str | None = None  # an arm whose trained student (same seeds) gives the soft targets
    targets_models: tuple[str, ...] = ()  # models whose averaged top-k (distillery.ensemble) are the soft targets
    traces_overrides: tuple[str, ...] = ()  # settings of this arm's own generate + filter (made once per run)


ARMS = {
    a.name: a
    for a in [
        Arm("hard", "hard"),
        Arm("sft", "sft"),
        Arm("logit_kd", "logit_kd"),
        Arm("gkd", "gkd", "sft"),
        Arm("on_policy", "on_policy", "sft", ("train.on_policy.sft_first=false",)),
        Arm("feature", "feature"),
        Arm("sft_more", "sft", "sft"),
        Arm("dpo", "dpo"),
        Arm("kd_teacher_b", "logit_kd", targets_models=("demo:teacher-b",)),
        Arm("kd_ensemble", "logit_kd", targets_models=("demo:teacher", "demo:teacher-b")),
        Arm(
            "sft_ensemble",
            "sft",
            traces_overrides=(
                "generate.ensemble.teachers=[{path: 'demo:teacher-b'}]",
                "generate.ensemble.merge=traces",
            ),
        ),
    ]
}


def parse_arm(spec: str) -> Arm:
    """NAME=METHOD[@FROM][^TARGETS][:KEY=VALUE,...]"""
    try:
        name, rest = spec.split("=", 1)
        head, _, opts = rest.partition(":")
        head, _, targets = head.partition("^")
        method, _, start = head.partition("@")
    except ValueError:
        raise SystemExit(f"--arm {spec!r}: expected NAME=METHOD[@FROM][^TARGETS][:KEY=VALUE,...]") from None
    if targets and method != "logit_kd":
        raise SystemExit(f"--arm {spec!r}: ^TARGETS (another student's soft targets) needs method logit_kd")
    return Arm(name, method, start or None, tuple(o for o in opts.split(",") if o), targets or None)


def assistant_targets(model_paths: list[str], traces: Path, generated: Path, dest: Path) -> Path:
    """The models' top-k logprobs (one model's own, or several averaged: distillery.ensemble, what the generate
    stage stores for generate.ensemble.merge average) on every kept teacher trace, written like the generate
    stage's output (logprobs.parquet + manifest.json) so logit_kd reads them in the teacher's place."""
    import json

    from distillery.artifacts import atomic_dir, read_jsonl
    from distillery.ensemble import load_teachers, mixture_topk
    from distillery.kd import load_logprobs
    from tasks.generate import write_logprobs

    if (dest / "manifest.json").exists():
        return dest
    teachers = load_teachers(model_paths, [False] * len(model_paths), model_paths)
    tok = teachers[0][0]
    stored = load_logprobs(generated.parent / "logprobs.parquet")
    rows = [r for r in read_jsonl(traces) if (r["prompt_id"], r["sample"]) in stored]
    k = len(stored[(rows[0]["prompt_id"], rows[0]["sample"])]["top_ids"][0])
    scored, figures = mixture_topk(
        [m for _, m in teachers],
        None,
        [tok(r.get("prompt_text", r["prompt"]), add_special_tokens=False)["input_ids"] for r in rows],
        [list(stored[(r["prompt_id"], r["sample"])]["token_ids"]) for r in rows],
        k,
        tok.pad_token_id,
        batch_size=32,
    )
    with atomic_dir(dest) as tmp:
        write_logprobs(
            tmp / "logprobs.parquet",
            [{"prompt_id": r["prompt_id"], "sample": r["sample"], **x} for r, x in zip(rows, scored, strict=True)],
        )
        (tmp / "manifest.json").write_text(
            json.dumps(
                {
                    "teacher": model_paths,
                    "logprobs": {"k": k, "mode": "raw_logprobs", "dtype": "float16", "file": "logprobs.parquet"},
                    "figures": figures,
                }
            )
        )
    return dest


def load_merged(files: list[str], pipeline: str, budgets: dict[str, str]) -> list[dict]:
    """The runs of earlier results to pool with this one's; refused when they come from another pipeline or another
    number of steps for a budget of the same name (their seeds would not be comparable)."""
    import json

    runs: list[dict] = []
    for f in files:
        try:
            prior = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge {f}: not a bench/methods result ({e})") from None
        if prior.get("pipeline") != pipeline:
            raise SystemExit(f"--merge {f}: pipeline {prior.get('pipeline')!r}, this run {pipeline!r}")
        for name, steps in prior.get("budgets", {}).items():
            if name in budgets and str(steps) != str(budgets[name]):
                raise SystemExit(f"--merge {f}: budget {name} is {steps} steps there, {budgets[name]} here")
        for r in prior.get("runs", []):
            if r["budget"] not in budgets:
                continue
            if any((r["budget"], r["arm"], r["seed_key"]) == (x["budget"], x["arm"], x["seed_key"]) for x in runs):
                raise SystemExit(f"--merge {f}: {r['budget']}/{r['arm']}/{r['seed_key']} is in two merged results")
            runs.append(r | {"merged_from": Path(f).name})
    return runs


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this machine with torch's threads: the denominator of MFU."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Judge:
    """Measures every model the same way: greedy answers on both eval splits (accuracy, and fidelity to the
    teacher's greedy answers, the first model measured), NLL of held-out teacher traces, optionally its samples."""

    def __init__(self, heldout: list[dict], limit: int | None, shape_prompts: int):
        from distillery.demo import task

        self.evals, self.ood = task.eval_problems()[:limit], task.ood_eval_problems()[:limit]
        self.heldout, self.shape_prompts = heldout, shape_prompts
        self.reference: dict[str, list[str | None]] | None = None  # the teacher's answers

    def measure(self, path: str) -> dict:
        from distillery.demo import profile, task
        from tasks.evaluate import perplexity

        loaded = profile._load(path)
        answers = {
            split: [task.extract_answer(t) for t in profile.greedy_answers(path, probs, loaded=loaded)]
            for split, probs in (("eval", self.evals), ("ood", self.ood))
        }
        self.reference = self.reference or answers
        out = {}
        for split, probs, key in (("eval", self.evals, ""), ("ood", self.ood, "ood_")):
            mine, ref = answers[split], self.reference[split]
            out[f"{key}accuracy"] = sum(a == str(p.answer) for a, p in zip(mine, probs, strict=True)) / len(probs)
            out[f"{key}fidelity"] = sum(a is not None and a == b for a, b in zip(mine, ref, strict=True)) / len(probs)
        if self.heldout:
            tok, model = loaded
            out["heldout_nll"] = math.log(perplexity(model, tok, self.heldout))  # the evaluate stage's, per token
        if self.shape_prompts:
            shape = profile.sampled_profile(path, self.evals[: self.shape_prompts], samples=4, loaded=loaded)
            out.update({k: shape[k] for k in SHAPE_METRICS})
        out["accuracy_stderr"] = math.sqrt(out["accuracy"] * (1 - out["accuracy"]) / len(self.evals))
        return out


def aggregate(results: list[dict], arms: list[str], budgets: list[str], metrics: list[str]) -> list[dict]:
    """Per (budget, arm): each metric's mean and 95% interval over seeds, and its paired difference to sft."""
    from distillery.stats import mean_ci, paired_ci

    rows = []
    for budget in budgets:
        by_arm = {a: {r["seed_key"]: r for r in results if r["budget"] == budget and r["arm"] == a} for a in arms}
        for arm in arms:
            runs = by_arm[arm]
            if not runs:
                continue
            row = {"budget": budget, "arm": arm, "seeds": len(runs)}
            for m in metrics:
                vals = {k: r[m] for k, r in runs.items() if m in r}
                if not vals:
                    continue
                row[m] = mean_ci(list(vals.values())).__dict__
                if "sft" in by_arm and arm != "sft":
                    ref = {k: r[m] for k, r in by_arm["sft"].items() if m in r}
                    if set(ref) & set(vals):
                        row[f"{m}_minus_sft"] = paired_ci(vals, ref).__dict__
            for m in ("steps", "train_seconds", "train_tokens_per_s", "mfu"):
                row[m] = sum(r[m] for r in runs.values()) / len(runs)
            rows.append(row)
    return rows


def paired_rows(
    results: list[dict], pairs: list[tuple[str, str]], budgets: list[str], metrics: list[str]
) -> list[dict]:
    """A minus B for each (A, B), paired over the seeds both ran, per budget and metric."""
    from distillery.stats import paired_ci

    rows = []
    for budget in budgets:
        for x, y in pairs:
            runs = {
                arm: {r["seed_key"]: r for r in results if r["budget"] == budget and r["arm"] == arm} for arm in (x, y)
            }
            row = {"budget": budget, "pair": f"{x} - {y}", "seeds": len(set(runs[x]) & set(runs[y]))}
            for m in metrics:
                vx = {k: r[m] for k, r in runs[x].items() if m in r}
                vy = {k: r[m] for k, r in runs[y].items() if m in r}
                if set(vx) & set(vy):
                    row[m] = paired_ci(vx, vy).__dict__
            rows.append(row)
    return rows


def render_pairs(rows: list[dict]) -> str:
    from tabulate import tabulate

    body = [
        [
            r["budget"],
            r["pair"],
            r["seeds"],
            fmt(r.get("accuracy")),
            fmt(r.get("ood_accuracy")),
            fmt(r.get("fidelity")),
            fmt(r.get("heldout_nll")),
        ]
        for r in rows
    ]
    return tabulate(
        body,
        headers=[
            "budget",
            "paired difference",
            "seeds",
            "Δ accuracy",
            "Δ OOD accuracy",
            "Δ fidelity",
            "Δ held-out NLL",
        ],
        tablefmt="github",
        disable_numparse=True,
    )


def fmt(ci: dict | None, digits: int = 3) -> str:
    if not ci:
        return ""
    if ci["n"] < 2 or math.isnan(ci["low"]):
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} ± {(ci['high'] - ci['low']) / 2:.{digits}f}"


def render(rows: list[dict], teacher: dict) -> str:
    from tabulate import tabulate

    body = [
        [
            r["budget"],
            r["arm"],
            r["seeds"],
            int(r["steps"]),
            fmt(r.get("accuracy")),
            fmt(r.get("accuracy_minus_sft")),
            fmt(r.get("ood_accuracy")),
            fmt(r.get("fidelity")),
            fmt(r.get("ood_fidelity")),
            fmt(r.get("heldout_nll")),
            fmt(r.get("heldout_nll_minus_sft")),
            f"{r['mfu']:.1%}",
        ]
        for r in rows
    ]
    body.append(
        [
            "",
            "teacher",
            1,
            "",
            f"{teacher['accuracy']:.3f}",
            "",
            f"{teacher['ood_accuracy']:.3f}",
            "1",
            "1",
            f"{teacher.get('heldout_nll', float('nan')):.3f}",
            "",
            "",
        ]
    )
    return tabulate(
        body,
        headers=[
            "budget",
            "arm",
            "seeds",
            "steps",
            "accuracy",
            "Δ acc vs sft (paired)",
            "OOD accuracy",
            "fidelity",
            "OOD fidelity",
            "held-out NLL",
            "Δ NLL vs sft",
            "MFU",
        ],
        tablefmt="github",
        disable_numparse=True,
    )


def plot(rows: list[dict], teacher: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets) + 1, 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        sel = [r for r in rows if r["budget"] == budget]
        for offset, key, color in ((-0.18, "accuracy", "#4c72b0"), (0.18, "ood_accuracy", "#dd8452")):
            means = [r[key]["mean"] for r in sel]
            errs = [0 if math.isnan(r[key]["low"]) else (r[key]["high"] - r[key]["low"]) / 2 for r in sel]
            ax.bar(
                [i + offset for i in range(len(sel))],
                means,
                width=0.36,
                yerr=errs,
                capsize=3,
                color=color,
                label="in distribution" if key == "accuracy" else "out of distribution",
            )
        ax.axhline(teacher["accuracy"], color="#c44e52", ls="--", lw=1, label=f"teacher {teacher['accuracy']:.2f}")
        ax.axhline(
            teacher["ood_accuracy"], color="#c44e52", ls=":", lw=1, label=f"teacher OOD {teacher['ood_accuracy']:.2f}"
        )
        ax.set_xticks(range(len(sel)), [r["arm"] for r in sel], rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_title(
            f"budget {budget} ({int(sel[0]['steps'])} steps), mean ± 95% CI over {sel[0]['seeds']} seeds", fontsize=9
        )
        ax.set_ylabel("greedy accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


SHAPE_PANELS = [
    ("entropy_nats_per_token", "entropy of own T=1 samples (nats/token)"),
    ("distinct_order_per_prompt", "distinct step orders per prompt (gold traces, of 4)"),
    ("distinct_closer_per_prompt", "distinct answer phrasings per prompt (gold traces, of 4)"),
    ("gold_trace_share", "share of samples that are gold traces"),
]


def plot_shape(rows: list[dict], teacher: dict):
    """Per arm (each budget a colour): entropy and coverage of the teacher's valid alternatives, mean ± 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    fig, axes = plt.subplots(1, len(SHAPE_PANELS), figsize=(4.2 * len(SHAPE_PANELS), 3.8))
    width = 0.8 / len(budgets)
    for ax, (key, title) in zip(axes, SHAPE_PANELS, strict=True):
        for j, budget in enumerate(budgets):
            sel = {r["arm"]: r for r in rows if r["budget"] == budget and key in r}
            xs = [i + (j - (len(budgets) - 1) / 2) * width for i, arm in enumerate(arms) if arm in sel]
            cis = [sel[arm][key] for arm in arms if arm in sel]
            errs = [0 if math.isnan(c["low"]) else (c["high"] - c["low"]) / 2 for c in cis]
            ax.bar(xs, [c["mean"] for c in cis], width=width, yerr=errs, capsize=3, label=budget)
        if key in teacher:
            ax.axhline(teacher[key], color="#c44e52", ls="--", lw=1, label=f"teacher {teacher[key]:.2f}")
        ax.set_xticks(range(len(arms)), arms, rotation=25, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = arms_parser(__doc__, "methods", "demo-methods", list(ARMS), "train.epochs=1")
    p.add_argument(
        "--arm",
        dest="extra_arms",
        action="append",
        default=[],
        metavar="NAME=METHOD[@FROM][:K=V,...]",
        help="an extra arm (repeatable)",
    )
    p.add_argument("--data-seeds", type=int, default=5, help="data-order seeds per student init (train.seed)")
    p.add_argument("--init-seeds", type=int, default=2, help="random-init students")
    p.add_argument(
        "--init-from", type=int, default=0, metavar="K", help="first init seed (K, K+1, ...): add inits to a result"
    )
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="RESULTS.json",
        help="pool an earlier result's runs (other seeds or arms; same pipeline, same steps) here (repeatable)",
    )
    p.add_argument(
        "--budget",
        dest="budgets",
        action="append",
        default=[],
        metavar="NAME=STEPS",
        help="optimizer steps per arm (repeatable; default short=150 and demo=1500)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of each eval split")
    p.add_argument(
        "--shape",
        type=int,
        default=0,
        metavar="N",
        help="also sample 4 answers on N eval prompts per model: entropy, orders and phrasings used",
    )
    p.add_argument(
        "--pair",
        dest="pairs",
        action="append",
        default=[],
        metavar="A:B",
        help="also report arm A minus arm B, paired over seeds (repeatable; every arm gets A - sft)",
    )
    p.add_argument("--name", default="methods", help="results file stem in --out (default methods)")
    p.add_argument(
        "--serve-teacher",
        choices=["float32", "bfloat16"],
        default=None,
        help="serve the teacher with `distillery serve-model` (no key, loopback) in this dtype for the run; "
        "{teacher_url} in an arm's settings is its address (train.on_policy.teacher_server.base_url={teacher_url})",
    )
    a = p.parse_args(argv)

    from distillery.config import load_pipeline, parse_overrides

    arms = {n: ARMS[n] for n in a.arms} | {x.name: x for x in map(parse_arm, a.extra_arms)}
    if not arms:
        raise SystemExit("no arms: name built-in ones with --arms, or add --arm NAME=METHOD...")
    budgets = dict(b.split("=", 1) for b in (a.budgets or ["short=150", "demo=1500"]))
    merged = load_merged(a.merge, a.pipeline, budgets)
    for arm in arms.values():
        for dep, what in ((arm.start_from, "starts from"), (arm.targets_from, "takes its targets from")):
            if dep and dep not in arms:
                raise SystemExit(f"arm {arm.name} {what} {dep!r}, which is not among the arms")
    known = list(arms) + [r["arm"] for r in merged if r["arm"] not in arms]
    for pair in a.pairs:
        if len(pair.split(":")) != 2 or not set(pair.split(":")) <= set(known):
            raise SystemExit(f"--pair {pair!r}: expected A:B, two of the arms {list(dict.fromkeys(known))}")
    order: list[str] = []  # every arm after the arms it starts from or takes targets from
    while len(order) < len(arms):
        ready = [n for n, x in arms.items() if n not in order and {x.start_from, x.targets_from} - {None} <= set(order)]
        if not ready:
            raise SystemExit(f"arms {sorted(set(arms) - set(order))} depend on each other in a cycle")
        order += ready
    planned = {
        (b, n, f"init{i}-data{d}")
        for b in budgets
        for n in order
        for i in range(a.init_from, a.init_from + a.init_seeds)
        for d in range(a.data_seeds)
    }
    if again := sorted(planned & {(r["budget"], r["arm"], r["seed_key"]) for r in merged}):
        raise SystemExit(f"--merge already has {'/'.join(again[0])} ({len(again)} runs): start at another --init-from")
    cfg = load_pipeline(a.config, a.pipeline, parse_overrides(a.overrides))
    work = Path(a.workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak()
    print(
        f"fp32 matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s; arms {order}; budgets {budgets}; "
        f"{a.init_seeds} init x {a.data_seeds} data-order seeds"
    )
    metrics = METRICS + (SHAPE_METRICS if a.shape else [])

    with contextlib.ExitStack() as stack:
        teacher_url = ""
        if a.serve_teacher:
            teacher_url = stack.enter_context(
                served_teacher(cfg.teacher.path, work / "teacher-server.log", a.serve_teacher)
            )
        elif any("{teacher_url}" in o for x in arms.values() for o in x.overrides):
            raise SystemExit("an arm names {teacher_url}: add --serve-teacher float32 (or bfloat16)")
        arms = {
            n: replace(x, overrides=tuple(o.replace("{teacher_url}", teacher_url) for o in x.overrides))
            for n, x in arms.items()
        }
        return run_arms(a, cfg, arms, order, budgets, merged, metrics, peak, work, out)


def teachers_in(overrides: tuple[str, ...]) -> list[str]:
    """The demo teachers an arm's own trace settings name (generate.ensemble.teachers=[{path: ...}])."""
    import re

    return [m for o in overrides for m in re.findall(r"demo:teacher[\w-]*", o)]


_OWN_TRACES: dict[tuple, str] = {}


def own_traces(arm, a, tracker, parent_id: str, work: Path, heldout: list[dict]) -> str:
    """An arm's kept traces from its own generate + filter settings, made once per run (shards the teacher's
    generation already made are reused from its cache), less every prompt of the judge's held-out traces."""
    from distillery.artifacts import read_jsonl, write_jsonl
    from distillery.config import load_pipeline, parse_overrides

    if arm.traces_overrides not in _OWN_TRACES:
        cfg = load_pipeline(a.config, a.pipeline, parse_overrides([*a.overrides, *arm.traces_overrides]))
        _, kept = teacher_traces(cfg, tracker, parent_id, work / f"traces-{arm.name}")
        held = {r["prompt_id"] for r in heldout}
        path = work / f"traces-{arm.name}" / "train.jsonl"
        write_jsonl(path, [r for r in read_jsonl(Path(kept["path"])) if r["prompt_id"] not in held])
        _OWN_TRACES[arm.traces_overrides] = str(path)
    return _OWN_TRACES[arm.traces_overrides]


def run_arms(a, cfg, arms, order, budgets, merged, metrics, peak, work, out) -> int:
    from distillery.artifacts import read_jsonl
    from distillery.config import load_pipeline, parse_overrides
    from distillery.demo.assets import resolve_model
    from distillery.methods import run_method

    with bench_run(cfg, a, "methods", "methods", out) as (tracker, parent, _include):
        parent.log_params({"arm_order": ",".join(order), "extra_arms": " ".join(a.extra_arms)[:6000]})
        gen, kept = teacher_traces(cfg, tracker, parent.run_id, work)
        heldout = read_jsonl(Path(kept["heldout"])) if kept.get("heldout") else []
        judge = Judge(heldout, a.limit, a.shape)
        with tracker.stage("teacher", parent.run_id) as run:
            teacher = judge.measure(resolve_model(cfg.teacher.path))
            run.log_metrics(teacher)
        others = {}  # the other teachers some arm learns from, measured the same way
        refs = [m for x in arms.values() for m in (*x.targets_models, *teachers_in(x.traces_overrides))]
        for ref in dict.fromkeys(refs):
            if ref != cfg.teacher.path:
                with tracker.stage(f"teacher {ref}", parent.run_id) as run:
                    others[ref] = judge.measure(resolve_model(ref))
                    run.log_metrics(others[ref])
        results: list[dict] = []
        for budget, steps in budgets.items():
            for init in range(a.init_from, a.init_from + a.init_seeds):
                for data in range(a.data_seeds):
                    key = f"init{init}-data{data}"
                    for name in order:
                        arm = arms[name]
                        over = parse_overrides(
                            [
                                *a.overrides,
                                f"train.method={arm.method}",
                                f"train.max_steps={steps}",
                                f"train.seed={data}",
                                *arm.overrides,
                            ]
                        )
                        arm_cfg = load_pipeline(a.config, a.pipeline, over)
                        start = (
                            str(work / budget / key / arm.start_from)
                            if arm.start_from
                            else resolve_model(arm_cfg.student.path, seed=init)
                        )
                        dest = work / budget / key / name
                        generated = gen["path"]
                        if arm.targets_from:  # the assistant's top-k on the teacher's traces, made once per seed
                            generated = str(
                                assistant_targets(
                                    [str(work / budget / key / arm.targets_from)],
                                    Path(kept["path"]),
                                    Path(gen["path"]),
                                    work / budget / key / f"{arm.targets_from}.targets",
                                )
                                / "generations.jsonl"
                            )
                        if arm.targets_models:  # other teachers' (averaged) top-k on the same traces, made once
                            generated = str(
                                assistant_targets(
                                    [resolve_model(m) for m in arm.targets_models],
                                    Path(kept["path"]),
                                    Path(gen["path"]),
                                    work / f"targets-{'+'.join(m.replace(':', '_') for m in arm.targets_models)}",
                                )
                                / "generations.jsonl"
                            )
                        traces = kept["path"]
                        if arm.traces_overrides:
                            traces = own_traces(arm, a, tracker, parent.run_id, work, heldout)
                        print(f"\n=== {budget} {key} {name} ===", flush=True)
                        tags = {"distillery.arm": name, "distillery.budget": budget, "distillery.seed": key}
                        with tracker.stage(f"{budget}/{name}/{key}", parent.run_id, tags=tags) as run:
                            run.log_params(
                                {
                                    "method": arm.method,
                                    "arm": name,
                                    "budget": budget,
                                    "init_seed": init,
                                    "data_seed": data,
                                    "start_from": arm.start_from or "init",
                                    "targets_from": arm.targets_from or "teacher",
                                    "student": arm_cfg.student.path,
                                    **arm_cfg.train.model_dump(),
                                }
                            )
                            figs = run_method(arm_cfg, start, traces, generated, dest)
                            for k in ("steps", "tokens_seen", "train_seconds"):  # dpo: its SFT phase counts too
                                figs[k] = figs.get(f"total_{k}", figs[k])
                            figs["train_tokens_per_s"] = figs["tokens_seen"] / max(figs["train_seconds"], 1e-9)
                            figs["mfu"] = (
                                6 * figs["params"] * figs["tokens_seen"] / max(figs["train_seconds"], 1e-9) / peak
                            )
                            figs.update(judge.measure(str(dest)))
                            run.log_metrics({k: v for k, v in figs.items() if isinstance(v, int | float)})
                            results.append(
                                {"budget": budget, "arm": name, "seed_key": key, "run_id": run.run_id, **figs}
                            )
        every = merged + results
        order += [n for n in dict.fromkeys(r["arm"] for r in merged) if n not in order]
        rows = aggregate(every, order, list(budgets), metrics)
        table = render(rows, teacher)
        for ref, figs in others.items():
            table += f"\n\n{ref}: " + ", ".join(f"{k} {v:.3f}" for k, v in figs.items())
        pairs = paired_rows(every, [tuple(x.split(":")) for x in a.pairs], list(budgets), metrics)
        if pairs:
            table += "\n\n" + render_pairs(pairs)
        print("\n" + table)
        summary = {
            "pipeline": a.pipeline,
            "overrides": a.overrides,
            "budgets": budgets,
            "arms": order,
            "init_seeds": a.init_seeds,
            "init_from": a.init_from,
            "data_seeds": a.data_seeds,
            "merged": a.merge,
            "teacher": teacher,
            "other_teachers": others,
            "rows": rows,
            "pairs": pairs,
            "runs": [{k: v for k, v in r.items() if isinstance(v, int | float | str)} for r in every],
            "matmul_peak_flops": peak,
            "machine": machine(),
            "mlflow_parent_run": parent.run_id,
        }
        publish(out, a.name, summary, table, plot(rows, teacher), parent)
        if a.shape:  # the shape of each arm's own distribution: entropy and how many valid alternatives it uses
            import matplotlib.pyplot as plt

            fig = plot_shape(rows, teacher)
            fig.savefig(out / f"{a.name}-shape.png", dpi=110)
            parent.log_figure(fig, f"{a.name}-shape.png")
            plt.close(fig)
        parent.log_metrics(
            {f"{m}.{r['budget']}.{r['arm']}": r[m]["mean"] for r in rows for m in metrics if m in r}
            | {f"{m}.teacher": v for m, v in teacher.items()}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
