"""Runs survive what machines do to them: `distillery run smoke-all` (every stage, smoke-sized; real processes, a real
MLflow store, a real `prefect server` on 127.0.0.1) killed in the middle of every stage that can be resumed from
inside, and after the last stage, each kill resumed by the next `--resume`, in one rolling sequence:

  kill -9 mid-generate (one of two shards written); SIGTERM mid-train (exit 143, parent and train KILLED with the
  reason); kill -9 mid-evaluate (one model measured), after draft; then the last `--resume` finishes.

With DISTILLERY_KILL_MATRIX=full (about 25 minutes on a 2-core machine without AVX-512; CI runs the 4 kills above)
mid-heal and mid-draft-distillation are killed too (kill -9; they continue from a checkpoint as training does), and
every stage boundary: after generate, filter, train, prune, quantize and evaluate.

Each resume reaps the killed run (FAILED, its Prefect flow run CRASHED), reuses every stage recorded before the kill
(asserted from the stage records and the run's output) and continues the killed stage from what it had (shards,
checkpoints, measured models). At the end: the parent FINISHED, no MLflow run RUNNING, no Prefect flow run running,
and every stage's key, every model's content hash and every figure but timings equal an uninterrupted run's. A new run
of the pipeline then reuses all seven stages from that folder; one with a changed quantize setting redoes quantize
and evaluate only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillery.lifecycle import END_REASON

from .conftest import REPO, sqlite_store
from .test_e2e import prefect_server

BIN = Path(sys.executable).parent
PIPELINE = "smoke-all"
STAGES = ["generate", "filter", "train", "prune", "quantize", "evaluate", "draft"]
# figures that depend on the machine's speed, or say what a resumed run found done (the Trainer's `train_loss`
# averages the steps this process ran; shards generated vs found)
UNSTABLE = ("_seconds", "tokens_per_s", "speedup", "peak_bytes", "resumed_from_step", "train_loss", "shards_")
FLOW_STATES = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    print(json.dumps({str(r.id): r.state.type.value for r in c.read_flow_runs()}))
"""


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One Prefect server for every run of the sequence, as a deployment would have: a killed run's process group
    does not take it down, so the next run finds the dead flow run there."""
    home = tmp_path_factory.mktemp("prefect")
    with prefect_server({**os.environ, "PREFECT_HOME": str(home)}, home / "server.log") as api:
        yield api, home


class Work:
    """A working folder with its own MLflow store and output folder."""

    def __init__(self, root: Path, prefect_api):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        api, home = prefect_api
        self.env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": sqlite_store(root),
            "PREFECT_API_URL": api,
            "PREFECT_HOME": str(home),
        }

    def argv(self, *extra: str) -> list[str]:
        return [str(BIN / "distillery"), "run", PIPELINE, "--file", str(REPO / "pipelines.yaml"), *extra]

    def start(self, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(  # a session of its own: SIGKILL takes the whole process tree, as a lost machine does
            self.argv(*extra),
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def finish(self, *extra: str) -> str:
        r = subprocess.run(self.argv(*extra), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
        return r.stdout + r.stderr

    def records(self) -> dict[str, dict]:
        """The stage records (runs/.stages): stage -> the record."""
        out = {}
        for f in sorted((self.root / "runs" / ".stages").glob("*.json")):
            doc = json.loads(f.read_text())
            out[doc["stage"]] = doc
        return out

    def run_dirs(self) -> list[Path]:
        return sorted(p for p in (self.root / "runs" / PIPELINE).glob("*") if p.is_dir())

    def runs(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("distillery")
        return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)

    def parent(self, run_id: str):
        return next(r for r in self.runs() if r.info.run_id == run_id)

    def flow_states(self) -> dict[str, str]:
        out = subprocess.run(
            [sys.executable, "-c", FLOW_STATES], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])


def kill_when(proc: subprocess.Popen, ready, what: str, sig=signal.SIGKILL, timeout: float = 600) -> str:
    """Poll `ready()` until true, then send `sig` (SIGKILL: to the whole process group); the run's output."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.communicate()[0] if proc.poll() is not None else ""
            proc.kill()
            raise AssertionError(f"never reached {what} (exit {proc.returncode}):\n{out[-5000:]}")
        time.sleep(0.05)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(sig)
    return proc.communicate(timeout=120)[0]


def checkpointed(folder: Path) -> bool:
    return any(folder.glob("checkpoint-*/distillery-complete"))


def comparable(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if not any(t in k for t in UNSTABLE)}


def summary(records: dict[str, dict]) -> dict:
    """What each stage produced: its key, and every content hash and figure but timings in its result."""

    def walk(x):
        if isinstance(x, dict):
            if "__type__" in x:
                keep = {k: walk(v) for k, v in x.items() if k in ("label", "content_hash", "stage", "__type__")}
                return {**keep, "figures": comparable(x.get("figures") or {})}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return {s: {"key": r["key"], "result": walk(r["result"])} for s, r in records.items()}


