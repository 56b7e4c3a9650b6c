"""No zombie runs: signals end a run KILLED with a reason, and a run whose process died is found and ended FAILED
by the next run of its pipeline (with a real MLflow store; the end-to-end kills are in test_e2e)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from distillery.lifecycle import (
    END_REASON,
    PROCESS_TAG,
    Interrupted,
    _boot_id,
    _start_time,
    end_state,
    process_gone,
    reap,
    stop_on_signals,
    this_process,
)


def dead_process() -> str:
    p = subprocess.Popen(["sleep", "30"])
    record = f"{socket.gethostname()}|{_boot_id()}|{p.pid}|{_start_time(p.pid)}"
    assert process_gone(record) is False  # alive
    p.kill()
    p.wait()
    return record


def test_a_process_is_known_by_pid_and_start_time():
    assert process_gone(this_process()) is False
    assert process_gone(dead_process()) is True
    host, boot, pid, started = this_process().split("|")
    assert process_gone(f"{host}|{boot}|{pid}|{int(started) + 1}") is True  # the pid reused by another process
    assert process_gone(f"{host}|not-this-boot|{pid}|{started}") is True  # the machine rebooted
    assert process_gone(f"elsewhere|{boot}|{pid}|{started}") is None  # another machine's run: cannot tell
    assert process_gone("") is None and process_gone("a|b|c|d") is None


def test_sigterm_raises_interrupted_in_the_body_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # the handler raises before this returns
    assert e.value.signum == signal.SIGTERM and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before
    assert end_state(e.value) == ("KILLED", "stopped by SIGTERM")
    assert end_state(KeyboardInterrupt()) == ("KILLED", "interrupted (Ctrl-C)")
    assert end_state(ValueError("bad\nsecond line")) == ("FAILED", "ValueError: bad")
    assert end_state(None) == ("FINISHED", "completed")


def test_a_stage_stopped_by_a_signal_ends_killed_and_says_why(mlflow_uri):
    from distillery.tracking import Tracker

    tracker = Tracker("lifecycle-test")
    parent = tracker.start("demo")
    with pytest.raises(Interrupted), tracker.stage("train", parent.run_id):
        raise Interrupted(signal.SIGTERM)
    tracker.finish(parent, Interrupted(signal.SIGTERM))
    runs = {r.info.run_name: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert {n: (r.info.status, r.data.tags[END_REASON]) for n, r in runs.items()} == {
        "demo": ("KILLED", "stopped by SIGTERM"),
        "train": ("KILLED", "stopped by SIGTERM"),
    }


def test_the_next_run_reaps_runs_whose_process_died_and_leaves_the_living(mlflow_uri):
    from distillery.tracking import Tracker

    tracker = Tracker("lifecycle-test")
    c = tracker.client

    def parent(pipeline: str, process: str):
        return tracker.start(pipeline, tags={"distillery.pipeline": pipeline, PROCESS_TAG: process})

    dead = parent("demo", dead_process())
    dead_child = tracker.start("train", dead.run_id, {"distillery.pipeline": "demo"})
    done_child = tracker.start("generate", dead.run_id, {"distillery.pipeline": "demo"})
    tracker.end(done_child)
    alive = parent("demo", this_process())
    other_machine = parent("demo", f"elsewhere|x|{os.getpid()}|1")
    other_pipeline = parent("smoke", dead_process())

    assert reap(c, tracker.experiment_id, "demo", by="new-run") == [dead.run_id]
    status = {r.info.run_id: r.info.status for r in c.search_runs([tracker.experiment_id])}
    assert status[dead.run_id] == status[dead_child.run_id] == "FAILED"
    assert status[done_child.run_id] == "FINISHED"  # what had ended stays as it ended
    assert status[alive.run_id] == status[other_machine.run_id] == status[other_pipeline.run_id] == "RUNNING"
    reason = c.get_run(dead_child.run_id).data.tags[END_REASON]
    assert reason.startswith("its process (") and reason.endswith(
        f"on {socket.gethostname()}) died; found by run new-run"
    )
    assert reap(c, tracker.experiment_id, "demo", by="later") == []  # once


def test_a_fault_is_one_line_naming_the_stage_and_the_cause(mlflow_uri):
    import errno

    from distillery.engines import exit_description
    from distillery.lifecycle import cause, describe_failure
    from distillery.tracking import NullTracker, Tracker

    tracker = Tracker("lifecycle-test")
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/demo/x/train/model.safetensors")
    with pytest.raises(OSError) as e, tracker.stage("train", None):
        raise full
    assert describe_failure(e.value) == (
        "failed in stage train: out of disk space writing /runs/demo/x/train/model.safetensors"
        " (free some, then --resume)"
    )
    (run,) = tracker.client.search_runs([tracker.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags[END_REASON].startswith("out of disk space writing")
    with pytest.raises(MemoryError) as e, NullTracker().stage("evaluate"):  # tracking off: still named
        raise MemoryError()
    assert describe_failure(e.value).startswith("failed in stage evaluate: out of memory (MemoryError)")
    assert describe_failure(ValueError("x\ny")) == "failed: ValueError: x"

    # what libraries raise on a full disk without an OSError: safetensors' Rust writer, PyTorch's zip writer, and an
    # error raised while handling one
    class SafetensorError(Exception):
        pass

    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    torch_writer = RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
        "PytorchStreamWriter failed writing file data/0: file write failed"
    )
    wrapped = RuntimeError("saving the checkpoint failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/runs/x/optimizer.pt")
    for exc in (rust, torch_writer, wrapped):
        assert cause(exc).startswith("out of disk space"), exc
    assert cause(wrapped) == "out of disk space writing /runs/x/optimizer.pt (free some, then --resume)"
    assert exit_description(-9).startswith("killed by SIGKILL: out of memory?") and exit_description(3) == "exit 3"


def test_a_full_disk_in_a_stage_fails_the_run_in_one_line_and_leaves_nothing_half_written(
    tmp_path, monkeypatch, capsys
):
    import errno

    import tasks.generate
    from flows.cli import main

    from .conftest import REPO, sqlite_store

    def full_disk(cfg, out_dir, **kw):
        out_dir.mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "traces.jsonl"))

    monkeypatch.setattr(tasks.generate, "generate", full_disk)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path))
    assert main(["run", "smoke", "--file", str(REPO / "pipelines.yaml")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("distillery: pipeline smoke failed in stage generate: out of disk space writing ")
    (run_dir,) = (tmp_path / "runs" / "smoke").iterdir()
    assert not (run_dir / "generate" / "traces.jsonl").exists() and not list((tmp_path / "runs").glob(".stages/*"))


def test_two_writers_of_one_cache_entry_at_once_leave_one_complete_copy(tmp_path):
    import threading

    from distillery.artifacts import atomic_dir, read_manifest, write_manifest

    dest = tmp_path / "cache" / "shard-0"
    ready = threading.Barrier(8)
    errors = []

    def write(i: int):
        try:
            with atomic_dir(dest, keep_existing=True) as tmp:
                (tmp / "traces.jsonl").write_text(f"writer {i}\n")
                write_manifest(tmp, {"writer": i})
                ready.wait()  # every writer has its copy ready: now they all move it into place at once
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    winner = read_manifest(dest)["writer"]
    assert (dest / "traces.jsonl").read_text() == f"writer {winner}\n"  # one writer's whole copy, not a mix
    assert sorted(p.name for p in dest.parent.iterdir()) == ["shard-0"]  # no temp copy left behind
