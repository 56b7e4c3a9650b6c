"""What the arm benchmarks (methods.py, draft.py) share: their command line, and the teacher's traces made once."""

from __future__ import annotations

import argparse
import shutil
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def arms_parser(doc: str, name: str, pipeline: str, arms: list[str], example: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--pipeline", default=pipeline, help=f"pipeline in pipelines.yaml (default {pipeline})")
    p.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    p.add_argument("--arms", nargs="*", choices=arms, default=arms, help="built-in arms (none: only --arm ones)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override the pipeline, e.g. {example}",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help=f"where {name}.json/.md/.png go")
    p.add_argument("--workdir", default=f"runs/bench-{name}", help="stage artifacts")
    return p


def teacher_traces(cfg, tracker, parent_id: str, work: Path) -> tuple[dict, dict]:
    """Generate and filter the teacher's traces once for every arm, each a child run of the benchmark's parent."""
    from tasks.filter import run_filter
    from tasks.generate import generate

    with tracker.stage("generate", parent_id) as run:
        gen = generate(cfg, work / "generate")
        run.log_metrics(gen["figures"])
    with tracker.stage("filter", parent_id) as run:
        kept = run_filter(cfg, Path(gen["path"]), work / "filter")
        run.log_metrics({"kept": kept["report"]["kept"], "keep_rate": kept["report"]["keep_rate"]})
    return gen, kept


def publish(out: Path, name: str, summary: dict, table: str, fig, parent) -> None:
    """The results: `<name>.json`, `.md` and `.png` in `out`, the table and plot on the MLflow parent run."""
    import json

    import matplotlib.pyplot as plt

    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
    fig.savefig(out / f"{name}.png", dpi=110)
    parent.log_figure(fig, f"{name}.png")
    parent.log_text(table, f"{name}.md")
    plt.close(fig)


def machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


@contextmanager
def bench_run(cfg, args, run_name: str, bench: str, out: Path):
    """The benchmark's MLflow parent run (params: arms, overrides, the pipeline) and the local eval tasks for the
    body; the run ends FINISHED when the body completes, FAILED when it raises, and the tasks' temp copy goes."""
    from distillery.tracking import Tracker
    from tasks.evaluate import local_task_dir

    tracker = Tracker(cfg.experiment)
    parent = tracker.start(run_name, tags={"distillery.pipeline": args.pipeline, "distillery.bench": bench})
    parent.log_params({"arms": ",".join(args.arms), "overrides": " ".join(args.overrides), **cfg.model_dump()})
    include = local_task_dir(cfg.evaluate.tasks)
    ok = False
    try:
        yield tracker, parent, include
        ok = True
    finally:
        tracker.end(parent, ok=ok)
        if include:
            shutil.rmtree(include, ignore_errors=True)
    print(f"\nMLflow parent run {parent.run_id}; results in {out}")


@contextmanager
def served_teacher(model_ref: str, log: Path, dtype: str = "float32", max_model_len: int = 256):
    """`distillery serve-model` on a free loopback port, no API key, for the run of a bench; yields its URL."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILLERY_API_KEY", "VLLM_API_KEY")}
    env["PYTHONPATH"] = str(repo)
    cmd = [sys.executable, "-m", "flows.cli", "serve-model", model_ref, "--served-model-name", "teacher"]
    cmd += ["--port", str(port), "--max-model-len", str(max_model_len), "--dtype", dtype, "--", "--enforce-eager"]
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the teacher server did not start; see {log}") from None
                time.sleep(2)
        print(f"teacher served at {url} ({dtype}; log {log})", flush=True)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
