"""train: the student learns from the teacher, by the pipeline's `train.method`.

    distillery run demo --set train.epochs=1

- hard: the dataset's reference answers only (no teacher), the baseline every method is measured against;
- sft: TRL SFTTrainer on the kept teacher traces (sequence-level KD), loss on completion tokens only;
- logit_kd: the teacher's stored top-k distribution at every trace token (distillery.kd);
- gkd: TRL's on-policy GKDTrainer against the live teacher;
- dpo: SFT, then pairs of the student's own samples ranked by the verifier or the teacher, TRL DPOTrainer.
Full fine-tuning, LoRA, or QLoRA (adapters on a bitsandbytes NF4 base) through PEFT. Every method refuses
pad == eos and stops at the first non-finite loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, read_jsonl, save_model, write_manifest
from distillery.checks import check_pad_not_eos
from distillery.config import Pipeline
from distillery.demo.assets import resolve_model
from distillery.runtime import RunContext


@dataclass
class SFTParams:
    epochs: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    seed: int = 0
    logging_steps: int = 10
    bf16: bool = False
    lora: dict[str, Any] | None = None  # {r, alpha, dropout, target_modules, quantize: nf4}; None = full fine-tuning
    max_steps: int = -1
    extra: dict[str, Any] = field(default_factory=dict)  # passed to SFTConfig as is


def common_args(params: SFTParams, output_dir: Path) -> dict:
    """TrainingArguments every method shares. Transformers' default `logging_nan_inf_filter` would replace a NaN
    loss in the logs by the running mean and hide it; it is off, and `guard_finite` stops at the first one."""
    import torch

    return dict(
        output_dir=str(output_dir.parent / f".{output_dir.name}-trainer"),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        learning_rate=params.learning_rate,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        warmup_steps=params.warmup_ratio,
        weight_decay=params.weight_decay,
        lr_scheduler_type=params.lr_scheduler_type,
        seed=params.seed,
        logging_steps=params.logging_steps,
        bf16=params.bf16,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,
        disable_tqdm=False,
    )


def bnb_config(params: SFTParams):
    """QLoRA's quantized frozen base (bitsandbytes), or None."""
    if (params.lora or {}).get("quantize") != "nf4":
        return None
    from distillery.config import QuantizeConfig
    from tasks.quantize import bnb_config as quantize_config
    from tasks.quantize import require_bnb

    require_bnb()  # the quantize stage's NF4 (double quant), computing in the training dtype
    return quantize_config(
        "nf4", QuantizeConfig(double_quant=True, compute_dtype="bfloat16" if params.bf16 else "float32")
    )


def load_student(model_path: str, params: SFTParams, trust_remote_code: bool = False):
    """The model to train: full weights, LoRA adapters (PEFT) on it, or QLoRA adapters on a bnb-quantized base."""
    import torch
    from transformers import AutoModelForCausalLM

    quant = bnb_config(params)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=torch.bfloat16 if params.bf16 else torch.float32,
        trust_remote_code=trust_remote_code,
        quantization_config=quant,
    )
    if not params.lora:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = params.lora
    return get_peft_model(
        model,
        LoraConfig(
            r=lora.get("r", 16),
            lora_alpha=lora.get("alpha", 32),
            lora_dropout=lora.get("dropout", 0.0),
            task_type="CAUSAL_LM",
            target_modules=lora.get("target_modules", "all-linear"),
        ),
    )


def guard_finite(trainer, where: str):
    """Stop training at the first NaN/inf loss, whatever the trainer: the stage fails and its MLflow run ends
    FAILED instead of a broken model being saved."""
    import torch

    compute = trainer.compute_loss

    def checked(model, inputs, *args, **kwargs):
        out = compute(model, inputs, *args, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"{where}: non-finite loss ({loss.detach().float().mean().item()}) at step "
                f"{trainer.state.global_step}; lower train.learning_rate or check the data"
            )
        return out

    trainer.compute_loss = checked
    return trainer


