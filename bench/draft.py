"""The draft benchmark: a generic small model vs the distilled draft, as the teacher's speculative-decoding draft.

    .venv/bin/python bench/draft.py                       # pipeline demo-draft, every arm
    .venv/bin/python bench/draft.py --arms generic distilled --set draft.num_prompts=16

Every arm is the same student architecture and size, from the same random init, with the same training budget:
  generic               trained on the teacher's own training data (gold reasoning traces for the same prompts),
                        never on the teacher's outputs: the demo's stand-in for an off-the-shelf small model of
                        the teacher's family (same tokenizer, same data, no distillation)
  distilled             SFT on the teacher's filtered traces (the pipeline's train stage)
  generic+distillspec   generic, then DistillSpec (draft.distill: on-policy draft samples, the teacher's full
                        distribution, forward KL; TRL DistillationTrainer)
  distilled+sft         distilled, then as many more SFT steps on the traces as DistillSpec takes (same batch
                        size and learning rate): the equal-compute control for the DistillSpec arms
  distilled+distillspec distilled, then the same DistillSpec steps
  eagle3                no student: an EAGLE-3 head (draft.kind eagle3, draft.eagle3's settings) trained on the
                        teacher's hidden states over its generated samples, served by vLLM's EAGLE-3 proposer
--seeds N repeats every arm with train.seed and draft.eagle3.seed 0..N-1 (the student init, data order and the
head's init); the table then gives each arm's mean with a Student-t 95% interval over seeds, and each arm minus
the first, paired over seeds. The teacher's traces and its own greedy run are made once for all.
Each arm is measured as the teacher's draft on the same held-out prompts: vLLM greedy speculative decoding
(acceptance rate, per position, mean accepted length, tokens/s against the teacher alone, outputs identical) and
transformers speculative sampling at draft.sample_temperature (acceptance, speed-up; not for eagle3: transformers
cannot run an EAGLE head). One MLflow parent run
("draft-bench"), one child per arm with the same metric names; the table and plot go on the parent and to --out.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import arms_parser, bench_run, machine, publish, teacher_traces  # noqa: E402 - after the path is set

ARMS = ["generic", "generic+distillspec", "distilled", "distilled+sft", "distilled+distillspec", "eagle3"]
PAIRED = ["acceptance_rate", "mean_accepted_length"]  # the counts; speed on 2 CPU cores says little (BENCHMARKS.md)
COLUMNS = [
    "acceptance_rate",
    "mean_accepted_length",
    "speedup",
    "sampled_acceptance_rate",
    "sampled_mean_accepted_length",
    "sampled_speedup",
]


def gold_records(cfg, count: int) -> list[dict]:
    """Gold traces (question -> the generator's reasoning and answer) for the pipeline's own prompts: the data the
    demo teacher itself was trained on, never its outputs."""
    from distillery.artifacts import read_jsonl
    from distillery.data import DEMO_EVAL_FILE
    from distillery.demo import task

    if cfg.data.source != "demo":
        raise SystemExit("bench/draft.py: the generic arm needs gold traces, which only data.source: demo has")
    held_out = {r["question"] for r in read_jsonl(DEMO_EVAL_FILE)}
    return [p.as_record() for p in task.problems(seed=10_000 + cfg.data.seed, count=count, exclude=held_out)]


def plot(rows: list[dict], k: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["arm"] for r in rows]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["acceptance_rate"] for r in rows], 0.4, label="greedy (vLLM)")
    left.bar(
        [i + 0.2 for i in x], [r.get("sampled_acceptance_rate", 0) for r in rows], 0.4, label="sampled (transformers)"
    )
    left.set_xticks(list(x), names, rotation=15)
    left.set_ylim(0, 1)
    left.set_ylabel("draft acceptance rate")
    left.legend(loc="lower right")
    for r in rows:
        right.plot(
            range(1, k + 1),
            [r.get(f"acceptance_pos_{i}", float("nan")) for i in range(1, k + 1)],
            marker="o",
            label=r["arm"],
        )
    right.set_xticks(range(1, k + 1))
    right.set_xlabel("draft position")
    right.set_ylabel("share of steps accepting it (greedy)")
    right.set_ylim(0, 1.02)
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("generic vs distilled draft for the demo teacher")
    fig.tight_layout()
    return fig


def render(rows: list[dict]) -> str:
    from tabulate import tabulate

    body = [
        [
            r["arm"],
            r["train_steps"],
            f"{r['acceptance_rate']:.3f}",
            f"{r['mean_accepted_length']:.2f}",
            f"{r['speedup']:.2f}×",
            f"{r.get('sampled_acceptance_rate', float('nan')):.3f}",
            f"{r.get('sampled_mean_accepted_length', float('nan')):.2f}",
            f"{r.get('sampled_speedup', float('nan')):.2f}×",
            f"{r.get('accuracy', float('nan')):.3f}",
        ]
        for r in rows
    ]
    return tabulate(
        body,
        headers=[
            "draft",
            "train steps",
            "greedy acceptance",
            "tokens/step",
            "greedy speed-up",
            "sampled acceptance",
            "tokens/step",
            "sampled speed-up",
            "draft accuracy",
        ],
        tablefmt="github",
    )


def run_arm(arm: str, seed: int, cfg, b: SimpleNamespace) -> None:
    """One arm at one seed (`cfg` carries the seed), a child run of the parent; `b`: what every arm shares, and
    where results and the teacher's own run (made once) are kept."""
    from distillery.demo.assets import resolve_model
    from distillery.methods import params_from, sft
    from tasks.draft import measure_draft
    from tasks.evaluate import evaluate_model

    base, _, extra = arm.partition("+")
    key = arm.replace("+", "-") + (f"-seed{seed}" if b.a.seeds > 1 else "")  # MLflow names take no '+'
    print(f"\n=== arm {arm}, seed {seed} ===", flush=True)
    with b.tracker.stage(key, b.parent_id, tags={"distillery.arm": arm, "distillery.seed": str(seed)}) as run:
        if arm == "eagle3":  # a head on the teacher: no student, no SFT
            arm_cfg = cfg.model_copy(update={"draft": cfg.draft.model_copy(update={"kind": "eagle3", "distill": None})})
            run.log_params({"base": "teacher", "extra": "eagle3", **arm_cfg.draft.model_dump()})
            m = measure_draft(
                b.teacher, None, b.prompts, arm_cfg, b.work / f"draft-{key}", alone=b.alone, traces=b.gen["path"]
            )
            figs = {**m["figures"], "train_steps": m["figures"]["eagle3_steps"]}
        else:
            if (base, seed) not in b.bases:  # the student's random init follows the seed too
                student = resolve_model(cfg.student.path, seed=cfg.train.seed)
                b.bases[(base, seed)] = sft(
                    student, b.data[base], b.work / f"{base}-seed{seed}", params_from(cfg), where=f"train ({base})"
                )
            model, steps = b.work / f"{base}-seed{seed}", b.bases[(base, seed)]["steps"]
            if extra == "sft":  # the equal-compute control: DistillSpec's steps, spent on more SFT instead
                dd = cfg.draft.distill
                more = replace(
                    params_from(cfg),
                    learning_rate=dd.learning_rate,
                    batch_size=dd.batch_size,
                    max_steps=dd.steps,
                    warmup_ratio=0.0,
                )
                steps += sft(str(model), b.data[base], b.work / key, more, where="train (more sft)")["steps"]
                model = b.work / key
            keep = extra == "distillspec"
            arm_cfg = cfg if keep else cfg.model_copy(update={"draft": cfg.draft.model_copy(update={"distill": None})})
            run.log_params({"base": base, "extra": extra or "none", **arm_cfg.draft.model_dump()})
            m = measure_draft(b.teacher, str(model), b.prompts, arm_cfg, b.work / f"draft-{key}", alone=b.alone)
            ev = evaluate_model(m["draft"], cfg.evaluate, b.include, b.speed_prompts)
            figs = {
                **m["figures"],
                "accuracy": ev["figures"]["accuracy"],
                "train_steps": steps + int(m["figures"].get("distill_steps", 0)),
            }
        run.log_metrics(figs)
        b.results[(arm, seed)] = figs
        b.alone = m["alone"]


def mean_rows(rows: list[dict], arms: list[str]) -> list[dict]:
    """One row per arm, each figure its mean over seeds (what the plot shows)."""
    out = []
    for arm in arms:
        runs = [r for r in rows if r["arm"] == arm]
        keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and all(k in r for r in runs)]
        out.append({"arm": arm, **{k: sum(r[k] for r in runs) / len(runs) for k in keys}})
    return out


