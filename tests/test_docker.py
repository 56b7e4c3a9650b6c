"""The Dockerfile is linted (no Docker engine runs here): hadolint must find nothing."""

from __future__ import annotations

import shutil
import subprocess

from .conftest import REPO


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    r = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_image_installs_the_gpu_extra_and_runs_as_non_root():
    text = (REPO / "Dockerfile").read_text()
    assert '".[gpu]"' in text and "USER 1000" in text and 'ENTRYPOINT ["distillery"]' in text