def merged_model(model, params: SFTParams, base_path: str, trust_remote_code: bool = False):
    """A plain model to ship (vLLM, pruning and bnb all want one), with the merge checked against the trained one.

    QLoRA adapters learned against the dequantized low-bit base, so they are merged into exactly that base, in
    full precision, rather than into the original weights."""
    if not params.lora:
        return model, {}
    import tempfile

    import torch

    probe = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=probe.to(model.device)).logits.float().cpu()
    quant = bnb_config(params)
    if quant is None:
        plain = model.merge_and_unload()
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(prefix="distillery-adapter-") as tmp:
            model.save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(
                base_path, quantization_config=quant, trust_remote_code=trust_remote_code
            )
            base.dequantize()
            plain = PeftModel.from_pretrained(base, tmp).merge_and_unload()
    with torch.no_grad():
        after = plain(input_ids=probe.to(plain.device)).logits.float().cpu()
    diff = float((before - after).abs().max())
    scale = float(before.abs().max())
    if not diff <= 1e-2 * max(1.0, scale):
        raise RuntimeError(
            f"train: the merged model's logits differ from the adapter model's by {diff:.3g} "
            f"(logit scale {scale:.3g}); refusing to save a model that is not the one trained"
        )
    return plain, {"merge_max_abs_logit_diff": diff}


def finish(
    trainer,
    result,
    tokenizer,
    output_dir: Path,
    trainable: int,
    examples: int,
    params: SFTParams,
    base_path: str,
    manifest: dict,
    where: str,
    trust_remote_code: bool = False,
) -> dict:
    """After any trainer: refuse non-finite losses, save the (merged) model atomically, manifest last, figures."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses and not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"{where}: non-finite loss in log history {losses[-5:]}")
    acc = trainer.accelerator
    # Sharded weights (FSDP, DeepSpeed ZeRO-3): every process takes part in gathering the full state dict.
    state_dict = None
    if acc.distributed_type.value in ("FSDP", "DEEPSPEED"):
        if params.lora:
            raise ValueError(f"{where}: train.lora with FSDP/DeepSpeed is not supported yet; use a DDP config")
        state_dict = acc.get_state_dict(trainer.model_wrapped)
    seconds = float(result.metrics.get("train_runtime", 0.0))
    tokens = int(trainer.state.num_input_tokens_seen or 0)  # summed over processes by the Trainer
    figures = {
        "train_loss": float(result.training_loss),
        "final_loss": float(losses[-1]) if losses else float("nan"),
        "steps": int(trainer.state.global_step),
        "train_seconds": seconds,
        "trainable_params": int(trainable),
        "examples": examples,
        "tokens_seen": tokens,
        "train_tokens_per_s": tokens / seconds if seconds else 0.0,
        "world_size": int(trainer.args.world_size),
    }
    # Under `accelerate launch` every process trained the same weights; one writes them, the others never touch
    # output_dir and wait until it is complete, so no process exits while the model is half written.
    if trainer.is_world_process_zero():
        model, merge = merged_model(trainer.model, params, base_path, trust_remote_code)
        with atomic_dir(output_dir) as tmp:
            save_model(model, tokenizer, tmp, state_dict=state_dict)
        figures.update(params=int(model.num_parameters()), **merge)
        write_manifest(
            output_dir,
            {
                "kind": "model",
                **manifest,
                "lora": params.lora,
                "figures": figures,
                "loss_history": trainer.state.log_history,
            },
        )
    acc.wait_for_everyone()
    return figures


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def student_tokenizer(model_path: str, teacher_path: str | None, where: str, trust_remote_code: bool = False):
    """The student's tokenizer, refused when pad == eos or (with a teacher) when the vocabularies differ."""
    from transformers import AutoTokenizer

    from distillery.checks import check_same_vocab

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    check_pad_not_eos(tokenizer, where=f"student tokenizer {model_path}")
    if teacher_path:
        check_same_vocab(
            AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code),
            tokenizer,
            where=f"{where}: teacher vs student tokenizer",
        )
    return tokenizer


