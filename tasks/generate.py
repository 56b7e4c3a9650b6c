"""generate: the teacher answers every prompt n times: vLLM (offline batch), transformers, or an OpenAI-compatible
endpoint. Sharded, resumable and cached by content.

    distillery run demo --set generate.n=8 --set generate.logprobs=20

Prompts are cut into shards of `generate.shard_size`; each shard is a Prefect task whose output is written to a
content-addressed folder (key: teacher id + revision, backend, sampling parameters, seed, top-k, the shard's
prompts), atomically, manifest last. A finished shard is never generated again: kill a run and re-run it, and
only the missing shards are generated; change a sampling parameter and every shard is new. The vLLM engine
starts only if some shard is missing, once per stage, in its own process.

Output, <run>/generate/:
  traces.jsonl      a row per sample: prompt_id, prompt, prompt_text (exactly what the teacher saw), answer,
                    sample, completion, num_tokens, finish_reason, teacher, teacher_revision, backend, sampling
  logprobs.parquet  (generate.logprobs = k > 0) a row per sample: prompt_id, sample, token_ids list<int32>,
                    token_logprobs list<float16> (the sampled token), top_ids list<list<int32>> [tokens][k],
                    top_logprobs list<list<float16>> [tokens][k], best first. manifest.json's `logprobs`
                    block gives k and `mode`: raw_logprobs = log-softmax of the teacher's logits at temperature 1,
                    before temperature/top-p (vLLM's default), so a trainer applies its own temperature to them.
  manifest.json     written last; its `figures` include bytes per generated token of the logprob file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery import model_uris
from distillery.artifacts import MANIFEST, atomic_dir, content_hash, read_jsonl, write_jsonl, write_manifest
from distillery.checks import check_round_trip
from distillery.config import BUILTIN_PREFIXES, GenerateConfig, Pipeline
from distillery.data import load_prompts, render_prompt, template_prefill
from distillery.demo.assets import resolve_model
from distillery.engines import HFEngine, OpenAIEngine, VLLMEngine, derive_seed
from distillery.results import Traces
from distillery.runtime import RunContext

LOGPROB_COLUMNS = ("token_ids", "token_logprobs", "top_ids", "top_logprobs")


def sampling_dict(g: GenerateConfig) -> dict:
    return {
        "n": g.n,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "max_tokens": g.max_tokens,
        "stop": g.stop,
        "seed": g.seed,
        "logprobs": g.logprobs,
    }


def teacher_id(cfg: Pipeline, resolved: str) -> str:
    if cfg.generate.backend == "openai":
        return f"{cfg.generate.openai.base_url}#{cfg.generate.openai.model}"
    # a built-in or MLflow reference names different weights over time (a rebuilt cache, a moved alias): the folder
    # it resolved to (per seed, per registered version) is part of the id
    ref = cfg.teacher.path
    return f"{ref}@{resolved}" if ref.startswith(BUILTIN_PREFIXES) or model_uris.is_uri(ref) else ref


def shard_key(cfg: Pipeline, tid: str, shard: list[dict]) -> str:
    g = cfg.generate
    blob = json.dumps(
        {
            "teacher": tid,
            "revision": cfg.teacher.revision,
            "backend": g.backend,
            "sampling": sampling_dict(g),
            "logprobs_mode": g.logprobs_mode,
            "prompts": [[p["id"], p["prompt_text"]] for p in shard],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_root(cfg: Pipeline) -> Path:
    return Path(cfg.generate.cache_dir or Path(cfg.output_dir) / ".cache").resolve() / "generate"


def prepare_prompts(cfg: Pipeline, teacher: str) -> list[dict]:
    from transformers import AutoTokenizer

    prompts = load_prompts(cfg.data)
    if not prompts:
        raise ValueError("generate: the data section produced no prompts")
    # an endpoint needs no local tokenizer: plain prompts go as they are, the chat API applies the server's template
    tok = (
        None
        if cfg.generate.backend == "openai"
        else AutoTokenizer.from_pretrained(
            teacher, revision=cfg.teacher.revision, trust_remote_code=cfg.teacher.trust_remote_code
        )
    )
    # what the prompt already opens of the assistant turn (R1-Distill's `<think>\n`): chat pipelines train the
    # student on prefill + completion in its own template
    prefill = template_prefill(tok) if tok is not None and cfg.data.chat_template else ""
    if tok is not None:
        check_round_trip(tok, where=f"generate: teacher tokenizer {teacher}")
    for p in prompts:
        text = p["prompt"] if tok is None else render_prompt(tok, p["prompt"], cfg.data)
        p["assistant_prefill"] = prefill
        if cfg.generate.think_prefill and not text.rstrip().endswith("<think>"):
            text += "<think>\n"
            p["assistant_prefill"] += "<think>\n"
        p["prompt_text"] = text
    return prompts


def make_engine(cfg: Pipeline, teacher: str):
    g = cfg.generate
    if g.backend == "vllm":
        return VLLMEngine(
            {
                "model": teacher,
                "revision": cfg.teacher.revision,
                "trust_remote_code": cfg.teacher.trust_remote_code,
                "dtype": g.dtype,
                "max_model_len": g.max_model_len,
                "enforce_eager": g.enforce_eager,
                "gpu_memory_utilization": g.gpu_memory_utilization,
                "tensor_parallel_size": g.tensor_parallel_size,
                "data_parallel_size": g.data_parallel_size,
                "seed": g.seed,
                "logprobs_mode": g.logprobs_mode,
                "max_logprobs": max(20, g.logprobs),
            },
            kv_cache_gib=g.kv_cache_gib,
        )
    if g.backend == "transformers":
        return HFEngine(teacher, cfg.teacher.revision, cfg.teacher.trust_remote_code, g.batch_size)
    o = g.openai
    return OpenAIEngine(
        o.base_url,
        o.model,
        o.api_key_env,
        cache_root(cfg).parent / "openai",
        o.max_concurrency,
        o.max_retries,
        o.timeout,
        chat=cfg.data.chat_template,
    )


class LazyEngine:
    """Starts the engine on first use: a run whose shards are all cached never pays vLLM's start-up."""

    def __init__(self, factory: Callable[[], object]):
        self.factory, self.engine = factory, None

    def generate(self, *a, **k):
        if self.engine is None:
            self.engine = self.factory()
        return self.engine.generate(*a, **k)

    def close(self):
        if self.engine is not None:
            self.engine.close()


