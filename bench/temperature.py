"""Temperature and the T² factor: the gradient norm of the soft-target term against T, with and without T².

    .venv/bin/python bench/temperature.py [--student demo:student] [--batches 8] [--temperatures 1 2 4 8]

The soft term is the divergence between the teacher's and the student's distributions at temperature T, on
teacher-sampled traces of the demo task (completion tokens only). Its gradient with respect to the student's logits
shrinks roughly as 1/T² once T is large (Hinton et al. 2015), so an unscaled soft term fades against the hard-label
term as T grows; multiplied by T² it stays of one size. Measured here on the student's parameters, for the teacher
known in full (its logits) and by its top-16 (the stored form, tail bucket), printed side by side with the ratio
to T = 1. Results to --out (<name>.json / .md / .png), and to one MLflow parent run (MLFLOW_TRACKING_URI;
experiment --experiment) with a child per (teacher form, T), the table and the plot of gradient norm against T.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def grad_norms(
    student_path: str,
    teacher_path: str,
    temperatures: list[float],
    batches: int,
    batch_size: int,
    k: int = 16,
    kind: str = "forward_kl",
) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.demo import task
    from distillery.losses import IGNORE, full_kd, topk_kd

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student = AutoModelForCausalLM.from_pretrained(student_path)
    student.eval()  # no dropout noise in the measurement
    probs = list(task.problems(seed=555, count=batches * batch_size))
    rows = []
    sums: dict[tuple, float] = {}
    for b in range(batches):
        chunk = probs[b * batch_size : (b + 1) * batch_size]
        ids, labels = [], []
        for p in chunk:
            q = tok(p.question, add_special_tokens=False)["input_ids"]
            c = tok(p.trace, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(q + c)
            labels.append([IGNORE] * len(q) + c)
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        lab = torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels])[:, 1:]
        with torch.no_grad():
            t_logits = teacher(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        top = torch.log_softmax(t_logits, -1).topk(k)
        for t in temperatures:
            for form in ("full", f"top{k}"):
                student.zero_grad()
                s_logits = student(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
                if form == "full":
                    loss = full_kd(s_logits, t_logits, t, kind, labels=lab)
                else:
                    loss = topk_kd(s_logits, top.indices, top.values, t, kind, labels=lab)
                loss.backward()
                norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in student.parameters() if p.grad is not None))
                key = (t, form)
                sums[key] = sums.get(key, 0.0) + float(norm) / batches  # the T²-scaled loss's gradient
                sums[key + ("loss",)] = sums.get(key + ("loss",), 0.0) + loss.item() / batches
    for form in ("full", f"top{k}"):
        base = sums[(temperatures[0], form)]
        base_raw = base / temperatures[0] ** 2
        for t in temperatures:
            g = sums[(t, form)]
            rows.append(
                {
                    "teacher": form,
                    "temperature": t,
                    "grad_norm_t2": g,
                    "grad_norm_plain": g / t**2,
                    "ratio_t2": g / base,
                    "ratio_plain": (g / t**2) / base_raw,
                    "soft_loss_t2": sums[(t, form, "loss")],
                }
            )
    return rows


def render(rows: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate(
        [
            [
                r["teacher"],
                f"{r['temperature']:g}",
                f"{r['grad_norm_t2']:.4f}",
                f"{r['ratio_t2']:.2f}×",
                f"{r['grad_norm_plain']:.4f}",
                f"{r['ratio_plain']:.3f}×",
                f"{r['soft_loss_t2']:.4f}",
            ]
            for r in rows
        ],
        headers=["teacher known by", "T", "‖∇‖ with T²", "vs T=1", "‖∇‖ without T²", "vs T=1", "soft loss (T²-scaled)"],
        tablefmt="github",
        disable_numparse=True,
    )


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for form, color in zip(dict.fromkeys(r["teacher"] for r in rows), ("#4c72b0", "#dd8452"), strict=False):
        sel = [r for r in rows if r["teacher"] == form]
        ts = [r["temperature"] for r in sel]
        ax.plot(ts, [r["grad_norm_t2"] for r in sel], marker="o", color=color, label=f"{form}, with T²")
        ax.plot(ts, [r["grad_norm_plain"] for r in sel], marker="o", ls="--", color=color, label=f"{form}, without T²")
    t0 = rows[0]["temperature"]
    ts = sorted({r["temperature"] for r in rows})
    ax.plot(
        ts,
        [rows[0]["grad_norm_plain"] * (t0 / t) ** 2 for t in ts],
        color="grey",
        lw=0.8,
        ls=":",
        label="1/T² from T=1 (full)",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("KD temperature T")
    ax.set_ylabel("‖∇ soft term‖ (student parameters)")
    ax.set_title("Gradient of the soft-target term against T", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="demo:student", help="model folder or demo:student (random init)")
    ap.add_argument("--teacher", default="demo:teacher")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--name", default="temperature", help="results file stem in --out")
    ap.add_argument("--experiment", default="distillery", help="MLflow experiment of the parent run")
    a = ap.parse_args(argv)

    from distillery.demo.assets import resolve_model
    from distillery.tracking import Tracker

    tracker = Tracker(a.experiment)
    parent = tracker.start(a.name, tags={"distillery.bench": "temperature"})
    ok = False
    try:
        parent.log_params(
            {
                "student": a.student,
                "teacher": a.teacher,
                "divergence": a.divergence,
                "temperatures": " ".join(f"{t:g}" for t in a.temperatures),
                "batches": a.batches,
                "batch_size": a.batch_size,
            }
        )
        rows = grad_norms(
            resolve_model(a.student),
            resolve_model(a.teacher),
            a.temperatures,
            a.batches,
            a.batch_size,
            kind=a.divergence,
        )
        for r in rows:  # a child per (form, T), all with the same metric names
            with tracker.stage(f"{r['teacher']}/T={r['temperature']:g}", parent.run_id) as run:
                run.log_params({"teacher_form": r["teacher"], "temperature": r["temperature"]})
                run.log_metrics({k: v for k, v in r.items() if isinstance(v, float) and k != "temperature"})
        table = render(rows)
        print(table)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {
            "student": a.student,
            "teacher": a.teacher,
            "divergence": a.divergence,
            "rows": rows,
            "mlflow_parent_run": parent.run_id,
        }
        (out / f"{a.name}.json").write_text(json.dumps(summary, indent=2))
        (out / f"{a.name}.md").write_text(table + "\n")
        fig = plot(rows)
        fig.savefig(out / f"{a.name}.png", dpi=110)
        parent.log_figure(fig, f"{a.name}.png")
        parent.log_text(table, f"{a.name}.md")
        parent.log_dict(summary, f"{a.name}.json")
        ok = True
    finally:
        tracker.end(parent, ok=ok)
    print(f"\nMLflow parent run {parent.run_id}; results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
