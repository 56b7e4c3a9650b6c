"""`distillery serve-model`: argument handling (fast), then the real OpenAI client against real vLLM servers on
127.0.0.1 (slow): an API-keyed student, and the teacher with the student as its speculative draft, whose greedy
answers must equal the teacher's own."""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from distillery.demo.assets import TEACHER_DIR
from flows.cli import main

from .conftest import REPO
from .test_generate import free_port

KEY = "sk-serve-test-4f2a9c"


def fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


# ------------------------------------------------------------------------------------------- argument handling


def test_print_command_binds_loopback_carries_the_draft_and_hides_the_key(tiny_student, capsys, monkeypatch):
    monkeypatch.delenv("DISTILLERY_API_KEY", raising=False)
    rc = main(
        [
            "serve-model",
            str(TEACHER_DIR),
            "--draft",
            str(tiny_student),
            "--api-key",
            KEY,
            "--served-model-name",
            "teacher",
            "--print-command",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert KEY not in out + err
    assert "--host 127.0.0.1" in out and "--port 8000" in out and "--trust-remote-code" not in out
    argv = shlex.split(out)
    assert argv[0] == "VLLM_API_KEY=$DISTILLERY_API_KEY"  # a reference the shell expands where it is run
    assert argv[1:4] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(TEACHER_DIR)
    assert argv[argv.index("--served-model-name") + 1] == "teacher"
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "draft_model", "model": str(tiny_student), "num_speculative_tokens": 4}


def test_print_command_options_and_passthrough(tiny_student, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLERY_API_KEY", KEY)
    rc = main(
        [
            "serve-model",
            "demo:teacher",
            "--draft",
            str(tiny_student),
            "--num-speculative-tokens",
            "2",
            "--host",
            "0.0.0.0",
            "--port",
            "9001",
            "--max-model-len",
            "128",
            "--dtype",
            "bfloat16",
            "--trust-remote-code",
            "--print-command",
            "--",
            "--enforce-eager",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert KEY not in out + err
    argv = shlex.split(out)
    for flag, value in (("--host", "0.0.0.0"), ("--port", "9001"), ("--max-model-len", "128"), ("--dtype", "bfloat16")):
        assert argv[argv.index(flag) + 1] == value
    assert "--trust-remote-code" in argv and argv[-1] == "--enforce-eager"
    assert json.loads(argv[argv.index("--speculative-config") + 1])["num_speculative_tokens"] == 2


def test_no_key_no_key_variable(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("DISTILLERY_API_KEY", raising=False)
    assert main(["serve-model", str(fake_model(tmp_path / "m")), "--print-command"]) == 0
    out = capsys.readouterr().out
    assert "API_KEY" not in out and out.startswith("python -m vllm.entrypoints.openai.api_server --model ")


def test_run_folder_serves_the_pruned_student_else_the_trained_one(tmp_path, capsys):
    run = tmp_path / "runs" / "demo" / "20260101-000000-abc"
    fake_model(run / "train")
    fake_model(run / "quantize" / "nf4")
    assert main(["serve-model", str(run), "--print-command"]) == 0
    assert f"--model {run / 'train'} " in capsys.readouterr().out
    fake_model(run / "prune")
    fake_model(run / "prune-unhealed")
    assert main(["serve-model", str(run), "--print-command"]) == 0
    assert f"--model {run / 'prune'} " in capsys.readouterr().out


def test_missing_or_empty_folders_are_refused_with_the_path_named(tmp_path, capsys, tiny_student, monkeypatch):
    missing = tmp_path / "no" / "such-model"
    assert main(["serve-model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"model: folder does not exist: {missing}\n"
    assert main(["serve-model", str(TEACHER_DIR), "--draft", str(missing)]) == 2
    assert capsys.readouterr().err == f"--draft: folder does not exist: {missing}\n"
    (tmp_path / "runs").mkdir()  # `runs/typo` names a folder under a local one: a mistyped path, not a hub id
    monkeypatch.chdir(tmp_path)
    assert main(["serve-model", "runs/typo", "--print-command"]) == 2
    assert capsys.readouterr().err == "model: folder does not exist: runs/typo\n"
    assert main(["serve-model", "Qwen/Qwen2.5-0.5B", "--print-command"]) == 0  # no local Qwen/: a hub id
    assert "--model Qwen/Qwen2.5-0.5B " in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["serve-model", str(tmp_path / "empty"), "--print-command"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "not a model or run folder" in err and err.count("\n") == 1


def test_draft_with_another_vocabulary_is_refused(tmp_path, capsys):
    from transformers import AutoTokenizer

    draft = tmp_path / "other-vocab"
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(draft)
    shutil.copy(TEACHER_DIR / "config.json", draft / "config.json")
    assert main(["serve-model", str(TEACHER_DIR), "--draft", str(draft), "--print-command"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    n = len(AutoTokenizer.from_pretrained(TEACHER_DIR).get_vocab())
    assert err.startswith(f"--draft {draft}: target and draft vocabularies differ (sizes {n} vs {n + 1}")


def test_bad_usage_exits_2(capsys):
    assert main(["serve-model", str(TEACHER_DIR), "--num-speculative-tokens", "3"]) == 2
    assert "--num-speculative-tokens: needs --draft" in capsys.readouterr().err
    assert main(["serve-model", str(TEACHER_DIR), "--port", "70000"]) == 2
    assert main(["serve-model", str(TEACHER_DIR), "--max-model-len", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "--port: must be 1-65535, got 70000",
        "--max-model-len: must be >= 1, got 0",
    ]
    with pytest.raises(SystemExit) as e:
        main(["validate", "--", "--enforce-eager"])
    assert e.value.code == 2


def test_exec_hands_the_key_over_in_the_environment_only(monkeypatch, tmp_path, capsys):
    """The process becomes the server (exec): signals and the exit code are the server's own."""
    from distillery import serving

    seen = {}

    class Exec(Exception):
        pass

    def fake_execve(path, argv, env):
        seen.update(path=path, argv=argv, env=env)
        raise Exec

    monkeypatch.setattr(serving.os, "execve", fake_execve)
    monkeypatch.setattr(serving, "require_vllm", lambda: None, raising=False)
    monkeypatch.setenv("DISTILLERY_API_KEY", KEY)
    with pytest.raises(Exec):
        main(["serve-model", str(fake_model(tmp_path / "m")), "--port", "8123"])
    assert seen["path"] == sys.executable and seen["argv"][:3] == [sys.executable, "-m", serving.SERVER_MODULE]
    assert KEY not in " ".join(seen["argv"]) and seen["env"]["VLLM_API_KEY"] == KEY
    assert "VLLM_CPU_KVCACHE_SPACE" in seen["env"]  # vllm_env()'s CPU settings
    assert KEY not in capsys.readouterr().err


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_healthcheck_probes_only_a_serving_container():
    from distillery.health import health_url

    assert health_url(["/usr/local/bin/distillery", "run", "demo"]) is None
    assert (
        health_url(
            [
                "python",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                "m",
                "--host",
                "0.0.0.0",
                "--port",
                "9000",
            ]
        )
        == "http://127.0.0.1:9000/health"
    )
    assert (
        health_url(["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"])
        == "http://127.0.0.1:8000/health"
    )
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake = [
        sys.executable,
        "-c",
        "import time; time.sleep(60)",
        "vllm.entrypoints.openai.api_server",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(fake)  # a process whose command line looks like the server's
    try:
        check = [sys.executable, "-m", "distillery.health", str(proc.pid)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        assert subprocess.run(check, env=env, capture_output=True).returncode == 0
        server.shutdown()
        server.server_close()
        r = subprocess.run(check, env=env, capture_output=True, text=True)
        assert r.returncode == 1 and f"127.0.0.1:{port}/health" in r.stderr
        assert subprocess.run([*check[:3], str(os.getpid())], env=env).returncode == 0  # pytest: not a server
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------ real vLLM servers


class Server:
    """`distillery serve-model ...` as a child process; the process is the vLLM server itself (exec)."""

    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "serve-model",
            *args,
            "--port",
            str(self.port),
            "--max-model-len",
            "256",
            "--dtype",
            "bfloat16",
            "--",
            "--enforce-eager",
        ]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 400) -> Server:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                time.sleep(2)
        raise TimeoutError(f"server not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def teacher_servers(tmp_path_factory):
    """The teacher alone and the teacher with the demo student as its draft, started side by side, both behind
    the API key. Module scope: the three tests at the end of this file share them (vLLM starts slowly on 2 cores)."""
    logs = tmp_path_factory.mktemp("serve")
    alone = Server(
        logs / "teacher.log", "demo:teacher", "--served-model-name", "teacher", env={"DISTILLERY_API_KEY": KEY}
    )
    drafted = Server(
        logs / "drafted.log",
        "demo:teacher",
        "--served-model-name",
        "teacher",
        "--draft",
        "demo:student",
        "--num-speculative-tokens",
        "4",
        env={"DISTILLERY_API_KEY": KEY},
    )
    try:
        yield alone.wait_ready(), drafted.wait_ready()
    finally:
        alone.stop()
        drafted.stop()


@pytest.mark.slow
@pytest.mark.vllm
def test_served_model_needs_its_key_and_answers_both_apis(teacher_servers):
    import openai

    from distillery.health import check

    s = teacher_servers[0]
    with pytest.raises(urllib.error.HTTPError) as e:  # no key
        urllib.request.urlopen(f"{s.url}/v1/models", timeout=10)
    assert e.value.code == 401
    with pytest.raises(openai.AuthenticationError):  # a wrong key
        openai.OpenAI(base_url=f"{s.url}/v1", api_key="sk-wrong", max_retries=0).models.list()

    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["teacher"]
    c = client.completions.create(
        model="teacher", prompt="Question: Max has 2 shells.\nAnswer:", max_tokens=8, temperature=0
    )
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens >= 1
    assert isinstance(c.choices[0].text, str)
    chat = client.chat.completions.create(
        model="teacher",
        max_tokens=8,
        temperature=0,
        messages=[{"role": "user", "content": "Question: 2 + 2?\nAnswer:"}],
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    assert isinstance(chat.choices[0].message.content, str)

    # the process is vLLM's server (exec), the key is in neither its command line nor its log, and the
    # image's health check probes it
    cmdline = Path(f"/proc/{s.proc.pid}/cmdline").read_bytes().decode()
    assert "vllm.entrypoints.openai.api_server" in cmdline and KEY not in cmdline
    assert KEY not in s.log.read_text()
    assert check(s.proc.pid) == 0


@pytest.mark.slow
@pytest.mark.vllm
def test_exit_code_is_the_servers(tmp_path):
    """Exec, not a child: vLLM's own argument error (exit 2) is the command's exit code."""
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve-model", "demo:teacher", "--", "--no-such-vllm-flag"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "--no-such-vllm-flag" in r.stderr


@pytest.mark.slow
@pytest.mark.vllm
def test_teacher_with_draft_answers_exactly_as_the_teacher_alone(teacher_servers):
    """Greedy speculative decoding must not change a single token. The draft is the random-init demo student,
    whose proposals the teacher rejects (acceptance 0 here): this checks that rejected drafts leave the output
    alone; the draft stage (test_e2e) checks a trained student, accepted at ~0.84, with identical outputs."""
    import openai

    from distillery.artifacts import read_jsonl
    from distillery.data import DEMO_EVAL_FILE

    prompts = [r["question"] for r in read_jsonl(DEMO_EVAL_FILE)][:8]
    answers = []
    for server in teacher_servers:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        # one request at a time: the same batch shapes on both servers
        answers.append(
            [
                client.completions.create(model="teacher", prompt=p, max_tokens=48, temperature=0).choices[0].text
                for p in prompts
            ]
        )
    alone, drafted = answers
    assert sum("<think>" in a for a in alone) >= 6  # the real teacher answered
    assert drafted == alone

    with urllib.request.urlopen(f"{teacher_servers[1].url}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    proposed = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("vllm:spec_decode_num_draft_tokens_total")
    )
    assert proposed > 0, "the draft proposed nothing: speculative decoding was not on"


@pytest.mark.slow
@pytest.mark.vllm
def test_on_policy_against_the_served_teacher(teacher_servers, tiny_student, gold_records, tmp_path, monkeypatch):
    """train.on_policy.teacher_server: the teacher stays in its vLLM server and scores the student's rollouts.
    The server's log-probs are the local teacher's (bf16 serving), untempered (why temperature must be 1 there); a
    student that is the teacher has loss ~0 against it, and demo-onpolicy's settings train the demo student."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.artifacts import write_jsonl
    from distillery.config import load_pipeline, parse_overrides
    from distillery.methods import run_method
    from distillery.teacher_server import TeacherClient, TeacherServerError

    url = teacher_servers[0].url
    monkeypatch.setenv("TEACHER_KEY", "sk-wrong")
    with pytest.raises(TeacherServerError, match="refused the API key"):
        TeacherClient(url, api_key_env="TEACHER_KEY")
    monkeypatch.setenv("TEACHER_KEY", KEY)
    client = TeacherClient(f"{url}/v1", api_key_env="TEACHER_KEY")
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    client.check_tokenizer(tok)
    r = gold_records[0]
    ids = tok(r["prompt"] + r["completion"])["input_ids"]
    p = len(tok(r["prompt"])["input_ids"])
    served = [client.get_sequence_logprobs([ids], [p], 1, t)["actual_logprobs"][0] for t in (1.0, 2.0)]
    assert served[0] == served[1]  # vLLM's prompt log-probs ignore the temperature
    with torch.no_grad():
        logp = AutoModelForCausalLM.from_pretrained(TEACHER_DIR)(torch.tensor([ids])).logits.log_softmax(-1)[0]
    local = [logp[i - 1, ids[i]].item() for i in range(p, len(ids))]
    diffs = [abs(a[0] - b) for a, b in zip(served[0], local, strict=True)]
    assert len(diffs) > 8 and sum(diffs) / len(diffs) < 0.1, diffs  # aligned position by position

    server = f"train.on_policy.teacher_server={{base_url: '{url}', api_key_env: TEACHER_KEY}}"
    sets = ["train.batch_size=8", "train.logging_steps=1", "train.on_policy.max_steps=3"]
    sets += ["train.on_policy.max_new_tokens=16", "train.on_policy.sft_first=false", server]
    write_jsonl(tmp_path / "kept.jsonl", gold_records[:32])
    losses = {}
    for name, student, lr in [("self", TEACHER_DIR, 1e-9), ("student", tiny_student, 1e-3)]:
        cfg = load_pipeline(
            REPO / "pipelines.yaml", "demo-onpolicy", parse_overrides([*sets, f"train.on_policy.learning_rate={lr}"])
        )
        out = tmp_path / name
        figures = run_method(cfg, str(student), str(tmp_path / "kept.jsonl"), None, out)
        manifest = json.loads((out / "manifest.json").read_text())
        losses[name] = [h["loss"] for h in manifest["loss_history"] if "loss" in h]
        assert figures["steps"] == 3 and manifest["teacher_server"]["requests"] >= 3
        assert manifest["on_policy"]["teacher_server"]["base_url"] == url
    assert all(abs(x) < 1e-3 for x in losses["self"]), losses
    assert all(math.isfinite(x) and x > 0.005 for x in losses["student"]), losses  # 1,000x self


@pytest.mark.slow
@pytest.mark.vllm
def test_hosted_teacher_is_the_served_teacher(teacher_servers, tiny_student, tmp_path, monkeypatch):
    """The generate stage's openai backend against the served teacher (API key from the environment variable the
    pipeline names), top-k logprobs by token id and logit KD on them; then the server is stopped and a re-run is
    answered entirely from the request cache. Last in this file: it stops the shared server."""
    from distillery.artifacts import read_jsonl
    from distillery.config import load_pipeline, parse_overrides
    from tasks.generate import generate

    alone = teacher_servers[0]
    monkeypatch.setenv("TEACHER_KEY", KEY)
    overrides = [
        f"output_dir={tmp_path / 'runs'}",
        f"generate.cache_dir={tmp_path / 'cache'}",
        "data.num_prompts=8",
        "generate.n=2",
        "generate.temperature=0.7",
        "generate.backend=openai",
        "generate.logprobs=4",
        f"generate.openai={{base_url: '{alone.url}/v1', model: teacher, api_key_env: TEACHER_KEY, max_concurrency: 4}}",
    ]
    cfg = load_pipeline(REPO / "pipelines.yaml", "demo", parse_overrides(overrides))
    res = generate(cfg, tmp_path / "out")
    rows = read_jsonl(Path(res["path"]))
    assert len(rows) == 16 and all(r["backend"] == "openai" for r in rows)
    assert sum(r["completion"].strip().startswith("<think>") for r in rows) >= 12  # the real teacher answered

    # the served teacher's top-4 by token id (vLLM's token_id:N names): logit KD from a teacher not loaded here
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from distillery.config import KDConfig
    from distillery.methods import logit_kd
    from distillery.training import SFTParams

    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    lp_path = Path(res["path"]).parent / "logprobs.parquet"
    lps = {(x["prompt_id"], x["sample"]): x for x in pq.read_table(lp_path).to_pylist()}
    for r in rows:
        x = lps[(r["prompt_id"], r["sample"])]
        assert tok.decode(x["token_ids"], skip_special_tokens=True) == r["completion"] and all(
            len(t) == 4 for t in x["top_ids"]
        )
        assert all(c <= top[0] + 1e-2 for c, top in zip(x["token_logprobs"], x["top_logprobs"], strict=True))
    params = SFTParams(max_steps=2, batch_size=8, learning_rate=1e-3, logging_steps=1, max_length=160)
    figures = logit_kd(
        str(tiny_student), str(TEACHER_DIR), rows, lp_path, tmp_path / "kd", params, KDConfig(), 0.7, "raw_logprobs"
    )
    assert figures["steps"] == 2 and figures["final_loss"] > 0
    alone.stop()
    shutil.rmtree(tmp_path / "cache" / "generate")  # drop the shard cache: only the request cache is left
    again = generate(cfg, tmp_path / "out2")
    assert read_jsonl(Path(again["path"])) == rows  # no server, same answers: nothing was paid twice
