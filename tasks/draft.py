"""draft: the student as a speculative-decoding draft for the teacher: an artifact, measured in vLLM.

    distillery run demo --set draft.num_speculative_tokens=2

The draft artifact (`draft-model/`, registered with alias `draft`) is the student with the teacher's vocabulary:
refused unless the two split text alike (chat tokens may differ: see make_draft), the embedding padded to the
teacher's size. Then two engine runs on the same prompts, greedy: the teacher alone, then the teacher with the
student as its draft model (`speculative_config={"method": "draft_model", ...}`). Reported: draft acceptance rate
(accepted / proposed draft tokens), acceptance per position, mean accepted length (tokens per teacher step), teacher
tokens/s with and without the draft and their ratio, and whether the outputs are identical (greedy speculative
decoding must not change them). The vLLM runs are greedy: the CPU build of vLLM garbles sampled speculative output
(see ../shared/STACK.md). Sampled acceptance comes from transformers' assisted generation, which runs speculative
sampling (Leviathan et al. 2023, algorithm 1) when `do_sample` is on, at `draft.sample_temperature` (default 1.0;
null skips it), batch size 1.

`draft.kind: eagle3` makes the draft an EAGLE-3 head instead (distillery/eagle3.py: vLLM's speculators model and
loss), trained on the teacher's hidden states over its own samples from stage generate (never over the prompts the
draft is measured on), and served by vLLM's EAGLE-3 proposer (`method: eagle3`); the same two greedy runs measure
it. transformers cannot run an EAGLE head, so there is no sampled measurement for it (that waits for a GPU, where
vLLM's sampled speculative decoding is sound; the CPU build's is not).

`draft.distill` (off by default) first aligns the student to the teacher, DistillSpec-style (Zhou et al. 2023):
the draft samples its own continuations of training prompts and learns the teacher's full next-token
distribution on them (TRL's DistillationTrainer, forward KL by default); the aligned model becomes the draft.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, content_hash, read_jsonl, stored_params, write_manifest
from distillery.checks import check_shared_bpe
from distillery.config import Pipeline
from distillery.results import ModelArtifact, Traces
from distillery.runtime import RunContext
from distillery.training import (
    SFTParams,
    common_args,
    finish,
    guard_finite,
    load_student,
    loss_curve,
    mlflow_callback,
    run_trainer,
    student_tokenizer,
    trainable_count,
    with_checkpoints,
)


def rendered(cfg: Pipeline, teacher: str, prompts: list[str]) -> list[str]:
    """The prompts as the teacher sees them in generation and in serving: through its chat template when the
    pipeline uses one (data.chat_template), else as they are."""
    if not cfg.data.chat_template:
        return prompts
    from transformers import AutoTokenizer

    from distillery.data import render_prompt

    tok = AutoTokenizer.from_pretrained(teacher, trust_remote_code=cfg.teacher.trust_remote_code)
    return [render_prompt(tok, p, cfg.data) for p in prompts]


def draft_prompts(cfg: Pipeline, teacher: str) -> list[str]:
    """Held-out prompts where there are some (the demo eval split), else the pipeline's last prompts; rendered."""
    from distillery.data import DEMO_EVAL_FILE, load_prompts

    if cfg.data.source == "demo":
        raw = [r["question"] for r in read_jsonl(DEMO_EVAL_FILE)][: cfg.draft.num_prompts]
    else:
        raw = [p["prompt"] for p in load_prompts(cfg.data)][-cfg.draft.num_prompts :]
    return rendered(cfg, teacher, raw)


def distill_prompts(cfg: Pipeline, teacher: str, measured: list[str]) -> list[str]:
    """Training prompts for `draft.distill`: the pipeline's prompts, rendered, never one the draft is measured on."""
    from distillery.data import load_prompts

    seen = set(measured)
    rows = load_prompts(cfg.data.model_copy(update={"num_prompts": cfg.draft.distill.num_prompts + len(seen)}))
    texts = rendered(cfg, teacher, [r["prompt"] for r in rows])
    return [t for t in texts if t not in seen][: cfg.draft.distill.num_prompts]


