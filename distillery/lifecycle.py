"""No zombie runs. A run ends FINISHED, FAILED or KILLED, never stays RUNNING:

- Ctrl-C and SIGTERM (what `kill`, systemd, Kubernetes and a preempted node send) raise `Interrupted` in the main
  thread, so the stage and the run end at once, their MLflow runs KILLED with tag `distillery.end_reason`.
- A run whose process died without a word (SIGKILL, the OOM killer, a lost machine) is found by the next run of its
  pipeline: every RUNNING parent records which process it is (`distillery.process`: host, boot id, pid and the
  process's start time, so a reused pid is not mistaken for it); on this host, a parent whose process no longer
  exists is marked FAILED with its RUNNING children, and its Prefect flow run CRASHED.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distillery.concurrency import LEASE_TAG, release_lease

END_REASON = "distillery.end_reason"
PROCESS_TAG = "distillery.process"


class Interrupted(KeyboardInterrupt):
    """A signal asked the run to stop (SIGTERM, SIGINT). A KeyboardInterrupt, so every layer treats it as Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def mark_stage(exc: BaseException, stage: str) -> None:
    """Remember on the exception which stage raised it (the innermost), for the one line that reports it."""
    if getattr(exc, "distillery_stage", None) is None:
        try:
            exc.distillery_stage = stage
        except (AttributeError, TypeError):  # an exception type without a __dict__
            pass


# How a full disk reads where no OSError carries it: safetensors' Rust writer ("os error 28"), PyTorch's zip writer
# (torch.save of a checkpoint's optimizer state) and quota errors.
DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "PytorchStreamWriter failed writing")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or while handling."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def cause(exc: BaseException) -> str:
    """What went wrong, in the words an operator acts on: out of disk, out of memory, else the error's first line."""
    import errno

    chain = _chain(exc)
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"out of disk space{f' writing {e.filename}' if e.filename else ''} (free some, then --resume)"
    if any(m in str(e) for e in chain for m in DISK_FULL):
        return "out of disk space (free some, then --resume)"
    if oom := next((e for e in chain if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"), None):
        device = "GPU " if type(oom).__name__ == "OutOfMemoryError" else ""
        return f"out of {device}memory ({type(oom).__name__}); lower the batch size or max_length, then --resume"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def describe_failure(exc: BaseException) -> str:
    """`failed in stage <stage>: <cause>` (or without the stage when it failed outside one)."""
    stage = getattr(exc, "distillery_stage", None)
    return f"failed in stage {stage}: {cause(exc)}" if stage else f"failed: {cause(exc)}"


def end_state(exc: BaseException | None) -> tuple[str, str]:
    """The MLflow status and the reason a run ends with, after `exc` (None: it completed)."""
    if exc is None:
        return "FINISHED", "completed"
    if isinstance(exc, Interrupted):
        return "KILLED", f"stopped by {signal.Signals(exc.signum).name}"
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", "interrupted (Ctrl-C)"
    return "FAILED", cause(exc)[:500]


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise `Interrupted` in the main thread while the body runs; off the main thread (a
    Prefect worker thread) signals cannot be handled there, and this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(signum)

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); '' where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces


def this_process() -> str:
    """`host|boot id|pid|start time`: which process a run is, recorded on its parent run."""
    pid = os.getpid()
    return f"{socket.gethostname()}|{_boot_id()}|{pid}|{_start_time(pid)}"


def process_gone(recorded: str) -> bool | None:
    """True when the recorded process is known to be dead, False when it runs, None when this host cannot tell (the
    run belongs to another machine, or the record is not ours)."""
    try:
        host, boot, pid_s, started = recorded.split("|")
        pid = int(pid_s)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    if boot and boot != _boot_id():
        return True  # the machine rebooted since
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    return bool(started) and _start_time(pid) != started  # the pid now belongs to another process


def reap(client, experiment_id: str, pipeline: str, by: str) -> list[str]:
    """Mark the RUNNING runs of `pipeline` whose process died FAILED (their RUNNING children too) and their Prefect
    flow runs CRASHED; returns the parent run ids reaped. `by`: the run that found them, named in the reason."""
    parents = client.search_runs(
        [experiment_id],
        f"tags.`distillery.pipeline` = '{pipeline}' and attributes.status = 'RUNNING'",
        max_results=200,
    )
    reaped = []
    for run in parents:
        tags = run.data.tags
        if "mlflow.parentRunId" in tags or not process_gone(tags.get(PROCESS_TAG, "")):
            continue
        host, _, pid, _ = tags[PROCESS_TAG].split("|")
        reason = f"its process ({pid} on {host}) died; found by run {by}"
        children = client.search_runs(
            [experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'"
        )
        for r in [*children, run]:
            client.set_tag(r.info.run_id, END_REASON, reason)
            client.set_terminated(r.info.run_id, "FAILED")
        crash_flow_run(tags.get("prefect.flow_run_id"), reason)
        if (lease := tags.get(LEASE_TAG)) and release_lease(lease):
            print(f"released run {run.info.run_id}'s concurrency slot (lease {lease[:8]})")
        reaped.append(run.info.run_id)
    return reaped


def crash_flow_run(flow_run_id: str | None, reason: str) -> None:
    """Set a dead run's Prefect flow run CRASHED (on whichever API this process talks to); a run unknown there, or
    an API that cannot be reached, is left as it is."""
    if not flow_run_id:
        return
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
    except Exception as e:  # best effort: the MLflow record is the one this guarantees
        print(f"could not mark Prefect flow run {flow_run_id} crashed: {type(e).__name__}: {e}".splitlines()[0])