def sft(
    model_path: str,
    records: list[dict],
    output_dir: Path,
    params: SFTParams,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
    where: str = "train",
) -> dict:
    """Fine-tune `model_path` on prompt/completion `records`; save the (merged) model to `output_dir`.

    Returns the training figures: final loss, steps, tokens seen, seconds, tokens/s, trainable params.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not records:
        raise ValueError(f"{where}: no training records (did the filter drop every trace?)")
    tokenizer = student_tokenizer(model_path, None, where, trust_remote_code)
    model = load_student(model_path, params, trust_remote_code)
    config = SFTConfig(
        **common_args(params, output_dir),
        max_length=params.max_length,
        completion_only_loss=True,
        dataset_num_proc=None,
        **params.extra,
    )
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    trainer = guard_finite(
        SFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks or []
        ),
        where,
    )
    result = trainer.train()
    return finish(
        trainer,
        result,
        tokenizer,
        output_dir,
        trainable_count(trainer.model),
        len(records),
        params,
        model_path,
        manifest={"base": model_path, "method": "sft"},
        where=where,
        trust_remote_code=trust_remote_code,
    )


def logit_kd(
    model_path: str,
    teacher_path: str,
    rows: list[dict],
    logprobs: Path,
    output_dir: Path,
    params: SFTParams,
    kd,
    sampling_temperature: float,
    logprobs_mode: str,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Train `model_path` on the teacher's stored top-k distributions of the kept traces (distillery.kd)."""
    from transformers import TrainingArguments

    from distillery.checks import check_temperature_both_sides
    from distillery.kd import build_examples, load_logprobs, make_trainer

    tokenizer = student_tokenizer(model_path, teacher_path, "logit_kd", trust_remote_code)
    check_temperature_both_sides(logprobs_mode, sampling_temperature, kd.temperature)
    examples = build_examples(rows, load_logprobs(logprobs), tokenizer, params.max_length)
    model = load_student(model_path, params, trust_remote_code)
    args = TrainingArguments(**common_args(params, output_dir))
    trainer = guard_finite(
        make_trainer(
            model,
            tokenizer,
            examples,
            args,
            kd.temperature,
            kd.alpha,
            kd.divergence,
            kd.beta,
            kd.tail,
            callbacks,
            scale_t2=kd.scale_t2,
        ),
        "logit_kd",
    )
    result = trainer.train()
    return finish(
        trainer,
        result,
        tokenizer,
        output_dir,
        trainable_count(model),
        len(examples),
        params,
        model_path,
        manifest={"base": model_path, "method": "logit_kd", "kd": kd.model_dump()},
        where="logit_kd",
        trust_remote_code=trust_remote_code,
    )