def distill_draft(
    teacher: str,
    student: str,
    prompts: list[str],
    out: Path,
    d,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
    checkpoint=None,
) -> dict:
    """DistillSpec: on-policy distillation of the draft toward the teacher with TRL's DistillationTrainer. The draft
    samples a continuation of each prompt; the loss is the generalized JSD (`d.beta`: 0 forward KL) between the
    teacher's and the draft's full next-token distributions on it. Saves the model to `out`; returns figures."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    from distillery.checks import check_teacher_frozen

    if not prompts:
        raise ValueError("draft.distill: no training prompts")
    tokenizer = student_tokenizer(student, teacher, "draft.distill", trust_remote_code)
    teacher_model = AutoModelForCausalLM.from_pretrained(
        teacher, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    teacher_model.eval().requires_grad_(False)
    check_teacher_frozen(teacher_model, where=f"teacher {teacher}")
    params = with_checkpoints(
        SFTParams(
            learning_rate=d.learning_rate,
            batch_size=d.batch_size,
            max_steps=d.steps,
            seed=d.seed,
            logging_steps=d.logging_steps,
        ),
        checkpoint,
    )
    # The trainer counts its own tokens; transformers' counter cannot see the generated batches and warns each step.
    args = DistillationConfig(
        **{**common_args(params, out), "include_num_input_tokens_seen": "no"},
        max_completion_length=d.max_new_tokens,
        temperature=d.temperature,
        beta=d.beta,
        gradient_checkpointing=False,
        disable_dropout=True,
    )
    trainer = guard_finite(
        DistillationTrainer(
            model=load_student(student, params, trust_remote_code),
            teacher_model=teacher_model,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
            callbacks=callbacks or [],
        ),
        "draft.distill",
    )
    result = run_trainer(trainer, "draft.distill")
    return finish(
        trainer,
        result,
        tokenizer,
        out,
        trainable_count(trainer.model),
        len(prompts),
        params,
        student,
        manifest={"base": student, "method": "distillspec", "distill": d.model_dump()},
        where="draft.distill",
        trust_remote_code=trust_remote_code,
    )


def assisted_acceptance(
    teacher: str, draft: str, prompts: list[str], k: int, temperature: float, max_new_tokens: int, seed: int = 0
) -> dict:
    """Sampled speculative decoding with transformers' assisted generation (batch size 1): the draft proposes `k`
    tokens per step (constant schedule, no early stop), the teacher accepts each with min(1, p/q). Returns the
    acceptance rate, per position and overall, mean accepted length, and tokens/s with and without the draft."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(teacher)
    target = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype).to(dev).eval()
    helper = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).to(dev).eval()
    helper.generation_config.update(
        num_assistant_tokens=k, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0
    )
    gen = copy.deepcopy(target.generation_config)
    gen.update(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
    )
    steps: list[tuple[int, int]] = []  # (tokens proposed, tokens accepted) per teacher forward

    # transformers reports no acceptance counts: record them where its decoding loop hands them to the generator.
    make_generator = target._get_candidate_generator

    def counted(*args, **kwargs):
        g = make_generator(*args, **kwargs)
        get, update, last = g.get_candidates, g.update_candidate_strategy, [0]

        def get_candidates(input_ids, *a, **kw):
            ids, logits = get(input_ids, *a, **kw)
            last[0] = ids.shape[1] - input_ids.shape[1]
            return ids, logits

        def update_candidate_strategy(input_ids, scores, n_matches):
            steps.append((last[0], int(n_matches)))
            return update(input_ids, scores, n_matches)

        g.get_candidates, g.update_candidate_strategy = get_candidates, update_candidate_strategy
        return g

    target._get_candidate_generator = counted

    def run(assist: bool) -> tuple[int, float]:
        kwargs = {"assistant_model": helper} if assist else {}
        encoded = [tok(p, return_tensors="pt").to(dev) for p in prompts]
        target.generate(**encoded[0], generation_config=gen, **kwargs)  # warm-up, not timed or counted
        steps.clear()
        torch.manual_seed(seed)
        tokens, start = 0, time.perf_counter()
        for enc in encoded:
            out = target.generate(**enc, generation_config=gen, **kwargs)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
        return tokens, time.perf_counter() - start

    alone_tokens, alone_s = run(False)
    spec_tokens, spec_s = run(True)
    if not steps:
        raise RuntimeError(
            "draft: transformers' assisted generation reported no draft steps; this transformers "
            "version changed the candidate-generator hooks distillery counts through"
        )
    proposed, accepted = sum(p for p, _ in steps), sum(a for _, a in steps)
    figures = {
        "sampled_temperature": temperature,
        "sampled_acceptance_rate": accepted / proposed if proposed else 0.0,
        "sampled_mean_accepted_length": 1 + accepted / len(steps),
        "sampled_teacher_tokens_per_s": alone_tokens / alone_s,
        "sampled_teacher_with_draft_tokens_per_s": spec_tokens / spec_s,
    }
    figures["sampled_speedup"] = (
        figures["sampled_teacher_with_draft_tokens_per_s"] / figures["sampled_teacher_tokens_per_s"]
    )
    for i in range(k):
        figures[f"sampled_acceptance_pos_{i + 1}"] = sum(a > i for _, a in steps) / len(steps)
    return figures