def summarize(rows: list[dict], arms: list[str]) -> list[dict]:
    """Per arm: mean and 95% interval over seeds of each column; for every arm after the first, its paired
    difference to the first arm (same seeds) for the acceptance counts."""
    from distillery.stats import mean_ci, paired_ci

    by = {arm: {r["seed"]: r for r in rows if r["arm"] == arm} for arm in arms}
    out = []
    for arm in arms:
        runs = by[arm]
        row = {"arm": arm, "seeds": len(runs)}
        for c in [*COLUMNS, "accuracy", "train_steps"]:
            vals = [r[c] for r in runs.values() if c in r]
            if len(vals) == len(runs):
                row[c] = mean_ci(vals).__dict__
        if arm != arms[0]:
            for c in PAIRED:
                row[f"{c}_minus_{arms[0]}"] = paired_ci(
                    {s: r[c] for s, r in runs.items()}, {s: r[c] for s, r in by[arms[0]].items()}
                ).__dict__
        out.append(row)
    return out


def render_seeds(summary: list[dict]) -> str:
    from tabulate import tabulate

    from distillery.stats import Interval

    def cell(row, key):
        return str(Interval(**row[key])) if key in row else "—"

    first = summary[0]["arm"]
    body = [
        [
            r["arm"],
            r["seeds"],
            cell(r, "acceptance_rate"),
            cell(r, "mean_accepted_length"),
            cell(r, "speedup"),
            cell(r, "sampled_acceptance_rate"),
            cell(r, f"acceptance_rate_minus_{first}"),
            cell(r, f"mean_accepted_length_minus_{first}"),
        ]
        for r in summary
    ]
    return tabulate(
        body,
        headers=[
            "draft",
            "seeds",
            "greedy acceptance",
            "tokens/step",
            "greedy speed-up",
            "sampled acceptance",
            f"acceptance − {first}",
            f"tokens/step − {first}",
        ],
        tablefmt="github",
    )


