"""The methods experiment: what each way of learning from the teacher buys, at one student size and one budget.

    .venv/bin/python bench/methods.py                       # pipeline demo-methods, every arm
    .venv/bin/python bench/methods.py --arms hard sft --set train.epochs=1

The teacher's traces (with top-k logprobs) are generated and filtered once; then the same random-init student is
trained by each arm with the pipeline's train settings (same prompts, epochs, batch size, learning rate, so the
same number of optimizer steps):
  hard      the dataset's answers only, no teacher (question -> "The answer is N")
  sft       SFT on the teacher's reasoning traces (sequence-level KD)
  logit_kd  the teacher's stored top-k distribution at every trace token (T^2-scaled, mixed with CE)
  gkd       TRL GKD: on-policy student samples scored by the live teacher (generalized JSD)
  dpo       sft, then DPO on pairs of the student's own samples judged by the verifier (extra compute: the
            sampling and the DPO epoch come on top of the sft budget)
Every arm and the teacher are evaluated the same way (lm-eval, pipeline's evaluate settings). Reported: accuracy
± stderr, the share of the teacher gap recovered, (arm - hard) / (teacher - hard), training tokens/s, and the
model FLOPs utilisation: 6 * params * training tokens / seconds over this machine's measured fp32 matmul peak.
One MLflow parent run ("methods"), one child per arm (same metric names, for the compare view); the table and a
plot go on the parent, and to --out.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import arms_parser, bench_run, machine, publish, teacher_traces  # noqa: E402 - after the path is set

ARMS = ["hard", "sft", "logit_kd", "gkd", "dpo"]


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


def gap_recovered(arm: float, hard: float, teacher: float, s_arm: float, s_hard: float, s_teacher: float):
    """(arm - hard) / (teacher - hard) and its stderr by the delta method (independent evaluations)."""
    gap = teacher - hard
    if gap <= 0:
        return float("nan"), float("nan")
    g = (arm - hard) / gap
    var = (s_arm / gap) ** 2 + (s_hard * (arm - teacher) / gap**2) ** 2 + (s_teacher * (arm - hard) / gap**2) ** 2
    return g, math.sqrt(var)


def matplotlib_close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot(rows: list[dict], teacher: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["arm"] for r in rows]
    ax.bar(names, [r["accuracy"] for r in rows], yerr=[r["stderr"] for r in rows], capsize=4, color="#4c72b0")
    ax.axhline(teacher["accuracy"], color="#c44e52", ls="--", label=f"teacher {teacher['accuracy']:.3f}")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['accuracy']:.3f}\n({r['gap_recovered']:.0%} of gap)", (i, r["accuracy"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("demo_arith accuracy (greedy, exact match)")
    ax.set_title("one student, one budget: what each method buys")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def render(rows: list[dict], teacher: dict) -> str:
    from tabulate import tabulate

    body = [[r["arm"], f"{r['accuracy']:.3f} ± {r['stderr']:.3f}",
             f"{r['gap_recovered']:.2f} ± {r['gap_stderr']:.2f}", r["steps"], f"{r['tokens_seen'] / 1e6:.2f}M",
             f"{r['train_seconds']:.0f}", f"{r['train_tokens_per_s']:.0f}", f"{r['mfu']:.2%}"] for r in rows]
    body.append(["teacher", f"{teacher['accuracy']:.3f} ± {teacher['stderr']:.3f}", "1", "", "", "", "", ""])
    return tabulate(body, headers=["arm", "accuracy", "gap recovered", "steps", "train tokens", "train s",
                                   "train tok/s", "MFU"], tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    a = arms_parser(__doc__, "methods", "demo-methods", ARMS, "train.epochs=1").parse_args(argv)

    from distillery.config import load_pipeline, parse_overrides
    from distillery.demo.assets import resolve_model
    from tasks.evaluate import evaluate_model, throughput_prompts
    from tasks.train import loss_curve, run_method

    cfg = load_pipeline(a.config, a.pipeline, parse_overrides(a.overrides))
    if "hard" not in a.arms:
        a.arms = ["hard", *a.arms]  # the baseline every gap is measured from
    work = Path(a.workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak()
    print(f"fp32 matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s")

    prompts = throughput_prompts(cfg)
    with bench_run(cfg, a, "methods", "methods", out) as (tracker, parent, include):
        gen, kept = teacher_traces(cfg, tracker, parent.run_id, work)
        results: dict[str, dict] = {}
        with tracker.stage("teacher", parent.run_id) as run:
            ev = evaluate_model(resolve_model(cfg.teacher.path), cfg.evaluate, include, prompts)
            teacher = {"accuracy": ev["figures"]["accuracy"], "stderr": ev["figures"]["accuracy_stderr"] or 0.0}
            run.log_metrics(ev["figures"])
        student = resolve_model(cfg.student.path, seed=cfg.train.seed)
        for arm in a.arms:
            arm_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": arm})})
            print(f"\n=== arm {arm} ===", flush=True)
            with tracker.stage(arm, parent.run_id, tags={"distillery.arm": arm}) as run:
                run.log_params({"method": arm, **arm_cfg.train.model_dump()})
                figs = run_method(arm_cfg, student, kept["path"], gen["path"], work / arm)
                ev = evaluate_model(str(work / arm), cfg.evaluate, include, prompts)
                figs.update(ev["figures"])
                for k in ("steps", "tokens_seen", "train_seconds"):  # dpo: its SFT phase counts too
                    figs[k] = figs.get(f"total_{k}", figs[k])
                figs["train_tokens_per_s"] = figs["tokens_seen"] / figs["train_seconds"]
                figs["mfu"] = 6 * figs["params"] * figs["tokens_seen"] / figs["train_seconds"] / peak
                run.log_metrics(figs)
                fig = loss_curve(json.loads((work / arm / "manifest.json").read_text())["loss_history"])
                run.log_figure(fig, "loss_curve.png")
                matplotlib_close(fig)
                results[arm] = {"run_id": run.run_id, **figs}
        hard = results["hard"]
        rows = []
        for arm, f in results.items():
            g, gs = gap_recovered(f["accuracy"], hard["accuracy"], teacher["accuracy"], f["accuracy_stderr"] or 0.0,
                                  hard["accuracy_stderr"] or 0.0, teacher["stderr"])
            tracker.client.log_metric(f["run_id"], "gap_recovered", g)
            rows.append({"arm": arm, "accuracy": f["accuracy"], "stderr": f["accuracy_stderr"] or 0.0,
                         "gap_recovered": g, "gap_stderr": gs, **{k: f[k] for k in (
                             "steps", "tokens_seen", "train_seconds", "train_tokens_per_s", "mfu", "params")}})
        table = render(rows, teacher)
        print("\n" + table)
        summary = {"pipeline": a.pipeline, "overrides": a.overrides, "teacher": teacher, "rows": rows,
                   "matmul_peak_flops": peak, "machine": machine(), "mlflow_parent_run": parent.run_id}
        publish(out, "methods", summary, table, plot(rows, teacher), parent)
        parent.log_metrics({f"accuracy.{r['arm']}": r["accuracy"] for r in rows} | {"accuracy.teacher": teacher[
            "accuracy"]} | {f"gap_recovered.{r['arm']}": r["gap_recovered"] for r in rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
