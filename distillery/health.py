"""The image's HEALTHCHECK: `python -m distillery.health [PID]` (default PID 1, the container's main process).

The rule: when that process is vLLM's OpenAI server (what `distillery serve-model` execs into), the container is
healthy when GET http://<its --host>:<its --port>/health answers 200, host and port read from the process's own
command line (0.0.0.0 probed as 127.0.0.1). Any other command (a pipeline run, `distillery serve` for Prefect,
--help) has no endpoint to probe and counts as healthy while it runs: exit 0.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from distillery.serving import SERVER_MODULE


def read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _option(argv: list[str], name: str) -> str | None:
    value = None
    for i, a in enumerate(argv):  # the last one wins, as with argparse
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def health_url(argv: list[str]) -> str | None:
    """The server's /health URL, or None when argv is not vLLM's OpenAI server."""
    if SERVER_MODULE not in argv:
        return None
    host = _option(argv, "--host") or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    port = _option(argv, "--port") or "8000"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/health"


def check(pid: int = 1, timeout: float = 5.0) -> int:
    url = health_url(read_cmdline(pid))
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 0 if r.status == 200 else 1
    except OSError as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(check(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