@pytest.mark.slow
@pytest.mark.vllm
def test_killed_at_every_boundary_and_mid_stage_resumes_to_an_uninterrupted_runs_results(tmp_path, prefect_api):
    reference = Work(tmp_path / "reference", prefect_api)
    reference.finish()
    expected = summary(reference.records())
    assert sorted(expected) == sorted(STAGES)

    w = Work(tmp_path / "killed", prefect_api)
    folder: list[Path] = []  # the run folder, once the first run made it

    def rd() -> Path:
        if not folder and (found := w.run_dirs()):
            folder.append(found[0])
        return folder[0] if folder else tmp_path / "nowhere"

    def recorded(stage: str):
        return lambda: stage in w.records()

    shards = tmp_path / "killed" / "runs" / ".cache" / "generate"
    ckpt = "resuming from {run}/.{stage}-trainer/checkpoint-"
    everything = [  # (what, ready, signal, what the next run says it picked up from inside the killed stage)
        ("mid-generate", lambda: len(list(shards.glob("*/manifest.json"))) == 1, signal.SIGKILL, None),
        ("after generate", recorded("generate"), signal.SIGKILL, None),
        ("after filter", recorded("filter"), signal.SIGKILL, None),
        ("mid-train", lambda: checkpointed(rd() / ".train-trainer"), signal.SIGTERM, "train: " + ckpt),
        ("after train", recorded("train"), signal.SIGKILL, None),
        ("mid-heal", lambda: checkpointed(rd() / ".prune-trainer"), signal.SIGKILL, "prune.heal: " + ckpt),
        ("after prune", recorded("prune"), signal.SIGKILL, None),
        ("after quantize", recorded("quantize"), signal.SIGKILL, None),
        ("mid-evaluate", lambda: any((rd() / "evaluate").glob("*.json")), signal.SIGKILL, "evaluate [1/"),
        ("after evaluate", recorded("evaluate"), signal.SIGKILL, None),
        (
            "mid-draft",
            lambda: checkpointed(rd() / ".draft-distill-trainer"),
            signal.SIGKILL,
            "draft.distill: " + ckpt.replace("{stage}", "draft-distill"),
        ),
        ("after draft", recorded("draft"), signal.SIGKILL, None),
    ]
    # each boundary but the last is also the start of the next stage's mid-kill. CI takes one kill per way of
    # continuing inside a stage (shards, a trainer's checkpoint, measured models) and the kill after the last stage;
    # mid-heal and mid-draft continue from a trainer's checkpoint as mid-train does
    full = os.environ.get("DISTILLERY_KILL_MATRIX") == "full"
    ci = {"mid-generate", "mid-train", "mid-evaluate", "after draft"}
    kills = [k for k in everything if full or k[0] in ci]
    parent_id = None
    flow_runs: list[str] = []
    before: set[str] = set()  # stages recorded when the last run was killed

    def check_resumed(out: str, i: int) -> None:
        """Run i (> 0) continued run i - 1: reaped it if it died, reused what it had recorded, went on inside the
        stage it was killed in."""
        assert f"pipeline {PIPELINE}: resuming {rd()} (MLflow run {parent_id}, resume {i})" in out, out[-4000:]
        for stage in before:
            assert f"{stage}: reused from this run, before it was interrupted" in out, stage
        _, _, sig, picked_up = kills[i - 1]
        if sig == signal.SIGKILL:  # it died without ending: this run found it
            assert f"run {parent_id} had died without ending; marked FAILED" in out, out[-4000:]
        if picked_up:
            text = picked_up.format(run=rd(), stage=kills[i - 1][0].removeprefix("mid-").replace("heal", "prune"))
            if text.startswith("evaluate"):
                text = "] teacher: reused from this run, before it was interrupted"
            assert text in out, (text, out[-4000:])

    for i, (what, ready, sig, _) in enumerate(kills):
        extra = () if i == 0 else ("--resume", str(rd())) if what == "mid-train" else ("--resume",)
        out = kill_when(w.start(*extra), ready, what, sig)
        if i:
            check_resumed(out, i)
        else:
            parent_id = json.loads((rd() / "run.json").read_text())["parent_run_id"]
        parent = w.parent(parent_id)
        flow_runs.append(parent.data.tags["prefect.flow_run_id"])
        if sig == signal.SIGTERM:  # ends at once, itself, saying why
            assert "distillery: pipeline smoke-all terminated" in out.splitlines()[-3:], out[-3000:]
            train = max(
                (
                    r
                    for r in w.runs()
                    if r.info.run_name == "train" and r.data.tags.get("mlflow.parentRunId") == parent_id
                ),
                key=lambda r: r.info.start_time,
            )
            for r in (parent, train):
                assert r.info.status == "KILLED" and r.data.tags[END_REASON] == "stopped by SIGTERM", what
        before = set(w.records())
        if what.startswith("mid-"):  # killed inside the stage, not after it
            assert what.removeprefix("mid-").replace("heal", "prune") not in before, what
    out = w.finish("--resume")
    check_resumed(out, len(kills))
    parent = w.parent(parent_id)
    flow_runs.append(parent.data.tags["prefect.flow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["distillery.resumes"] == str(len(kills))
    assert [r.info.run_name for r in w.runs() if r.info.status == "RUNNING"] == []
    assert len(w.run_dirs()) == 1 and (rd() / "summary.md").is_file()

    # each killed stage went on from what it had, not from the start
    run = rd()
    gen = json.loads((run / "generate" / "manifest.json").read_text())
    assert gen["figures"]["shards_cached"] == 1 and gen["figures"]["shards_generated"] == 1, gen["figures"]
    assert json.loads((run / "train" / "manifest.json").read_text())["figures"]["resumed_from_step"] >= 5
    # (the heal, evaluate and draft distillation said so in their runs' output, checked below from MLflow)
    children = [r for r in w.runs() if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert {r.info.status for r in children} <= {"FINISHED", "FAILED", "KILLED"}

    # Prefect: every killed run's flow run crashed, the last one completed; none left running
    states = w.flow_states()
    assert [states[f] for f in flow_runs] == ["CRASHED"] * len(kills) + ["COMPLETED"], [states[f] for f in flow_runs]

    # the results equal the uninterrupted run's: stage keys (their inputs' content), content hashes, figures
    assert summary(w.records()) == expected

    # a new run of the same pipeline reuses all seven stages from that folder
    out = w.finish()
    for stage in STAGES:
        assert f"{stage}: reused from {run}" in out, stage
    newest = max((r for r in w.runs() if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert newest.info.run_id != parent_id and newest.info.status == "FINISHED"
    kids = {r.info.run_name: r for r in w.runs() if r.data.tags.get("mlflow.parentRunId") == newest.info.run_id}
    assert {n: r.data.tags.get("distillery.reused_from_parent") for n, r in kids.items()} == dict.fromkeys(
        STAGES, parent_id
    )

    # a changed quantize setting: quantize and what measures its model run again, nothing upstream (nor the draft,
    # which starts from the trained student)
    out = w.finish("--set", "quantize.double_quant=false")
    redone = {"quantize", "evaluate"}
    for stage in STAGES:
        assert (f"{stage}: reused from {run}" in out) == (stage not in redone), stage
    made = {s: len(list((w.root / "runs" / ".stages").glob(f"{s}-*.json"))) for s in STAGES}
    assert made == {s: 2 if s in redone else 1 for s in STAGES}  # a new key each: a new model, its new figures


@pytest.mark.slow
def test_a_full_disk_fails_the_stage_in_one_line_and_leaves_nothing_half_written(tmp_path):
    """The run folder on a real 600 kB disk (a tmpfs; needs root to mount): generate and filter fit, the trained
    model does not. One line names the stage and the cause, the run and its stage end FAILED, no model sits at a
    final path, no temp folder is left behind."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_store(tmp_path)}
        env["PREFECT_HOME"] = str(tmp_path / "prefect")
        env.pop("PREFECT_API_URL", None)
        sets = ["data.num_prompts=16", "train.max_steps=2", "checkpoint.every_steps=0", f"output_dir={disk / 'runs'}"]
        r = subprocess.run(  # --verbose: no run.log competing for the 600 kB
            [str(BIN / "distillery"), "run", "smoke", "--verbose", "--file", str(REPO / "pipelines.yaml")]
            + [x for s in sets for x in ("--set", s)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 1, out[-4000:]
        (last,) = [line for line in out.splitlines()[-3:] if line.startswith("distillery: ")]  # then Prefect stops
        assert last.startswith("distillery: pipeline smoke failed in stage train: out of disk space"), out[-4000:]
        assert "(free some, then --resume)" in last

        from mlflow.tracking import MlflowClient

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("distillery").experiment_id])
        status = {r.info.run_name: r.info.status for r in runs}
        assert status == {"smoke": "FAILED", "generate": "FINISHED", "filter": "FINISHED", "train": "FAILED"}
        (run_dir,) = (disk / "runs" / "smoke").iterdir()
        assert (run_dir / "filter" / "manifest.json").is_file() and not (run_dir / "train").exists()
        assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name], sorted(run_dir.rglob("*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