def gkd(
    model_path: str,
    teacher_path: str,
    rows: list[dict],
    output_dir: Path,
    params: SFTParams,
    g,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """On-policy distillation with TRL's GKDTrainer: a fraction lmbda of each batch is sampled by the student
    itself and scored by the live teacher under the generalized JSD (beta)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillery.checks import check_teacher_frozen

    tokenizer = student_tokenizer(model_path, teacher_path, "gkd", trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"gkd: the student tokenizer ({model_path}) has no chat template; TRL's GKD needs one")
    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_path, dtype=torch.bfloat16 if params.bf16 else torch.float32, trust_remote_code=trust_remote_code
    )
    teacher.eval().requires_grad_(False)
    check_teacher_frozen(teacher, where=f"teacher {teacher_path}")
    student = load_student(model_path, params, trust_remote_code)
    data = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": r.get("prompt_text", r["prompt"])},
                    {"role": "assistant", "content": r["completion"]},
                ]
            }
            for r in rows
        ]
    )
    args = GKDConfig(
        **common_args(params, output_dir),
        max_length=params.max_length,
        lmbda=g.lmbda,
        beta=g.beta,
        temperature=g.temperature,
        max_new_tokens=g.max_new_tokens,
        seq_kd=g.seq_kd,
    )
    trainer = guard_finite(
        GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=callbacks or [],
        ),
        "gkd",
    )
    result = trainer.train()
    return finish(
        trainer,
        result,
        tokenizer,
        output_dir,
        trainable_count(trainer.model),
        len(rows),
        params,
        model_path,
        manifest={"base": model_path, "method": "gkd", "gkd": g.model_dump()},
        where="gkd",
        trust_remote_code=trust_remote_code,
    )


def dpo(
    model_path: str,
    teacher_path: str,
    rows: list[dict],
    output_dir: Path,
    params: SFTParams,
    d,
    verifier,
    chat: bool,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Preference distillation: (SFT on the traces, then) the student samples `d.samples` answers per prompt, the
    verifier or the teacher ranks them into chosen/rejected pairs, and TRL's DPOTrainer trains on the pairs with
    the starting student as the reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from distillery.preferences import preference_pairs, sample_student

    figures: dict[str, Any] = {}
    start = model_path
    if d.sft_first:
        sft_dir = output_dir.parent / f"{output_dir.name}-sft"
        sft_figs = sft(
            model_path, training_records(rows, chat), sft_dir, params, callbacks, trust_remote_code, where="dpo (sft)"
        )
        figures.update({f"sft_{k}": v for k, v in sft_figs.items()})
        start = str(sft_dir)
    tokenizer = student_tokenizer(start, None, "dpo", trust_remote_code)  # the teacher judges text, not ids
    prompts = list({r["prompt_id"]: r for r in rows}.values())[: d.num_prompts]
    samples = sample_student(
        start, [r.get("prompt_text", r["prompt"]) for r in prompts], d, params.seed, trust_remote_code
    )
    pairs, stats = preference_pairs(prompts, samples, d, verifier, teacher_path, trust_remote_code)
    figures.update(stats)
    if not pairs:
        raise ValueError(
            f"dpo: no preference pairs from {len(prompts)} prompts x {d.samples} samples (judge "
            f"{d.judge}): every sample was judged alike; raise train.dpo.samples or temperature"
        )
    data = Dataset.from_list([to_preference_record(p, chat) for p in pairs])
    args = DPOConfig(
        **{**common_args(params, output_dir), "num_train_epochs": d.epochs, "learning_rate": d.learning_rate},
        beta=d.beta,
        max_length=params.max_length,
        **(
            {"loss_type": [d.loss_type, "sft"], "loss_weights": [1.0, d.sft_weight]}
            if d.sft_weight
            else {"loss_type": [d.loss_type]}
        ),
    )
    model = load_student(start, params, trust_remote_code)
    trainer = guard_finite(
        DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=callbacks or []),
        "dpo",
    )
    result = trainer.train()
    last = next((h for h in reversed(trainer.state.log_history) if "rewards/accuracies" in h), {})
    figures.update(
        {
            "dpo_reward_accuracy": float(last.get("rewards/accuracies", float("nan"))),
            "dpo_reward_margin": float(last.get("rewards/margins", float("nan"))),
        }
    )
    figures.update(
        finish(
            trainer,
            result,
            tokenizer,
            output_dir,
            trainable_count(trainer.model),
            len(pairs),
            params,
            start,
            manifest={"base": model_path, "method": "dpo", "dpo": d.model_dump()},
            where="dpo",
            trust_remote_code=trust_remote_code,
        )
    )
    # the whole budget, SFT included, for comparisons with single-phase methods
    for k in ("steps", "tokens_seen", "train_seconds"):
        figures[f"total_{k}"] = figures[k] + figures.get(f"sft_{k}", 0)
    return figures


def to_preference_record(pair: dict, chat: bool) -> dict:
    if chat:
        return {
            "prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
        }
    return {"prompt": pair["prompt_text"], "chosen": pair["chosen"], "rejected": pair["rejected"]}


def hard_label_records(rows: list[dict], template: str, chat: bool) -> list[dict]:
    """The no-teacher baseline: each distinct prompt once, its completion the reference answer in `template`."""
    unique = {r.get("prompt_id", r.get("id")): r for r in rows}.values()
    return training_records([{**r, "completion": template.format(answer=r["answer"])} for r in unique], chat)


def training_records(rows: list[dict], chat: bool) -> list[dict]:
    """Prompt/completion pairs for TRL. Chat pipelines use conversational form so TRL applies the student's
    own template; plain pipelines train on the exact prompt text the teacher saw."""
    if chat:
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows
        ]
    return [{"prompt": r.get("prompt_text", r["prompt"]), "completion": r["completion"]} for r in rows]


def run_method(
    cfg: Pipeline, student: str, traces: str | None, generated: str | None, out: Path, callbacks: list | None = None
) -> dict:
    """Train `student` by the pipeline's method into `out`; returns the training figures."""
    t, trust, chat = cfg.train, cfg.student.trust_remote_code, cfg.data.chat_template
    params = params_from(cfg)
    if t.method == "hard":  # the dataset's answers only; the kept traces' prompts when there are any
        from distillery.data import load_prompts

        rows = read_jsonl(Path(traces)) if traces else load_prompts(cfg.data)
        return sft(
            student,
            hard_label_records(rows, t.hard_label_template, chat),
            out,
            params,
            callbacks,
            trust,
            where="train (hard labels)",
        )
    rows = read_jsonl(Path(traces))
    teacher = resolve_model(cfg.teacher.path)
    if t.method == "logit_kd":
        gen_dir = Path(generated or traces).parent
        manifest = json.loads((gen_dir / "manifest.json").read_text())
        return logit_kd(
            student,
            teacher,
            rows,
            gen_dir / "logprobs.parquet",
            out,
            params,
            t.kd,
            cfg.generate.temperature,
            (manifest.get("logprobs") or {}).get("mode", "raw_logprobs"),
            callbacks,
            trust,
        )
    if t.method == "gkd":
        return gkd(student, teacher, rows, out, params, t.gkd, callbacks, trust)
    if t.method == "dpo":
        from tasks.filter import VERIFIERS

        check = VERIFIERS[cfg.filter.verifier]
        return dpo(
            student,
            teacher,
            rows,
            out,
            params,
            t.dpo,
            lambda text, ref: check(text, ref, cfg.filter),
            chat,
            callbacks,
            trust,
        )
    return sft(student, training_records(rows, chat), out, params, callbacks, trust)


def params_from(cfg: Pipeline) -> SFTParams:
    t = cfg.train
    return SFTParams(
        epochs=t.epochs,
        learning_rate=t.learning_rate,
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length,
        warmup_ratio=t.warmup_ratio,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        seed=t.seed,
        logging_steps=t.logging_steps,
        bf16=t.bf16,
        max_steps=t.max_steps,
        lora=t.lora.model_dump() if t.lora else None,
    )


def loss_curve(history: list[dict], title: str = "train: student loss"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        ax.plot(*zip(*pts, strict=True), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def mlflow_callback(run):
    from transformers import TrainerCallback

    class LogToRun(TrainerCallback):
        """Streams the Trainer's logs to the stage's MLflow run (explicit run id; thread-safe)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                run.log_metrics({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=state.global_step)

    return LogToRun()


def train_logged(cfg: Pipeline, run, student: str, traces: str | None, generated: str | None, out: Path) -> dict:
    """`run_method` with its record on the MLflow run `run`: parameters, the traces as dataset inputs, metrics
    streamed per logging step, the loss curve, the model when `log_models`. A NullRun records nothing (tracking
    off, or an accelerate process other than the first, which alone writes `out`)."""
    from distillery.lineage import log_traces_input
    from distillery.tracking import NullRun

    run.log_params({"student": cfg.student.path, **cfg.train.model_dump()})
    # lineage: what the student was trained on, and what it was filtered from
    if generated:
        log_traces_input(run, Path(generated), "generated", context="source")
    if traces:
        log_traces_input(run, Path(traces), "filtered", context="training")
    figures = run_method(cfg, student, traces, generated, out, callbacks=[mlflow_callback(run)])
    if isinstance(run, NullRun):
        return figures
    run.log_metrics(figures)
    import matplotlib.pyplot as plt

    fig = loss_curve(json.loads((out / "manifest.json").read_text())["loss_history"])
    run.log_figure(fig, "loss_curve.png")
    plt.close(fig)
    if cfg.log_models:
        run.log_artifact(out, "model")
    return figures


@task(name="train", cache_policy=NO_CACHE, log_prints=False)  # datasets prints bytecode when hashing
def train_task(cfg: Pipeline, ctx: RunContext, traces: str | None, student: str, generated: str | None = None) -> dict:
    out = ctx.stage_dir("train")
    with ctx.tracker().stage("train", ctx.parent_run_id) as run:
        figures = train_logged(cfg, run, student, traces, generated, out)
    return {"path": str(out), "figures": figures, "run_id": run.run_id}
