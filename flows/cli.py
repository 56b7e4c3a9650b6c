"""The `distillery` command.

    distillery validate [FILE]                   check a pipelines file; exit 2 naming the bad field
    distillery list [--file FILE]                the pipelines a file defines
    distillery run PIPELINE [--set k=v ...]      run one pipeline now (ephemeral Prefect API unless PREFECT_API_URL)
    distillery deploy --work-pool POOL [--pipelines a,b]   one deployment per pipeline, run by the pool's workers
    distillery train PIPELINE --traces F --out D only the train stage, on kept traces; works under `accelerate launch`
    distillery serve [--pipelines a,b]           one Prefect deployment per pipeline, served from this process
    distillery serve-model MODEL [--draft D]     a model (folder, demo:*, run folder) behind vLLM's OpenAI server

Exit codes: 0 success, 1 a stage failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
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
    from distillery.preflight import preflight

    try:
        f = load_file(args.file)
    except ConfigError as e:
        return _fail(e.lines)
    if problems := [line for name, p in f.pipelines.items() for line in preflight(p, name)]:
        return _fail(problems)
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
    from distillery.config import BUILTIN_PREFIXES

    evals = Path(__file__).resolve().parents[1] / "evals"
    needs_hub = (
        cfg.data.source == "hub"
        or any(not ref.startswith((*BUILTIN_PREFIXES, "/")) for ref in (cfg.teacher.path, cfg.student.path))
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
    from distillery.preflight import preflight

    if problems := preflight(cfg, args.pipeline):  # before Prefect, MLflow or a run folder exist
        return _fail(problems)
    _offline_if_local(cfg)
    from contextlib import nullcontext

    from distillery import console
    from flows.distill import distill

    # quiet: fds 1 and 2 go to a log that joins the run folder as run.log once the run has one
    early = Path(cfg.output_dir).resolve() / args.pipeline / f".run-{os.getpid()}.log"
    log: list[Path | None] = [None]
    try:
        with nullcontext() if args.verbose else console.quiet(early):
            try:
                result = distill(
                    pipeline=args.pipeline,
                    overrides=args.set,
                    config_file=str(Path(args.file).resolve()),
                    track=not args.no_track,
                    resume=args.resume,
                    fresh=args.fresh,
                )
            finally:
                log[0] = console.log_path()
    except ConfigError as e:  # --resume of a folder that is not a run of this pipeline, or still running
        return _fail(e.lines)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (distillery.lifecycle.Interrupted): 128 + the signal
        signum = getattr(e, "signum", 2)
        return _fail(
            [f"distillery: pipeline {args.pipeline} {'interrupted' if signum == 2 else 'terminated'}"], 128 + signum
        )
    except Exception as e:  # the traceback is in Prefect's log above; end with one line saying what failed
        from distillery.lifecycle import describe_failure

        where = f" (details: {log[0]})" if log[0] else ""
        return _fail([f"distillery: pipeline {args.pipeline} {describe_failure(e)}{where}"], 1)
    if not args.verbose:  # Prefect's "Stopping temporary server" at exit is the log's, not the console's
        import logging

        logging.getLogger("prefect").setLevel(logging.WARNING)
    # logs went to stderr; the answer goes to stdout
    if result.get("table"):
        print(f"\n{args.pipeline}: {result['run_dir']}  (MLflow run {result['mlflow_run_id']})\n")
        print(result["table"])
    return 0


def cmd_train(args) -> int:
    """The train stage alone, without Prefect: what `accelerate launch` runs on every process. Process 0 logs one
    MLflow run (top level, not a pipeline's child) unless --no-track."""
    from distillery.config import ConfigError, load_pipeline, parse_overrides

    try:
        cfg = load_pipeline(args.file, args.pipeline, parse_overrides(args.set))
    except ConfigError as e:
        return _fail(e.lines)
    traces = Path(args.traces)
    if not traces.is_file():
        return _fail([f"--traces: no such file {traces}"])
    from distillery.preflight import jsonl_problem

    needed = ("prompt", "answer") if cfg.train.method == "hard" else ("prompt", "completion")
    if problem := jsonl_problem(traces, {k: k for k in needed}, what="traces"):
        return _fail([f"--traces: {problem[1]}"])
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        return _fail([f"--out: {out} exists and is not a folder"])
    _offline_if_local(cfg)
    import torch
    from accelerate import PartialState

    from distillery.demo.assets import resolve_model
    from distillery.tracking import NullTracker, Tracker
    from tasks.train import train_logged

    # Under `accelerate launch` (torchrun) this joins the process group the Trainer then uses: NCCL on GPUs, gloo
    # on CPUs; cpu= as the Trainer's use_cpu (distillery.training.common_args), or the two would disagree.
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():  # rank 0 builds a cached demo student; the others then read it
        student = resolve_model(cfg.student.path, seed=cfg.train.seed)
    print(
        f"distillery train: process {state.process_index} of {state.num_processes} ({state.distributed_type.value},"
        f" {state.backend or 'no backend'}, {state.device}); method {cfg.train.method}, student {student}",
        file=sys.stderr,
        flush=True,
    )
    # process 0 alone records the run, as it alone writes --out: one MLflow run however many processes train
    tracker = Tracker(cfg.experiment) if state.is_main_process and not args.no_track else NullTracker()
    try:
        with tracker.stage(
            "train", None, {"distillery.pipeline": args.pipeline, "distillery.entrypoint": "distillery train"}
        ) as run:
            figures = train_logged(cfg, run, student, str(traces.resolve()), None, out)
    except KeyboardInterrupt:
        return _fail(["distillery: interrupted"], 130)
    except Exception as e:
        return _fail([f"distillery: train {args.pipeline} failed: {type(e).__name__}: {e}".splitlines()[0]], 1)
    if state.is_main_process:
        logged = "" if args.no_track else f" (MLflow run {run.run_id} at {tracker.uri})"
        print(
            f"{out}: steps {figures['steps']}, final loss {figures['final_loss']:.4f}, "
            f"{figures['train_seconds']:.1f}s on {figures['world_size']} processes{logged}"
        )
    return 0


def _selected(args):
    """The file and the pipelines named by --pipelines (default all), or the one-line error lines."""
    from distillery.config import ConfigError, load_file

    try:
        f = load_file(args.file)
    except ConfigError as e:
        return None, [], e.lines
    names = [n.strip() for n in args.pipelines.split(",")] if args.pipelines else list(f.pipelines)
    unknown = [n for n in names if n not in f.pipelines]
    if unknown:
        return None, [], [f"--pipelines: unknown pipeline {unknown[0]!r} (defined: {', '.join(f.pipelines)})"]
    return f, names, []


def _api_problem() -> str | None:
    """Deployments live on a server: say so in one line when there is none to talk to."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return (
            "PREFECT_API_URL is not set: deployments need a Prefect server "
            "(prefect server start; export PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    return f"PREFECT_API_URL={url}: no Prefect API answers ({type(error).__name__})" if error else None


def _schedule_note(p) -> str:
    s = p.schedule
    if s is None:
        return "no schedule"
    when = f"cron {s.cron!r}" if s.cron is not None else f"every {s.interval:g}s"
    return f"{when} {s.timezone}" + ("" if s.active else " (inactive)")


def cmd_deploy(args) -> int:
    f, names, problems = _selected(args)
    if problems:
        return _fail(problems)
    try:
        job_variables = json.loads(args.job_variables) if args.job_variables else None
        if job_variables is not None and not isinstance(job_variables, dict):
            raise ValueError("expected a JSON object")
    except ValueError as e:
        return _fail([f"--job-variables: not a JSON object ({e})"])
    problem = _api_problem()
    if problem:
        return _fail([problem])
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(args.work_pool)
        except ObjectNotFound:
            return _fail(
                [
                    f"--work-pool {args.work_pool}: no such work pool "
                    f"(create one: prefect work-pool create {args.work_pool} --type process)"
                ]
            )
    from flows.deploy import deploy_to_pool, ensure_limit

    path = str(Path(args.file).resolve())
    for limit in {
        f.pipelines[n].concurrency.limit_name: f.pipelines[n].concurrency
        for n in names
        if f.pipelines[n].concurrency.enabled
    }.values():
        print(ensure_limit(limit))
    for n in names:
        deploy_to_pool(n, f.pipelines[n], path, args.work_pool, job_variables, args.image)
        print(f"deployed 'distill/{n}' to work pool {args.work_pool!r} ({_schedule_note(f.pipelines[n])})")
    print(f"start a worker: prefect worker start --pool {args.work_pool}")
    return 0


def cmd_serve(args) -> int:
    f, names, problems = _selected(args)
    if problems:
        return _fail(problems)
    from prefect import serve

    from flows.deploy import deployment_args, ensure_limit
    from flows.distill import distill

    if _api_problem() is None:  # an ephemeral API forgets the limit when we exit; only a server keeps it
        for limit in {
            f.pipelines[n].concurrency.limit_name: f.pipelines[n].concurrency
            for n in names
            if f.pipelines[n].concurrency.enabled
        }.values():
            print(ensure_limit(limit))
    path = str(Path(args.file).resolve())
    deployments = [distill.to_deployment(**deployment_args(n, f.pipelines[n], path)) for n in names]
    print(
        f"serving {len(deployments)} deployments: "
        + ", ".join(f"'distill/{n}' ({_schedule_note(f.pipelines[n])})" for n in names)
    )
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
        return serve(
            args.model,
            api_key=args.api_key or os.environ.get("DISTILLERY_API_KEY") or None,
            draft_ref=args.draft,
            print_command=args.print_command,
            host=args.host,
            port=args.port,
            num_speculative_tokens=args.num_speculative_tokens or 4,
            served_model_name=args.served_model_name,
            max_model_len=args.max_model_len,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            vllm_args=args.vllm_args,
        )
    except ServeError as e:
        return _fail([str(e)])


def quiet_defaults() -> None:
    """No phoning home from the libraries we drive (and Prefect's heartbeat races SQLite writers). The ephemeral
    Prefect API gets 2 minutes to start, not 20 s: on a busy machine (a training run beside it) it took longer."""
    for var, value in (
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("VLLM_NO_USAGE_STATS", "1"),
        ("DO_NOT_TRACK", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
    ):
        os.environ.setdefault(var, value)


def main(argv: list[str] | None = None) -> int:
    quiet_defaults()
    ap = argparse.ArgumentParser(prog="distillery", description="LLM distillation pipelines as a Prefect DAG.")
    ap.add_argument("--version", action="version", version=f"distillery {__import__('distillery').__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "validate",
        help="check a pipelines file",
        description="Check a pipelines file; exit 2 with one line per problem, naming the field.",
    )
    p.add_argument("file", nargs="?", default=default_file(), help="default: ./pipelines.yaml")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("list", help="list the pipelines of a file")
    p.add_argument("--file", default=default_file())
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser(
        "run",
        help="run one pipeline now",
        description="Run one pipeline as a Prefect flow "
        "(ephemeral API unless PREFECT_API_URL is set), logging to MLFLOW_TRACKING_URI "
        "(default: sqlite:///mlflow.db here).",
    )
    p.add_argument("pipeline")
    p.add_argument("--file", default=default_file())
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override a field, e.g. --set train.epochs=1 (repeatable)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_DIR",
        help="continue an interrupted run in its own folder and MLflow run (default: the latest run of the pipeline): "
        "finished stages are reused, training resumes from its last checkpoint",
    )
    p.add_argument(
        "--fresh", action="store_true", help="run every stage, reusing none that another run finished identically"
    )
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show everything on the console (Prefect's task runs, library warnings, sub-step progress bars, vLLM's "
        "and lm-eval's logs) instead of a line per stage and one progress bar, the rest in the run folder's run.log",
    )
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser(
        "deploy",
        help="register one deployment per pipeline with a work pool",
        description="Register 'distill/<pipeline>' deployments with the Prefect server at "
        "PREFECT_API_URL, each with its pipelines.yaml schedule, to run on WORK_POOL's workers "
        "(`prefect worker start --pool WORK_POOL`). The flow code is this project folder. Creates "
        "the global concurrency limit (concurrency.limit_name) when it is missing.",
    )
    p.add_argument(
        "--work-pool", required=True, help="an existing work pool (e.g. prefect work-pool create local --type process)"
    )
    p.add_argument("--file", default=default_file())
    p.add_argument("--pipelines", help="comma-separated subset (default: all)")
    p.add_argument(
        "--image",
        help="Docker/Kubernetes pools: an image with distillery installed (the Dockerfile's); "
        "runs import flows.distill and read the image's pipelines.yaml",
    )
    p.add_argument(
        "--job-variables",
        metavar="JSON",
        help="the pool's job variables for these deployments, e.g. "
        "'{\"gpus\": 1}' for a pool whose job template requests nvidia.com/gpu (README: Deployments)",
    )
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser(
        "train",
        help="run only the train stage on kept traces (accelerate-friendly)",
        description="Train the pipeline's student by its train.method on an existing kept-traces "
        "jsonl (the filter stage's kept.jsonl) and save it to --out with a manifest; no Prefect. Logs "
        "one MLflow run to MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db here). Multi-GPU or "
        "multi-node: `accelerate launch --config_file configs/accelerate/ddp-8gpu.yaml -m "
        "flows.cli train ...`; every process trains, process 0 alone writes --out and logs.",
    )
    p.add_argument("pipeline")
    p.add_argument("--traces", required=True, help="kept traces (jsonl with prompt, completion, answer, prompt_id)")
    p.add_argument("--out", required=True, help="folder for the trained model (replaced atomically)")
    p.add_argument("--file", default=default_file())
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override a field, e.g. --set train.max_steps=100 (repeatable)",
    )
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "serve",
        help="serve one Prefect deployment per pipeline",
        description="Register 'distill/<pipeline>' deployments with the Prefect API at "
        "PREFECT_API_URL and run what is triggered (`prefect deployment run 'distill/demo'`).",
    )
    p.add_argument("--file", default=default_file())
    p.add_argument("--pipelines", help="comma-separated subset (default: all)")
    p.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: one GPU, one run)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "serve-model",
        help="serve a model with vLLM's OpenAI-compatible server",
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
        "  distillery serve-model demo:student -- --enforce-eager     # after --: passed to vLLM as is",
    )
    p.add_argument("model", help="model folder, demo:teacher|demo:student, run folder or hub id")
    p.add_argument(
        "--draft",
        metavar="FOLDER",
        help="speculative decoding: this model (folder, demo:*, run folder) "
        "drafts for MODEL; it must have MODEL's vocabulary",
    )
    p.add_argument("--num-speculative-tokens", type=int, metavar="K", help="draft tokens per step (default 4)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument(
        "--api-key",
        help="require this bearer token on /v1 (default: $DISTILLERY_API_KEY; prefer the "
        "variable, a command line shows in ps). Never printed",
    )
    p.add_argument("--served-model-name", metavar="NAME", help="the name clients ask for (vLLM's default: the path)")
    p.add_argument("--max-model-len", type=int, metavar="TOKENS", help="context length (default: the model's)")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations (default: vLLM's auto)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own Python code (off)")
    p.add_argument(
        "--print-command",
        action="store_true",
        help="print the server command (the key as $DISTILLERY_API_KEY) and exit, e.g. to run it on a GPU box",
    )
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
