"""The console of `distillery run`: a line as each stage starts and ends, one progress bar for long work, the
lines a person acts on (resumed, reused, waiting for a slot, registered) and the table; everything else (Prefect's
task-run lines, third-party warnings, sub-step progress bars, vLLM's and lm-eval's logs, tracebacks) goes to
`run.log` in the run folder. `--verbose` leaves the console as it was: everything, nowhere else.

Quiet mode moves file descriptors 1 and 2 onto the log, so what C code and child processes (vLLM's engine, lm-eval,
the quantize probes) write goes there too; the terminal is kept as a stream of its own for `say` and the bar.
Outside `quiet` (tests calling stages, deployment runs on a worker) `say` is `print`, which Prefect logs.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

LOG_NAME = "run.log"
_terminal: TextIO | None = None  # the console while quiet
_log: Path | None = None  # where fds 1 and 2 write while quiet


def say(message: str) -> None:
    """A line for the person at the console; in the log (and Prefect's) as well."""
    print(message, flush=True)
    if _terminal is not None:
        _terminal.write(message + "\n")
        _terminal.flush()


def log_path() -> Path | None:
    return _log


@contextmanager
def quiet(log: Path) -> Iterator[None]:
    """fds 1 and 2 onto `log` (appended) until exit; `say` and `bar` write to the terminal meanwhile."""
    global _terminal, _log
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    _point_at(log)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _terminal.close()
        _terminal, _log = None, None


def _point_at(log: Path) -> None:
    global _log
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _log = log


def move_log(run_dir: Path) -> None:
    """Once the run has its folder: the log so far joins `run_dir/run.log` (a resumed run's log goes on), and the
    rest is written there."""
    if _log is None:
        return
    dest = Path(run_dir) / LOG_NAME
    if dest == _log:
        return
    old = _log
    with open(old, "rb") as src, open(dest, "ab") as out:
        shutil.copyfileobj(src, out)
    _point_at(dest)
    old.unlink(missing_ok=True)


class Bar:
    """One progress bar on the terminal, with rate and ETA (tqdm); nothing when not quiet or not a terminal."""

    def __init__(self, what: str, total: int):
        self.tqdm = None
        if _terminal is not None and _terminal.isatty():
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, desc=what, file=_terminal, leave=False, dynamic_ncols=True)
        self.done = 0

    def update(self, done: int) -> None:
        if self.tqdm is not None and done > self.done:
            self.tqdm.update(done - self.done)
            self.done = done
            if done >= self.tqdm.total:
                self.close()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
            self.tqdm = None