def pad_vocab(model, size: int) -> None:
    """Grow the input and output embeddings to `size` rows, the new ones zero: ids past the tokenizer are never
    fed in, and a zero output row gives them a logit of 0, far below a trained model's top logits."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if size < old:
        raise ValueError(f"draft: the draft's embedding ({old}) is larger than the teacher's ({size})")
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = 0
        model.get_output_embeddings().weight[old:] = 0


def make_draft(teacher: str, student: str, dest: Path) -> dict:
    """The draft artifact: the student with the teacher's tokenizer, its embedding padded to the teacher's size when
    that differs (vLLM requires equal sizes). Refused unless the two split text into the same ids. Chat tokens may
    differ (R1-Distill's teacher, a Qwen2.5 student): the draft speaks in the teacher's ids, and the student's
    end-of-turn row moves to the teacher's eos id, so the draft proposes the teacher's stop where it would stop."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distillery.artifacts import save_model

    tok, teacher_tok = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    differ = check_shared_bpe(teacher_tok, tok, where="draft: teacher vs draft tokenizer")
    tv, dv = AutoConfig.from_pretrained(teacher).vocab_size, AutoConfig.from_pretrained(student).vocab_size
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    if tv != dv:
        pad_vocab(model, tv)
    moved = None
    if differ and tok.eos_token_id != teacher_tok.eos_token_id:
        moved = [tok.eos_token_id, teacher_tok.eos_token_id]
        move_row(model, *moved)
    with atomic_dir(dest) as tmp:
        save_model(model, teacher_tok if differ else tok, tmp)
        write_manifest(
            tmp,
            {
                "kind": "model",
                "role": "draft",
                "teacher": teacher,
                "base": student,
                "vocab_size": tv,
                "padded_from": dv if tv != dv else None,
                "chat_tokens_differ": sorted(differ),
                "eos_row_moved": moved,
            },
        )
    return {"path": str(dest), "padded_from": dv if tv != dv else None, "chat_tokens_differ": len(differ)}


def move_row(model, src: int, dst: int) -> None:
    """Give token `dst` the student's input and output rows of token `src` (tied embeddings move once)."""
    import torch

    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb.weight[dst] = emb.weight[src]


def eagle3_samples(traces: str | Path, measured: list[str], limit: int) -> list[dict]:
    """The teacher's samples an EAGLE-3 head trains on: stage generate's traces, every sample (the head learns what
    the teacher writes, right or wrong), none whose prompt the draft is measured on, at most `limit`."""
    seen = set(measured)
    kept = [r for r in read_jsonl(Path(traces)) if r["prompt_text"] not in seen][:limit]
    if not kept:
        raise ValueError(f"draft.kind eagle3: no teacher sample in {traces} outside the measured prompts")
    return kept


def train_head(teacher: str, traces: str, prompts: list[str], cfg: Pipeline, dest: Path, on_log=None) -> dict:
    """An EAGLE-3 head for `teacher`, trained on its samples in `traces` (distillery.eagle3), saved to `dest`."""
    from distillery.eagle3 import train_eagle3

    e = cfg.draft.eagle3
    return train_eagle3(
        teacher,
        eagle3_samples(traces, prompts, e.num_samples),
        dest,
        e,
        max_tokens=cfg.draft.max_model_len or 2048,
        trust_remote_code=cfg.teacher.trust_remote_code,
        on_log=on_log,
    )


def measure_draft(
    teacher: str,
    student: str | None,
    prompts: list[str],
    cfg: Pipeline,
    out_dir: Path,
    callbacks: list | None = None,
    alone: dict | None = None,
    traces: str | None = None,
    on_log=None,
) -> dict:
    """The draft artifact from `student` (after `draft.distill` when set), or with `draft.kind: eagle3` an EAGLE-3
    head trained on the teacher's samples in `traces`; then its acceptance and speed-up: vLLM greedy, and
    transformers speculative sampling when `draft.sample_temperature` is set (standalone drafts only). `alone`: the
    teacher's own run on these prompts from an earlier call (the result's `alone`), to compare several drafts to one
    run. `on_log(step, figures)`: the EAGLE-3 head's training figures as they come."""
    from distillery.engines import require_vllm, run_worker

    require_vllm()
    d = cfg.draft
    distilled: dict = {}
    distill_dir = None
    head: dict = {}
    if d.kind == "eagle3":
        if not traces:
            raise ValueError("draft.kind eagle3: needs the teacher's samples (stage generate)")
        dest = out_dir.parent / f"{out_dir.name}-eagle3"
        head = train_head(teacher, traces, prompts, cfg, dest, on_log)
        made = {"path": str(dest), "padded_from": None}
    elif d.distill:
        distill_dir = out_dir.parent / f"{out_dir.name}-distill"
        distilled = distill_draft(
            teacher,
            student,
            distill_prompts(cfg, teacher, prompts),
            distill_dir,
            d.distill,
            callbacks,
            cfg.student.trust_remote_code,
            cfg.checkpoint,
        )
        student = str(distill_dir)
    if d.kind == "model":
        made = make_draft(teacher, student, out_dir.parent / f"{out_dir.name}-model")
    draft = made["path"]
    base = {
        "model": teacher,
        "prompts": prompts,
        "max_tokens": d.max_tokens,
        "enforce_eager": d.enforce_eager,
        "max_model_len": d.max_model_len,
        "max_num_seqs": d.max_num_seqs,
        "dtype": cfg.generate.dtype,
        "gpu_memory_utilization": cfg.generate.gpu_memory_utilization,
    }
    if alone is None:
        alone = run_worker("tasks.draft", {**base, "draft": None}, kv_cache_gib=cfg.generate.kv_cache_gib)
    spec = run_worker(
        "tasks.draft",
        {**base, "draft": draft, "k": d.num_speculative_tokens, "method": "eagle3" if head else "draft_model"},
        kv_cache_gib=cfg.generate.kv_cache_gib,
    )
    m = spec["metrics"]
    proposed, accepted, drafts = m.get("num_draft_tokens", 0), m.get("num_accepted_tokens", 0), m.get("num_drafts", 0)
    per_pos = m.get("accepted_per_pos", [])
    figures = {
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_accepted_length": 1 + accepted / drafts if drafts else 1.0,
        "teacher_tokens_per_s": alone["tokens"] / alone["seconds"],
        "teacher_with_draft_tokens_per_s": spec["tokens"] / spec["seconds"],
        "num_drafts": drafts,
        "num_draft_tokens": proposed,
        "num_accepted_tokens": accepted,
        "outputs_identical": float(alone["texts"] == spec["texts"]),
    }
    if d.kind == "model":
        figures["vocab_padded"] = float(made["padded_from"] is not None)
    figures["speedup"] = figures["teacher_with_draft_tokens_per_s"] / figures["teacher_tokens_per_s"]
    for i, n in enumerate(per_pos):
        figures[f"acceptance_pos_{i + 1}"] = n / drafts if drafts else 0.0
    if d.sample_temperature and d.kind == "model":
        figures.update(
            assisted_acceptance(
                teacher,
                draft,
                prompts[: d.sample_prompts],
                d.num_speculative_tokens,
                d.sample_temperature,
                d.max_tokens,
            )
        )
    figures.update(
        {f"distill_{k}": v for k, v in distilled.items() if k in ("steps", "train_seconds", "final_loss", "train_loss")}
    )
    figures.update({f"eagle3_{k}": v for k, v in head.items()})
    with atomic_dir(out_dir) as tmp:
        (tmp / "samples.json").write_text(
            json.dumps(
                [
                    {"prompt": p, "teacher": a, "with_draft": s}
                    for p, a, s in zip(prompts[:10], alone["texts"], spec["texts"], strict=False)
                ],
                indent=2,
            )
        )
        write_manifest(
            tmp,
            {
                "kind": "draft",
                "teacher": teacher,
                "draft": draft,
                "student": student,
                "draft_kind": d.kind,
                "num_speculative_tokens": d.num_speculative_tokens,
                "distill": d.distill.model_dump() if d.distill else None,
                "figures": figures,
            },
        )
    return {"draft": draft, "figures": figures, "alone": alone, "distilled": str(distill_dir) if distill_dir else None}


def _worker(spec_file: str) -> None:
    import os

    spec = json.loads(Path(spec_file).read_text())
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform
    from vllm.v1.metrics.reader import Counter, Vector

    if current_platform.is_cpu():  # the engine core in this process: one vLLM start-up fewer (71 -> 41 s on 2 cores)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    kwargs = {"max_num_seqs": spec["max_num_seqs"]} if spec.get("max_num_seqs") else {}
    if spec["draft"]:
        kwargs["speculative_config"] = {
            "method": spec.get("method", "draft_model"),
            "model": spec["draft"],
            "num_speculative_tokens": spec["k"],
        }
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        enforce_eager=spec["enforce_eager"],
        gpu_memory_utilization=spec["gpu_memory_utilization"],
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    llm.generate(spec["prompts"][:2], params, use_tqdm=False)  # warm-up, excluded from timing and counters
    before = _spec_counters(llm.get_metrics(), Counter, Vector)
    start = time.perf_counter()
    outs = llm.generate(spec["prompts"], params, use_tqdm=True)
    seconds = time.perf_counter() - start
    after = _spec_counters(llm.get_metrics(), Counter, Vector)
    metrics = {k: after[k] - before.get(k, 0) for k in after if k != "accepted_per_pos"}
    metrics["accepted_per_pos"] = [
        a - b for a, b in zip(after.get("accepted_per_pos", []), before.get("accepted_per_pos", [0] * 64), strict=False)
    ]
    texts = [o.outputs[0].text for o in outs]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    Path(spec["result_file"]).write_text(
        json.dumps({"texts": texts, "tokens": tokens, "seconds": seconds, "metrics": metrics})
    )


def _spec_counters(snapshot, Counter, Vector) -> dict:
    out: dict = {}
    for m in snapshot:
        name = m.name.removeprefix("vllm:spec_decode_")
        if isinstance(m, Counter) and m.name.startswith("vllm:spec_decode_"):
            out[name] = out.get(name, 0) + m.value
        elif isinstance(m, Vector) and m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            prev = out.get("accepted_per_pos", [0] * len(m.values))
            out["accepted_per_pos"] = [a + b for a, b in zip(prev, m.values, strict=False)]
    return out


@task(name="draft", cache_policy=NO_CACHE, log_prints=False)  # datasets prints bytecode when hashing
def draft_task(
    cfg: Pipeline, ctx: RunContext, teacher: ModelArtifact, student: ModelArtifact, traces: Traces | None = None
) -> ModelArtifact:
    """`student` made the teacher's speculative draft (the teacher's vocabulary, distilled on its own samples when
    `draft.distill` is set), or with `draft.kind: eagle3` an EAGLE-3 head trained on the teacher's samples in
    `traces`; with acceptance and speed-up measured against `teacher` as its figures."""
    eagle3 = cfg.draft.kind == "eagle3"
    with ctx.tracker().stage("draft", ctx.parent_run_id) as run:
        run.log_params({"draft_model": "eagle3" if eagle3 else student.path, **cfg.draft.model_dump()})
        history: list[dict] = []

        def on_log(step: int, figures: dict) -> None:
            history.append(figures)
            run.log_metrics({f"eagle3_{k}": v for k, v in figures.items() if k != "step"}, step=step)

        result = measure_draft(
            teacher.path,
            None if eagle3 else student.path,
            draft_prompts(cfg, teacher.path),
            cfg,
            ctx.stage_dir("draft"),
            callbacks=[mlflow_callback(run)] if cfg.draft.distill else None,
            traces=traces.path if traces else None,
            on_log=on_log,
        )
        run.log_metrics(result["figures"])
        if history:
            import matplotlib.pyplot as plt

            fig = loss_curve(history, "draft.eagle3: the head's loss to the teacher (summed over draft steps)")
            run.log_figure(fig, "eagle3_loss_curve.png")
            plt.close(fig)
        if result["distilled"]:
            import matplotlib.pyplot as plt

            manifest = json.loads((Path(result["distilled"]) / "manifest.json").read_text())
            fig = loss_curve(manifest["loss_history"], "draft.distill: divergence to the teacher (draft samples)")
            run.log_figure(fig, "distill_loss_curve.png")
            plt.close(fig)
        run.log_artifact(ctx.stage_dir("draft") / "samples.json")
        run.log_artifact(result["draft"], "draft-model")  # registered with alias `draft` when there is a registry
    return ModelArtifact(
        label="draft",
        path=result["draft"],
        stage="draft",
        run_id=run.run_id,
        params=stored_params(result["draft"]),  # the embedding may be padded to the teacher's vocabulary
        figures=result["figures"],
        content_hash=content_hash(result["draft"]),
        artifact="draft-model",
    )


if __name__ == "__main__":
    _worker(sys.argv[1])
