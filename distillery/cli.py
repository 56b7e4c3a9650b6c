"""The `distillery` command.

    distillery validate [FILE]                   check a pipelines file; exit 2 naming the bad field
    distillery list [--file FILE]                the pipelines a file defines
    distillery run PIPELINE [--set k=v ...]      run one pipeline now (ephemeral Prefect API unless PREFECT_API_URL)
    distillery serve [--pipelines a,b]           one Prefect deployment per pipeline, served from this process
    distillery serve-model MODEL [--draft D]     a model (folder, demo:*, run folder) behind vLLM's OpenAI server

Exit codes: 0 success, 1 a stage failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PACKAGED_FILE = Path(__file__).resolve().parents[1] / "pipelines.yaml"


def default_file() -> str:
    local = Path("pipelines.yaml")
    return str(local.resolve() if local.exists() else PACKAGED_FILE)


def _fail(lines: list[str], code: int = 2) -> int:
    for line in lines:
        print(line, file=sys.stderr)
    return code


def cmd_validate(args) -> int:
    from distillery.config import ConfigError, load_file

    try:
        f = load_file(args.file)
    except ConfigError as e:
        return _fail(e.lines)
    print(f"{args.file}: ok ({len(f.pipelines)} pipelines: {', '.join(f.pipelines)})")
    return 0


def cmd_list(args) -> int:
    from distillery.config import ConfigError, load_file

    try:
        f = load_file(args.file)
    except ConfigError as e:
        return _fail(e.lines)
    for name, p in f.pipelines.items():
        print(f"{name:14s} {' → '.join(p.stages):60s} {p.description}")
    return 0


def _offline_if_local(cfg) -> None:
    """Nothing in the pipeline needs the hub: say so, so no library waits on a network that is not there."""
    evals = Path(__file__).resolve().parents[1] / "evals"
    needs_hub = (
        cfg.data.source == "hub"
        or any(not ref.startswith(("demo:", "/")) for ref in (cfg.teacher.path, cfg.student.path))
        or any(not (evals / t).is_dir() for t in cfg.evaluate.tasks)
    )
    if not needs_hub:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")


def cmd_run(args) -> int:
    from distillery.config import ConfigError, load_pipeline, parse_overrides

    try:
        cfg = load_pipeline(args.file, args.pipeline, parse_overrides(args.set))
    except ConfigError as e:
        return _fail(e.lines)
    _offline_if_local(cfg)
    from flows.distill import distill

    try:
        result = distill(pipeline=args.pipeline, overrides=args.set, config_file=str(Path(args.file).resolve()),
                         track=not args.no_track)
    except KeyboardInterrupt:
        return _fail(["distillery: interrupted"], 130)
    except Exception as e:  # the traceback is in Prefect's log above; end with one line saying what failed
        return _fail([f"distillery: pipeline {args.pipeline} failed: {type(e).__name__}: {e}".splitlines()[0]], 1)
    # logs went to stderr; the answer goes to stdout
    if result.get("table"):
        print(f"\n{args.pipeline}: {result['run_dir']}  (MLflow run {result['mlflow_run_id']})\n")
        print(result["table"])
    return 0


def cmd_serve(args) -> int:
    from distillery.config import ConfigError, load_file

    try:
        f = load_file(args.file)
    except ConfigError as e:
        return _fail(e.lines)
    names = args.pipelines.split(",") if args.pipelines else list(f.pipelines)
    unknown = [n for n in names if n not in f.pipelines]
    if unknown:
        return _fail([f"--pipelines: unknown pipeline {unknown[0]!r} (defined: {', '.join(f.pipelines)})"])
    from prefect import serve

    from flows.distill import distill

    path = str(Path(args.file).resolve())
    deployments = [
        distill.to_deployment(name=n, parameters={"pipeline": n, "config_file": path},
                              description=f.pipelines[n].description, tags=["distillery", n])
        for n in names
    ]
    print(f"serving {len(deployments)} deployments: " + ", ".join(f"'distill/{n}'" for n in names))
    serve(*deployments, limit=args.limit)
    return 0


def cmd_serve_model(args) -> int:
    from distillery.serving import ServeError, serve

    if args.num_speculative_tokens is not None and not args.draft:
        return _fail(["--num-speculative-tokens: needs --draft"])
    if args.num_speculative_tokens is not None and args.num_speculative_tokens < 1:
        return _fail([f"--num-speculative-tokens: must be >= 1, got {args.num_speculative_tokens}"])
    if args.max_model_len is not None and args.max_model_len < 1:
        return _fail([f"--max-model-len: must be >= 1, got {args.max_model_len}"])
    if not 0 < args.port < 65536:
        return _fail([f"--port: must be 1-65535, got {args.port}"])
    try:
        return serve(args.model, api_key=args.api_key or os.environ.get("DISTILLERY_API_KEY") or None,
                     draft_ref=args.draft, print_command=args.print_command, host=args.host, port=args.port,
                     num_speculative_tokens=args.num_speculative_tokens or 4,
                     served_model_name=args.served_model_name, max_model_len=args.max_model_len, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code, vllm_args=args.vllm_args)
    except ServeError as e:
        return _fail([str(e)])


def quiet_defaults() -> None:
    """No phoning home from the libraries we drive (and Prefect's heartbeat races SQLite writers)."""
    for var, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)