def main(argv: list[str] | None = None) -> int:
    p = arms_parser(__doc__, "draft", "demo-draft", ARMS, "draft.distill.steps=100")
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm (train.seed, draft.eagle3.seed 0..N-1)")
    a = p.parse_args(argv)
    if not a.arms:
        raise SystemExit("--arms: name at least one arm")

    from distillery.config import load_pipeline, parse_overrides
    from distillery.demo.assets import resolve_model
    from distillery.training import training_records
    from tasks.draft import draft_prompts
    from tasks.evaluate import throughput_prompts

    cfg = load_pipeline(a.config, a.pipeline, parse_overrides(a.overrides))
    if cfg.draft.distill is None and any("+" in arm for arm in a.arms):
        raise SystemExit(f"bench/draft.py: pipeline {a.pipeline} has no draft.distill section for the distillspec arms")
    work = Path(a.workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = resolve_model(cfg.teacher.path)
    prompts = draft_prompts(cfg, teacher)
    speed_prompts = throughput_prompts(cfg)

    with bench_run(cfg, a, "draft-bench", "draft", out) as (tracker, parent, include):
        gen, kept = teacher_traces(cfg, tracker, parent.run_id, work)
        from distillery.artifacts import read_jsonl

        traces = read_jsonl(Path(kept["path"]))
        chat = cfg.data.chat_template
        # Same number of examples for both bases, so the same number of optimizer steps.
        data = {
            "generic": training_records(gold_records(cfg, len(traces)), chat),
            "distilled": training_records(traces, chat),
        }
        b = SimpleNamespace(
            a=a, work=work, teacher=teacher, prompts=prompts, speed_prompts=speed_prompts, include=include, gen=gen,
            data=data, bases={}, results={}, tracker=tracker, parent_id=parent.run_id, alone=None,
        )  # fmt: skip
        for seed in range(a.seeds):
            scfg = cfg.model_copy(
                update={
                    "train": cfg.train.model_copy(update={"seed": cfg.train.seed + seed}),
                    "draft": cfg.draft.model_copy(
                        update={"eagle3": cfg.draft.eagle3.model_copy(update={"seed": cfg.draft.eagle3.seed + seed})}
                    ),
                }
            )
            for arm in a.arms:
                run_arm(arm, seed, scfg, b)
        results = b.results
        rows = [{"arm": arm, "seed": seed, **f} for (arm, seed), f in results.items()]
        table = render(rows) if a.seeds == 1 else render_seeds(summarize(rows, a.arms))
        print("\n" + table)
        summary = {
            "pipeline": a.pipeline,
            "overrides": a.overrides,
            "rows": rows,
            "seeds": a.seeds,
            "summary": summarize(rows, a.arms) if a.seeds > 1 else None,
            "num_speculative_tokens": cfg.draft.num_speculative_tokens,
            "prompts": len(prompts),
            "machine": machine(),
            "mlflow_parent_run": parent.run_id,
        }
        publish(out, "draft", summary, table, plot(mean_rows(rows, a.arms), cfg.draft.num_speculative_tokens), parent)
        parent.log_metrics(
            {f"{c}.{r['arm'].replace('+', '-')}.seed{r['seed']}": r[c] for r in rows for c in COLUMNS if c in r}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
