"""The Dockerfile is linted (no Docker engine runs here): hadolint must find nothing, and its build targets are
checked as text."""

from __future__ import annotations

import re
import shutil
import subprocess

from .conftest import REPO


def stages() -> dict[str, list[str]]:
    """Instructions per stage name, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = m.group(1)
            out[current] = []
        assert current is not None, f"instruction before any named FROM: {line}"
        out[current].append(line)
    return out


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    r = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_cpu_and_gpu_targets_run_as_non_root_with_pinned_installs():
    s = stages()
    assert "cpu" in s and "gpu" in s
    assert list(s)[-1] == "gpu"  # a plain `docker build .` gives the GPU image
    for target in ("cpu", "gpu"):
        body = s[target]
        users = [line.split()[1] for line in body if line.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), target
        assert 'ENTRYPOINT ["distillery"]' in body, target
        assert body[0].split()[1] == "base", target  # both inherit the base stage's EXPOSE and HEALTHCHECK
    cpu = " ".join(s["cpu"])
    assert "-r requirements/cpu.lock" in cpu and "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    assert '-e ".[gpu]"' in " ".join(s["gpu"])
    assert re.search(r"FROM python:\d+\.\d+\.\d+-slim-\w+ AS base", " ".join(s["base"]))
    assert '"uv==' in " ".join(s["base"])


def test_serving_port_and_healthcheck():
    base = stages()["base"]
    assert "EXPOSE 8000" in base
    [health] = [line for line in base if line.startswith("HEALTHCHECK")]
    assert health.endswith('CMD ["python", "-m", "distillery.health"]') and "--start-period=" in health