def write_logprobs(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f16 = pa.float16()
    schema = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("sample", pa.int32()),
            ("token_ids", pa.list_(pa.int32())),
            ("token_logprobs", pa.list_(f16)),
            ("top_ids", pa.list_(pa.list_(pa.int32()))),
            ("top_logprobs", pa.list_(pa.list_(f16))),
        ]
    )
    import numpy as np

    cols = {
        "prompt_id": [r["prompt_id"] for r in rows],
        "sample": [r["sample"] for r in rows],
        "token_ids": [r["token_ids"] for r in rows],
        "token_logprobs": [np.asarray(r["token_logprobs"], dtype=np.float16) for r in rows],
        "top_ids": [r["top_ids"] for r in rows],
        "top_logprobs": [[np.asarray(x, dtype=np.float16) for x in r["top_logprobs"]] for r in rows],
    }
    pq.write_table(pa.table(cols, schema=schema), path, compression="zstd")


def run_shard(cfg: Pipeline, tid: str, shard: list[dict], dest: Path, engine) -> dict:
    """Generate one shard into `dest` unless it is already there; returns its manifest."""
    if (dest / MANIFEST).exists():
        return {**json.loads((dest / MANIFEST).read_text()), "cached": True}
    g = cfg.generate
    sampling = sampling_dict(g)
    seeds = [derive_seed(g.seed, p["id"]) for p in shard]
    result = engine.generate([p["prompt_text"] for p in shard], sampling, seeds)
    rows, lp_rows = [], []
    for p, outs in zip(shard, result["samples"], strict=True):
        for i, o in enumerate(outs):
            rows.append(
                {
                    "prompt_id": p["id"],
                    "prompt": p["prompt"],
                    "prompt_text": p["prompt_text"],
                    "assistant_prefill": p.get("assistant_prefill", ""),
                    "answer": p["answer"],
                    "sample": i,
                    "completion": o["text"],
                    "num_tokens": o["num_tokens"],
                    "finish_reason": o["finish_reason"],
                    "teacher": tid,
                    "teacher_revision": cfg.teacher.revision,
                    "backend": g.backend,
                    "sampling": sampling,
                }
            )
            if g.logprobs and "top_ids" in o:
                lp_rows.append({"prompt_id": p["id"], "sample": i, **{c: o[c] for c in LOGPROB_COLUMNS}})
    tokens = sum(r["num_tokens"] for r in rows)
    with atomic_dir(dest, keep_existing=True) as tmp:  # two runs may make the same shard at once
        write_jsonl(tmp / "traces.jsonl", rows)
        if lp_rows:
            write_logprobs(tmp / "logprobs.parquet", lp_rows)
        manifest = {
            "kind": "shard",
            "prompts": len(shard),
            "samples": len(rows),
            "tokens": tokens,
            "seconds": result["seconds"],
            "logprobs": bool(lp_rows),
        }
        write_manifest(tmp, manifest)
    return {**manifest, "cached": False}


