"""The served teacher's client against a stand-in HTTP server: what it does when the server is gone, hangs,
refuses the key, fails for a while, or tokenizes differently. tests/test_serving.py runs it against real vLLM."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distillery.teacher_server import PROBE, TeacherClient, TeacherServerError


class Stub:
    """/v1/models and /tokenize like vLLM's, with a behaviour: ok, hang, 401, or 503 for the first `fail` calls."""

    def __init__(self, tokens: list[int], behaviour: str = "ok", fail: int = 0):
        self.calls, self.auth = 0, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: dict):
                stub.calls += 1
                stub.auth.append(self.headers.get("Authorization"))
                if behaviour == "hang":
                    time.sleep(1.5)
                code = 401 if behaviour == "401" else 503 if stub.calls <= fail else 200
                data = json.dumps(body if code == 200 else {"error": "no"}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._answer({"data": [{"id": "teacher", "max_model_len": 256}]})

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self._answer({"tokens": tokens, "count": len(tokens), "max_model_len": 256})

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def probe_ids(tokenizer):
    return tokenizer(PROBE, add_special_tokens=False)["input_ids"]


def test_key_from_the_environment_and_the_students_tokenizer_pass(tokenizer, probe_ids, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-secret")
    stub = Stub(probe_ids)
    try:
        c = TeacherClient(f"{stub.url}/v1", api_key_env="TEACHER_KEY")
        c.check_tokenizer(tokenizer)
        assert c.model == "teacher" and c.max_model_len == 256 and stub.auth == ["Bearer sk-secret"] * 2
        with pytest.raises(TeacherServerError, match="does not fit the server's max_model_len 256"):
            c.get_sequence_logprobs([[1] * 300], [10])
    finally:
        stub.close()


def test_another_tokenizer_is_refused(tokenizer, probe_ids):
    stub = Stub(probe_ids[::-1])
    try:
        with pytest.raises(TeacherServerError, match="tokenizes text differently from the student"):
            TeacherClient(stub.url).check_tokenizer(tokenizer)
    finally:
        stub.close()


def test_a_gone_server_ends_in_one_line_naming_the_setting():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(TeacherServerError) as e:
        TeacherClient(f"http://127.0.0.1:{port}", max_retries=2)
    msg = str(e.value)
    assert msg.startswith("train.on_policy.teacher_server: teacher server http://127.0.0.1:")
    assert "connection refused) after 3 tries" in msg and "\n" not in msg
    assert time.perf_counter() - start < 10  # backoff 1 + 2 s, not TRL's minute of polling


def test_a_hanging_server_times_out_and_a_flaky_one_is_retried(probe_ids):
    hang = Stub(probe_ids, "hang")
    try:
        with pytest.raises(TeacherServerError, match=r"no answer within 0.5 s\) after 2 tries"):
            TeacherClient(hang.url, timeout=0.5, max_retries=1)
    finally:
        hang.close()
    flaky = Stub(probe_ids, fail=2)
    try:
        assert TeacherClient(flaky.url, max_retries=2).model == "teacher" and flaky.calls == 3
    finally:
        flaky.close()


def test_a_refused_key_is_not_retried(probe_ids):
    stub = Stub(probe_ids, "401")
    try:
        with pytest.raises(TeacherServerError, match="refused the API key"):
            TeacherClient(stub.url, max_retries=3)
        assert stub.calls == 1
    finally:
        stub.close()
