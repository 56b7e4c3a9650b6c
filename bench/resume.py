"""What a resume saves: a pipeline run killed (SIGKILL, as a lost machine does) when a stage starts, then finished
with `--resume`, against the same pipeline run from scratch (`--fresh`), side by side.

    .venv/bin/python bench/resume.py --pipeline demo --kill-at evaluate
    .venv/bin/python bench/resume.py --pipeline smoke --kill-at train --set train.max_steps=40

Each run is the real `distillery run` command in a folder of its own (its own MLflow store and ephemeral Prefect
API). Prints and writes bench/results/resume-<pipeline>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="demo")
    p.add_argument("--kill-at", default="evaluate", help="the stage whose start the kill waits for")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--file", default=str(REPO / "pipelines.yaml"))
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench-resume"))
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = p.parse_args(argv)

    work = Path(a.workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PREFECT_HOME": str(work / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "distillery"), "run", a.pipeline, "--file", a.file]
    for s in a.overrides:
        cmd += ["--set", s]

    t0 = time.monotonic()
    log = (work / "killed.log").open("w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_stage(env, proc, a.kill_at)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its children at once, as a lost machine loses them
    proc.wait()
    killed_after = time.monotonic() - t0
    print(f"killed when {a.kill_at} started, after {killed_after:.0f} s", flush=True)

    resumed = timed(cmd + ["--resume"], work, env, "resume.log")
    fresh = timed(cmd + ["--fresh"], work, env, "fresh.log")
    figures = {
        "pipeline": a.pipeline,
        "overrides": a.overrides,
        "kill_at": a.kill_at,
        "killed_after_s": round(killed_after, 1),
        "resume_s": round(resumed, 1),
        "from_scratch_s": round(fresh, 1),
        "saved_s": round(fresh - resumed, 1),
        "from_scratch_over_resume": round(fresh / resumed, 2),
        "lost_total_with_resume_s": round(killed_after + resumed, 1),
        "lost_total_from_scratch_s": round(killed_after + fresh, 1),
    }
    table = (
        f"| {a.pipeline}, killed when {a.kill_at} starts | seconds |\n|---|---|\n"
        f"| until the kill | {killed_after:.0f} |\n| re-run with `--resume` | {resumed:.0f} |\n"
        f"| re-run from scratch (`--fresh`) | {fresh:.0f} |\n| saved by resuming | {fresh - resumed:.0f} "
        f"({fresh / resumed:.1f}x faster) |"
    )
    print("\n" + table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"resume-{a.pipeline}.json").write_text(json.dumps(figures, indent=2))
    (out / f"resume-{a.pipeline}.md").write_text(table + "\n")
    return 0


def timed(cmd: list[str], work: Path, env: dict, log: str) -> float:
    t0 = time.monotonic()
    with (work / log).open("w") as f:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed (exit {rc}); see {work / log}")
    return time.monotonic() - t0


def wait_for_stage(env: dict, proc: subprocess.Popen, stage: str, timeout: float = 3600) -> None:
    from mlflow.tracking import MlflowClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended (exit {proc.returncode}) before {stage} started")
        try:
            client = MlflowClient(env["MLFLOW_TRACKING_URI"])
            exp = client.get_experiment_by_name("distillery")
            if exp and client.search_runs(
                [exp.experiment_id], f"attributes.run_name = '{stage}' and attributes.status = 'RUNNING'"
            ):
                return
        except Exception:  # the store is being created
            pass
        time.sleep(0.5)
    raise SystemExit(f"{stage} did not start within {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