def members(cfg: Pipeline) -> list[Pipeline]:
    """The pipeline once per teacher: `teacher` first, then generate.ensemble.teachers in order."""
    ens = cfg.generate.ensemble
    return [cfg] + [cfg.model_copy(update={"teacher": t}) for t in (ens.teachers if ens else [])]


def teacher_path(cfg: Pipeline) -> str:
    return resolve_model(cfg.teacher.path) if cfg.generate.backend != "openai" else cfg.teacher.path


def check_ensemble(cfg: Pipeline) -> None:
    """Before any sampling: several teachers whose ids must mean the same tokens (stored top-k, an averaged
    distribution) share `teacher`'s tokenizer, and an average over chat prompts their template."""
    from transformers import AutoTokenizer

    ens, g = cfg.generate.ensemble, cfg.generate
    if ens is None or (ens.merge == "traces" and not g.logprobs):
        return
    from distillery.ensemble import check_same_tokenizer

    first, *rest = members(cfg)
    base = AutoTokenizer.from_pretrained(teacher_path(first), trust_remote_code=first.teacher.trust_remote_code)
    for i, m in enumerate(rest):
        where = f"generate.ensemble.teachers[{i}] ({m.teacher.path})"
        tok = AutoTokenizer.from_pretrained(teacher_path(m), trust_remote_code=m.teacher.trust_remote_code)
        check_same_tokenizer(base, tok, where)
        if ens.merge == "average" and cfg.data.chat_template and tok.chat_template != base.chat_template:
            from distillery.checks import DistillationCheckError

            raise DistillationCheckError(
                f"{where}: its chat template differs from `teacher`'s; merge average scores `teacher`'s rendered "
                "prompts with every teacher. Use merge traces (each teacher renders its own)"
            )


