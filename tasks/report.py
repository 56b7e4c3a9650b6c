"""report: the answer. Teacher and the student after each stage in one table, measured the same way.

Columns: task accuracy ± stderr, parameters, weight memory, greedy tokens/s, draft acceptance. Printed, and
logged to the parent MLflow run as summary.md / summary.json / accuracy_vs_size.png, with metrics named
`<figure>.<model>` so runs of different days line up in the MLflow compare view.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_write_text
from distillery.results import Evaluation, ModelArtifact
from distillery.runtime import RunContext


def build_rows(evals: dict[str, Evaluation], draft: ModelArtifact | None, draft_label: str | None) -> list[dict]:
    """One row per evaluated model, in evaluation order; `draft_label` names the model the draft was made from."""
    rows = []
    teacher = evals["teacher"].figures.get("accuracy") if "teacher" in evals else None
    for label, res in evals.items():
        f = res.figures
        rows.append(
            {
                "model": label,
                "accuracy": f["accuracy"],
                "stderr": f.get("accuracy_stderr"),
                "ood_accuracy": f.get("ood_accuracy"),
                "ood_stderr": f.get("ood_accuracy_stderr"),
                "recovery": f["accuracy"] / teacher if teacher else None,  # student / teacher
                "perplexity": f.get("heldout_perplexity"),
                "params": int(f["params"]),
                "memory_mb": f["memory_bytes"] / 2**20,
                "tokens_per_s": f["tokens_per_s"],
                "draft_acceptance": draft.figures["acceptance_rate"] if draft and label == draft_label else None,
            }
        )
    return rows


def render(rows: list[dict], draft: ModelArtifact | None = None) -> str:
    from tabulate import tabulate

    def acc(r, key="accuracy", err="stderr"):
        if r.get(key) is None:
            return ""
        return f"{r[key]:.3f} ± {r[err]:.3f}" if r.get(err) is not None else f"{r[key]:.3f}"

    ood = any(r.get("ood_accuracy") is not None for r in rows)  # the column only when evaluate.ood_task is set
    table = tabulate(
        [
            [
                r["model"],
                acc(r),
                *([acc(r, "ood_accuracy", "ood_stderr")] if ood else []),
                "" if r["recovery"] is None else f"{r['recovery']:.1%}",
                "" if r["perplexity"] is None else f"{r['perplexity']:.3f}",
                f"{r['params'] / 1e6:.2f}M",
                f"{r['memory_mb']:.2f}",
                f"{r['tokens_per_s']:.0f}",
                "" if r["draft_acceptance"] is None else f"{r['draft_acceptance']:.2f}",
            ]
            for r in rows
        ],
        headers=[
            "model",
            "accuracy",
            *(["OOD accuracy"] if ood else []),
            "recovery",
            "held-out ppl",
            "params",
            "memory MB",
            "tokens/s",
            "draft acceptance",
        ],
        tablefmt="github",
        disable_numparse=True,
    )
    if draft:
        f = draft.figures
        table += (
            f"\n\ndraft: acceptance {f['acceptance_rate']:.2f}, mean accepted length "
            f"{f['mean_accepted_length']:.2f}, teacher {f['teacher_tokens_per_s']:.0f} tok/s alone vs "
            f"{f['teacher_with_draft_tokens_per_s']:.0f} with draft (speed-up {f['speedup']:.2f}x), "
            f"outputs identical: {bool(f['outputs_identical'])}"
        )
        if "sampled_acceptance_rate" in f:
            table += (
                f"; sampled at T={f['sampled_temperature']:g}: acceptance {f['sampled_acceptance_rate']:.2f}, "
                f"mean accepted length {f['sampled_mean_accepted_length']:.2f}, speed-up "
                f"{f['sampled_speedup']:.2f}x"
            )
        if "eagle3_steps" in f:
            table += f" (an EAGLE-3 head on the teacher's hidden states, {int(f['eagle3_steps'])} steps)"
        if "distill_steps" in f:
            table += f" (draft aligned to the teacher first: {int(f['distill_steps'])} DistillSpec steps)"
    return table


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of (size, accuracy): each point no smaller model beats or matches, smallest first."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "params", "parameters (M)"), (axes[1], "memory_mb", "weight memory (MB)")):
        points = []
        for r in rows:
            x = r[key] / 1e6 if key == "params" else r[key]
            points.append((x, r["accuracy"]))
            ax.errorbar(x, r["accuracy"], yerr=r["stderr"] or 0, fmt="o", capsize=3)
            ax.annotate(r["model"], (x, r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = frontier(points)
        ax.step(*zip(*front, strict=True), where="post", color="grey", ls="--", lw=1, label="frontier")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("task accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs size: the frontier of what each stage buys")
    fig.tight_layout()
    return fig


@task(name="report", cache_policy=NO_CACHE)
def report_task(
    ctx: RunContext, evals: dict[str, Evaluation], draft: ModelArtifact | None, draft_label: str | None
) -> str:
    """The table: printed, written to the run folder (summary.md, summary.json) and put on the parent run."""
    rows = build_rows(evals, draft, draft_label)
    text = render(rows, draft)
    summary = {"rows": rows, "draft": asdict(draft) if draft else None}
    print("\n" + text + "\n")
    out = Path(ctx.run_dir)
    atomic_write_text(out / "summary.md", text + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    tracker = ctx.tracker()
    if ctx.tracking_uri != "none":
        from distillery.tracking import StageRun

        parent = StageRun(tracker.client, ctx.parent_run_id)
        parent.log_text(text, "summary.md")
        parent.log_dict(summary, "summary.json")
        metrics = {}
        for r in rows:
            for k in (
                "accuracy",
                "ood_accuracy",
                "recovery",
                "perplexity",
                "params",
                "memory_mb",
                "tokens_per_s",
                "draft_acceptance",
            ):
                if r.get(k) is not None:
                    metrics[f"{k}.{r['model']}"] = r[k]
        if draft:
            metrics.update({f"draft.{k}": v for k, v in draft.figures.items()})
        parent.log_metrics(metrics)
        import matplotlib.pyplot as plt

        fig = plot(rows)
        parent.log_figure(fig, "accuracy_vs_size.png")
        plt.close(fig)
    return text