def main(argv: list[str] | None = None) -> int:
    quiet_defaults()
    ap = argparse.ArgumentParser(prog="distillery", description="LLM distillation pipelines as a Prefect DAG.")
    ap.add_argument("--version", action="version", version=f"distillery {__import__('distillery').__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a pipelines file", description="Check a pipelines file; exit 2 "
                       "with one line per problem, naming the field.")
    p.add_argument("file", nargs="?", default=default_file(), help="default: ./pipelines.yaml")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("list", help="list the pipelines of a file")
    p.add_argument("--file", default=default_file())
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("run", help="run one pipeline now", description="Run one pipeline as a Prefect flow "
                       "(ephemeral API unless PREFECT_API_URL is set), logging to MLFLOW_TRACKING_URI "
                       "(default: sqlite:///mlflow.db here).")
    p.add_argument("pipeline")
    p.add_argument("--file", default=default_file())
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a field, e.g. --set train.epochs=1 (repeatable)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("serve", help="serve one Prefect deployment per pipeline",
                       description="Register 'distill/<pipeline>' deployments with the Prefect API at "
                       "PREFECT_API_URL and run what is triggered (`prefect deployment run 'distill/demo'`).")
    p.add_argument("--file", default=default_file())
    p.add_argument("--pipelines", help="comma-separated subset (default: all)")
    p.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: one GPU, one run)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "serve-model", help="serve a model with vLLM's OpenAI-compatible server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a model through vLLM's OpenAI-compatible server (/v1/completions,\n"
        "/v1/chat/completions, /health, /metrics). This process becomes the server: signals reach it\n"
        "and its exit code is this command's.",
        epilog="MODEL is a model folder, demo:teacher, demo:student, a hub id org/name, or a run folder\n"
        "runs/<pipeline>/<run>, which serves its final full-precision student: prune/ if the run pruned, else\n"
        "train/ (quantize/ holds bitsandbytes checkpoints the CPU build cannot serve; name them on a GPU).\n\n"
        "examples:\n"
        "  distillery serve-model runs/demo/<run>\n"
        "  distillery serve-model demo:teacher --draft runs/demo/<run>/train --num-speculative-tokens 4\n"
        "  DISTILLERY_API_KEY=... distillery serve-model demo:student --print-command\n"
        "  distillery serve-model demo:student -- --enforce-eager     # after --: passed to vLLM as is")
    p.add_argument("model", help="model folder, demo:teacher|demo:student, run folder or hub id")
    p.add_argument("--draft", metavar="FOLDER", help="speculative decoding: this model (folder, demo:*, run folder) "
                   "drafts for MODEL; it must have MODEL's vocabulary")
    p.add_argument("--num-speculative-tokens", type=int, metavar="K", help="draft tokens per step (default 4)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", help="require this bearer token on /v1 (default: $DISTILLERY_API_KEY; prefer the "
                   "variable, a command line shows in ps). Never printed")
    p.add_argument("--served-model-name", metavar="NAME", help="the name clients ask for (vLLM's default: the path)")
    p.add_argument("--max-model-len", type=int, metavar="TOKENS", help="context length (default: the model's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights and activations "
                   "(default: vLLM's auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own Python code (off)")
    p.add_argument("--print-command", action="store_true", help="print the server command (the key as "
                   "$DISTILLERY_API_KEY) and exit, e.g. to run it on a GPU box")
    p.set_defaults(fn=cmd_serve_model)

    argv = sys.argv[1:] if argv is None else list(argv)
    vllm_args: list[str] = []
    if "--" in argv:  # argparse in 3.11 rejects "--" after a subcommand's options; split it off ourselves
        cut = argv.index("--")
        argv, vllm_args = argv[:cut], argv[cut + 1 :]
    args = ap.parse_args(argv)
    if vllm_args and args.command != "serve-model":
        ap.error("arguments after -- are passed to vLLM by serve-model only")
    args.vllm_args = vllm_args
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
