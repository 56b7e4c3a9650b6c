"""A teacher behind an OpenAI-compatible vLLM server (`distillery serve-model`), scored from the trainer.

TRL's ServerDistillationTrainer asks the server for the teacher's log-probs of sequences it already has (the
completions API with `prompt_logprobs` and one throwaway token). Its own client sends no API key, waits for no
timeout and retries only at the connection level; this one sends the key from the environment (never argv or
logs), gives every request a timeout, retries connection failures, timeouts and 5xx with backoff, and ends in one
line naming the setting and the server when the server is gone. It also checks, before training, that the
server's tokenizer is the student's: the server scores the student's token ids as they are.
"""

from __future__ import annotations

import os
import time

PROBE = "Distillery probe: 12 + 30 = 42 <think> ünïcödé </think>"


class TeacherServerError(RuntimeError):
    """The teacher server is unreachable, refused the request, or serves another vocabulary."""


class TeacherClient:
    """`get_sequence_logprobs` as TRL's VLLMClient has it, with a key, timeouts, retries and clear errors."""

    def __init__(
        self,
        base_url: str,
        api_key_env: str = "DISTILLERY_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        where: str = "train.on_policy.teacher_server",
    ):
        import requests

        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout, self.max_retries, self.where = timeout, max_retries, where
        self.session = requests.Session()
        key = os.environ.get(api_key_env)
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.requests = 0
        self.max_model_len: int | None = None
        self.model = self._call("GET", "/v1/models")["data"][0]["id"]

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        import requests

        url = f"{self.base_url}{path}"
        reason = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(2.0 ** (attempt - 1), 8.0))
            try:
                r = self.session.request(method, url, json=payload, timeout=self.timeout)
            except requests.Timeout:
                reason = f"no answer within {self.timeout:g} s"
                continue
            except requests.ConnectionError:
                reason = "connection refused"
                continue
            self.requests += 1
            if r.status_code == 200:
                return r.json()
            if r.status_code in (401, 403):
                raise TeacherServerError(
                    f"{self.where}: {url} refused the API key (HTTP {r.status_code}); set the key in the variable "
                    "api_key_env names"
                )
            if r.status_code < 500 and r.status_code != 429:
                raise TeacherServerError(f"{self.where}: {url} answered HTTP {r.status_code}: {r.text[:300]}")
            reason = f"HTTP {r.status_code}"
        raise TeacherServerError(
            f"{self.where}: teacher server {self.base_url} gave no answer ({reason}) after {self.max_retries + 1} "
            "tries; is `distillery serve-model` still running there?"
        )

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a server whose tokenizer splits text differently from the student's (it would score ids that
        mean other tokens to it)."""
        served = self._call("POST", "/tokenize", {"model": self.model, "prompt": PROBE, "add_special_tokens": False})
        ours = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        if served.get("tokens") != ours:
            raise TeacherServerError(
                f"{self.where}: the served model {self.model!r} tokenizes text differently from the student "
                f"({len(served.get('tokens') or [])} vs {len(ours)} tokens for a probe): a served teacher needs the "
                "student's tokenizer"
            )
        self.max_model_len = served.get("max_model_len")

    def get_sequence_logprobs(
        self, sequences: list[list[int]], prompt_lengths: list[int], top_logprobs: int = 1, temperature: float = 1.0
    ) -> dict[str, list]:
        """The teacher's top-k log-probs at every completion position of each sequence (TRL's format)."""
        from trl.generation.vllm_client import VLLMClient

        if self.max_model_len and max(map(len, sequences)) >= self.max_model_len:
            raise TeacherServerError(
                f"{self.where}: a {max(map(len, sequences))}-token sequence does not fit the server's "
                f"max_model_len {self.max_model_len}; serve the teacher with a longer --max-model-len"
            )
        payload = {
            "model": self.model,
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": temperature,
            "prompt_logprobs": top_logprobs,
        }
        choices = sorted(self._call("POST", "/v1/completions", payload)["choices"], key=lambda c: c["index"])
        results = [
            VLLMClient._format_sequence_logprobs(c, s, p, top_logprobs)
            for c, s, p in zip(choices, sequences, prompt_lengths, strict=True)
        ]
        return {key: [r[key] for r in results] for key in results[0]}
