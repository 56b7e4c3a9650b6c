"""Quantization-aware healing against plain NF4, over seeds, with intervals.

    .venv/bin/python bench/heal.py                                  # demo-methods' traces, 5 seeds
    .venv/bin/python bench/heal.py --seeds 3 --steps 400 --heal-steps 100 --limit 200

For each seed s: the demo student (init seed s) trained by SFT for --steps on the teacher's kept traces
(train.seed s); its NF4 copy (the quantize stage's); and that NF4 copy healed (quantize.heal: LoRA adapters
distilled from the full-precision student, heal seed s). Each of the three is measured the same way (bench/methods.py's
Judge: greedy accuracy in and out of distribution, fidelity to the teacher, held-out NLL of teacher traces), plus
its per-token KL from the full-precision student on the held-out traces (what quantization lost and healing is
meant to give back) and its weight memory (NF4 + adapters for the healed one). Means with Student-t 95%
intervals over the seeds, and paired differences healed - nf4 and nf4 - full.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import bench_run, machine, publish, teacher_traces  # noqa: E402

METRICS = ["accuracy", "ood_accuracy", "fidelity", "heldout_nll", "kl_from_full", "memory_mb"]
LABELS = ["full", "nf4", "nf4_healed"]


def kl_from_full(full, model, tok, rows: list[dict], batch_size: int = 16) -> float:
    """Mean per-token KL(full ‖ model) at the completion tokens of `rows` (prompt + completion, teacher-forced)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        prompts = [tok(r.get("prompt_text", r["prompt"]), add_special_tokens=False)["input_ids"] for r in batch]
        comps = [tok(r["completion"], add_special_tokens=False)["input_ids"] for r in batch]
        width = max(len(p) + len(c) for p, c in zip(prompts, comps, strict=True))
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        counted = torch.zeros((len(batch), width), dtype=torch.bool)
        for j, (p, c) in enumerate(zip(prompts, comps, strict=True)):
            ids[j, : len(p) + len(c)] = torch.tensor(p + c)
            mask[j, : len(p) + len(c)] = 1
            counted[j, len(p) - 1 : len(p) + len(c) - 1] = True  # positions that predict a completion token
        with torch.no_grad():
            logp = F.log_softmax(full(input_ids=ids, attention_mask=mask).logits.float(), -1)
            logq = F.log_softmax(
                model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu(), -1
            )
        kl = (logp.exp() * (logp - logq)).sum(-1)
        total += float(kl[counted].sum())
        count += int(counted.sum())
    return total / max(count, 1)


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, m, title in zip(
        axes,
        ("kl_from_full", "accuracy", "memory_mb"),
        ("KL from the full-precision student (nats/token)", "accuracy (in distribution)", "weight memory (MB)"),
        strict=True,
    ):
        means = [r[m]["mean"] for r in rows]
        errs = [(r[m]["high"] - r[m]["low"]) / 2 for r in rows]
        ax.bar([r["label"] for r in rows], means, yerr=errs, capsize=4, color=["#555", "#c44", "#4a4"])
        ax.set_title(title, fontsize=9)
    fig.suptitle("quantization-aware healing vs plain NF4 (mean, 95% interval over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    p.add_argument("--pipeline", default="demo-methods", help="its traces, student and train settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, default=5, help="student init = data order = heal seed")
    p.add_argument("--steps", type=int, default=400, help="SFT steps of each full-precision student")
    p.add_argument("--heal-steps", type=int, default=100)
    p.add_argument("--heal-lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of each eval split")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench-heal"))
    p.add_argument("--name", default="heal")
    a = p.parse_args(argv)
    a.arms = LABELS

    from bench.methods import Judge
    from distillery.artifacts import read_jsonl
    from distillery.config import QuantHealConfig, load_pipeline, parse_overrides
    from distillery.demo import profile
    from distillery.demo.assets import resolve_model
    from distillery.healing import heal
    from distillery.methods import run_method
    from distillery.stats import mean_ci, paired_ci
    from distillery.training import training_records
    from tasks.quantize import quantize

    cfg = load_pipeline(a.config, a.pipeline, parse_overrides(a.overrides))
    work = Path(a.workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    with bench_run(cfg, a, "heal", "heal", out) as (tracker, parent, _include):
        gen, kept = teacher_traces(cfg, tracker, parent.run_id, work)
        rows = read_jsonl(Path(kept["path"]))
        heldout = read_jsonl(Path(kept["heldout"]))
        judge = Judge(heldout, a.limit, 0)
        teacher = judge.measure(resolve_model(cfg.teacher.path))
        for s in range(a.seeds):
            d = work / f"seed{s}"
            sets = [*a.overrides, "train.method=sft", f"train.max_steps={a.steps}", f"train.seed={s}"]
            scfg = load_pipeline(a.config, a.pipeline, parse_overrides(sets))
            print(f"\n=== seed {s}: sft {a.steps} steps, nf4, heal {a.heal_steps} steps ===", flush=True)
            run_method(scfg, resolve_model(scfg.student.path, seed=s), kept["path"], gen["path"], d / "full")
            q = quantize(str(d / "full"), "nf4", cfg.quantize, d / "nf4")
            h = QuantHealConfig(
                steps=a.heal_steps, learning_rate=a.heal_lr, lora_r=a.lora_r, lora_alpha=2 * a.lora_r, seed=s
            )
            with tracker.stage(f"heal/seed{s}", parent.run_id) as run:
                healed = heal(str(d / "nf4"), str(d / "full"), training_records(rows, False), d / "nf4-healed", h)
                run.log_metrics(healed["figures"])
            full_tok, full_model = profile._load(str(d / "full"))
            for label, path in zip(LABELS, [d / "full", d / "nf4", d / "nf4-healed"], strict=True):
                figs = judge.measure(str(path))
                tok, model = profile._load(str(path))
                figs["kl_from_full"] = kl_from_full(full_model, model, full_tok, heldout)
                if label == "full":
                    figs["memory_mb"] = full_model.get_memory_footprint() / 2**20
                else:
                    figs["memory_mb"] = (
                        q["figures"]["memory_bytes"] + healed["figures"]["adapter_bytes"] * (label == "nf4_healed")
                    ) / 2**20
                if label == "nf4_healed":
                    figs.update(healed["figures"])
                with tracker.stage(f"{label}/seed{s}", parent.run_id, tags={"distillery.arm": label}) as run:
                    run.log_metrics({k: v for k, v in figs.items() if isinstance(v, int | float)})
                results.append({"label": label, "seed": s, **figs})
                print(f"  {label}: " + ", ".join(f"{m} {figs[m]:.4f}" for m in METRICS), flush=True)

        table_rows = []
        for label in LABELS:
            runs = [r for r in results if r["label"] == label]
            table_rows.append(
                {"label": label, "seeds": len(runs), **{m: mean_ci([r[m] for r in runs]).__dict__ for m in METRICS}}
            )
        pairs = []
        for x, y in (("nf4_healed", "nf4"), ("nf4", "full"), ("nf4_healed", "full")):
            vx = {r["seed"]: r for r in results if r["label"] == x}
            vy = {r["seed"]: r for r in results if r["label"] == y}
            pairs.append(
                {
                    "pair": f"{x} - {y}",
                    **{
                        m: paired_ci({k: v[m] for k, v in vx.items()}, {k: v[m] for k, v in vy.items()}).__dict__
                        for m in METRICS
                    },
                }
            )

        def fmt(ci: dict, digits: int = 3) -> str:
            return f"{ci['mean']:.{digits}f} ± {(ci['high'] - ci['low']) / 2:.{digits}f}"

        lines = [
            f"Healing vs plain NF4: {a.seeds} seeds, {a.steps} SFT steps, heal {a.heal_steps} steps (lr {a.heal_lr}, "
            f"r {a.lora_r}); teacher accuracy {teacher['accuracy']:.3f}",
            "",
            "| model | " + " | ".join(METRICS) + " |",
            "|---|" + "---|" * len(METRICS),
        ]
        lines += [
            f"| {r['label']} | " + " | ".join(fmt(r[m], 5 if m == "kl_from_full" else 3) for m in METRICS) + " |"
            for r in table_rows
        ]
        lines += [
            "",
            "| paired difference | " + " | ".join(f"Δ {m}" for m in METRICS) + " |",
            "|---|" + "---|" * len(METRICS),
        ]
        lines += [
            f"| {pr['pair']} | "
            + " | ".join(
                f"{pr[m]['mean']:+.5f} ± {(pr[m]['high'] - pr[m]['low']) / 2:.5f}"
                if m == "kl_from_full"
                else f"{pr[m]['mean']:+.3f} ± {(pr[m]['high'] - pr[m]['low']) / 2:.3f}"
                for m in METRICS
            )
            + " |"
            for pr in pairs
        ]
        table = "\n".join(lines)
        print("\n" + table)
        summary = {
            "pipeline": a.pipeline,
            "overrides": a.overrides,
            "seeds": a.seeds,
            "steps": a.steps,
            "heal": {"steps": a.heal_steps, "learning_rate": a.heal_lr, "lora_r": a.lora_r},
            "teacher": teacher,
            "rows": table_rows,
            "pairs": pairs,
            "runs": [{k: v for k, v in r.items() if isinstance(v, int | float | str)} for r in results],
            "machine": machine(),
            "mlflow_parent_run": parent.run_id,
        }
        publish(out, a.name, summary, table, plot(table_rows), parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