def ensemble_key(cfg: Pipeline) -> str:
    blob = json.dumps({"teachers": ensemble_ids(cfg), "weights": cfg.generate.ensemble.weights, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def average_shard(cfg: Pipeline, shard_dir: Path, dest: Path, scorers: Callable[[], list]) -> dict:
    """`shard_dir`'s samples scored by every teacher: the mixture's top-k into `dest`/logprobs.parquet (cached
    like a shard); returns its manifest (figures per completion token, and the token count to weigh them by)."""
    if (dest / MANIFEST).exists():
        return json.loads((dest / MANIFEST).read_text())
    import pyarrow.parquet as pq

    from distillery.ensemble import mixture_topk

    teachers = scorers()
    tok = teachers[0][0]
    rows = read_jsonl(shard_dir / "traces.jsonl")
    text = {(r["prompt_id"], r["sample"]): r["prompt_text"] for r in rows}
    stored = pq.read_table(shard_dir / "logprobs.parquet", columns=["prompt_id", "sample", "token_ids"]).to_pylist()
    ens = cfg.generate.ensemble
    scored, figures = mixture_topk(
        [m for _, m in teachers],
        ens.weights,
        [tok(text[(r["prompt_id"], r["sample"])], add_special_tokens=False)["input_ids"] for r in stored],
        [list(r["token_ids"]) for r in stored],
        cfg.generate.logprobs,
        tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        ens.batch_size,
    )
    with atomic_dir(dest, keep_existing=True) as tmp:
        write_logprobs(
            tmp / "logprobs.parquet",
            [{"prompt_id": r["prompt_id"], "sample": r["sample"], **x} for r, x in zip(stored, scored, strict=True)],
        )
        manifest = {"kind": "ensemble-average", "tokens": sum(len(r["token_ids"]) for r in stored), **figures}
        write_manifest(tmp, manifest)
    return manifest


def generate(
    cfg: Pipeline, out_dir: Path, shard_runner: Callable = run_shard, on_shard: Callable[[int, int], None] | None = None
) -> dict:
    """Generate (or reuse) every shard, then merge them into `out_dir`. Returns {path, figures}. `on_shard(done,
    total)` after each shard. With generate.ensemble: every teacher's shards (merge traces, sample numbers offset
    by n per teacher so (prompt_id, sample) stays a key), or `teacher`'s scored by all (merge average)."""
    g, ens = cfg.generate, cfg.generate.ensemble
    check_ensemble(cfg)
    sources = members(cfg) if ens and ens.merge == "traces" else [cfg]
    plans = []
    for m in sources:
        teacher = teacher_path(m)
        prompts = prepare_prompts(m, teacher)
        shards = [prompts[i : i + g.shard_size] for i in range(0, len(prompts), g.shard_size)]
        tid = teacher_id(m, teacher)
        plans.append((m, teacher, tid, shards, [cache_root(cfg) / shard_key(m, tid, s) for s in shards]))
    total = sum(len(p[3]) for p in plans)
    manifests: list[dict] = []
    for m, teacher, tid, shards, dests in plans:
        engine = LazyEngine(lambda m=m, teacher=teacher: make_engine(m, teacher))
        try:
            for s, d in zip(shards, dests, strict=True):
                manifests.append(shard_runner(m, tid, s, d, engine))
                if on_shard:
                    on_shard(len(manifests), total)
        finally:
            engine.close()
    rows, written = [], []  # written: how many samples each teacher wrote
    for j, (*_, dests) in enumerate(plans):
        part = [{**r, "sample": r["sample"] + j * g.n} for d in dests for r in read_jsonl(d / "traces.jsonl")]
        rows += part
        written.append(len(part))
    lp_parts = [(j, d / "logprobs.parquet") for j, (*_, dests) in enumerate(plans) for d in dests]
    ens_figures: dict = {}
    if ens and ens.merge == "average" and g.logprobs:
        loaded: list = []

        def scorers() -> list:  # loaded once, only when some shard is not cached
            if not loaded:
                from distillery.ensemble import load_teachers

                ms = members(cfg)
                loaded.extend(
                    load_teachers(
                        [teacher_path(m) for m in ms],
                        [m.teacher.trust_remote_code for m in ms],
                        ["teacher"] + [f"generate.ensemble.teachers[{i}]" for i in range(len(ms) - 1)],
                    )
                )
            return loaded

        key = ensemble_key(cfg)
        mixes = [
            (d, cache_root(cfg) / f"{d.name}-average-{key}") for d in plans[0][4] if (d / "logprobs.parquet").exists()
        ]
        parts = [average_shard(cfg, d, mix, scorers) for d, mix in mixes]
        lp_parts = [(0, mix / "logprobs.parquet") for _, mix in mixes]
        n_tokens = max(sum(p["tokens"] for p in parts), 1)
        ens_figures = {
            k: sum(p[k] * p["tokens"] for p in parts) / n_tokens for k in parts[0] if k.startswith("ensemble_")
        }
    tokens = sum(r["num_tokens"] for r in rows)
    fresh = [m for m in manifests if not m["cached"]]
    seconds = sum(m["seconds"] for m in fresh)
    fresh_tokens = sum(m["tokens"] for m in fresh)
    figures = {
        "prompts": sum(len(s) for s in plans[0][3]),
        "samples": len(rows),
        "generated_tokens": tokens,
        "shards": total,
        "shards_cached": len(manifests) - len(fresh),
        "shards_generated": len(fresh),
        "generate_seconds": seconds,
        "tokens_per_s": fresh_tokens / seconds if seconds else 0.0,
        "mean_completion_tokens": tokens / len(rows),
        **ens_figures,
    }
    if len(plans) > 1:  # merge traces: what each teacher wrote
        figures |= {f"teacher{j}_samples": n for j, n in enumerate(written)}
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "traces.jsonl", rows)
        logprobs = None
        if g.logprobs:
            import pyarrow as pa
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            tables = []
            for j, path in lp_parts:
                if path.exists():
                    t = pq.read_table(path)
                    if j:  # the same offset as the traces' sample numbers
                        col = pc.add(t.column("sample"), pa.scalar(j * g.n, pa.int32())).cast(pa.int32())
                        t = t.set_column(t.schema.get_field_index("sample"), "sample", col)
                    tables.append(t)
            if tables:
                pq.write_table(pa.concat_tables(tables), tmp / "logprobs.parquet", compression="zstd")
                size_bytes = (tmp / "logprobs.parquet").stat().st_size
                figures["logprob_bytes_per_token"] = size_bytes / max(tokens, 1)
            logprobs = {
                "k": g.logprobs,
                "mode": g.logprobs_mode,
                "dtype": "float16",
                "file": "logprobs.parquet",
                "available": bool(tables),
            }
            if ens and ens.merge == "average":
                logprobs["ensemble_average"] = {"teachers": ensemble_ids(cfg), "weights": ens.weights}
        write_manifest(
            tmp,
            {
                "kind": "traces",
                "teacher": plans[0][2],
                "teachers": [p[2] for p in plans] if len(plans) > 1 else None,
                "ensemble": ens.model_dump() if ens else None,
                "teacher_revision": cfg.teacher.revision,
                "backend": g.backend,
                "sampling": sampling_dict(g),
                "logprobs": logprobs,
                "shards": [str(d) for *_, dests in plans for d in dests],
                "figures": figures,
            },
        )
    return {"path": str(out_dir / "traces.jsonl"), "figures": figures}


def ensemble_ids(cfg: Pipeline) -> list[str]:
    return [teacher_id(m, teacher_path(m)) for m in members(cfg)]


@task(name="generate-shard", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def generate_shard_task(cfg: Pipeline, tid: str, shard: list[dict], dest: Path, engine) -> dict:
    return run_shard(cfg, tid, shard, dest, engine)


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(cfg: Pipeline, ctx: RunContext) -> Traces:
    from distillery.lineage import log_traces_input
    from distillery.prefect_ui import Progress

    tracker = ctx.tracker()
    with tracker.stage("generate", ctx.parent_run_id) as run:
        run.log_params(
            {
                "teacher": cfg.teacher.path,
                "teacher_revision": cfg.teacher.revision,
                **cfg.generate.model_dump(exclude={"openai"}),
                "data": cfg.data.model_dump(),
            }
        )
        bar: list[Progress] = []

        def shard_done(done: int, total: int) -> None:
            if not bar:
                bar.append(Progress("generate: shards", total))
            bar[0].update(done)

        result = generate(cfg, ctx.stage_dir("generate"), shard_runner=generate_shard_task, on_shard=shard_done)
        run.log_metrics(result["figures"])
        rows = read_jsonl(Path(result["path"]))
        run.log_dict(rows[:50], "traces_sample.json")
        run.log_artifact(Path(result["path"]).parent / MANIFEST)
        log_traces_input(run, Path(result["path"]), "generated", context="generated")
    path = Path(result["path"])
    return Traces(str(path), "generate", run.run_id, result["figures"], content_hash(path.parent))
