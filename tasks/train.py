"""train: the student learns from the kept teacher traces with TRL's SFTTrainer (sequence-level KD).

    distillery run demo --set train.epochs=1

Loss is on completion tokens only (TRL masks the prompt for prompt/completion data), full fine-tuning or
LoRA through PEFT. Refuses to start when the tokenizer's pad token equals eos (the student would never be
taught to stop) or when the trace file is empty.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, read_jsonl, write_manifest
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
    lora: dict[str, Any] | None = None  # {r, alpha, dropout, target_modules}; None = full fine-tuning
    max_steps: int = -1
    extra: dict[str, Any] = field(default_factory=dict)  # passed to SFTConfig as is


def lora_config(params: SFTParams):
    """PEFT LoRA settings from the pipeline, or None for full fine-tuning."""
    if not params.lora:
        return None
    from peft import LoraConfig

    lora = params.lora
    return LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.0),
                      target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM")


def finish(trainer, result, tokenizer, output_dir: Path, trainable: int, examples: int, merge: bool,
           manifest: dict, where: str) -> dict:
    """After any trainer: refuse non-finite losses, save the (merged) model atomically, manifest last, figures."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses and not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"{where}: non-finite loss in log history {losses[-5:]}")
    # ship a plain model: vLLM, pruning and bnb all want one
    model = trainer.model.merge_and_unload() if merge else trainer.model
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    seconds = float(result.metrics.get("train_runtime", 0.0))
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    figures = {"train_loss": float(result.training_loss), "final_loss": float(losses[-1]) if losses else float("nan"),
               "steps": int(trainer.state.global_step), "train_seconds": seconds, "trainable_params": int(trainable),
               "examples": examples, "tokens_seen": tokens, "train_tokens_per_s": tokens / seconds if seconds else 0.0}
    write_manifest(output_dir, {"kind": "model", **manifest, "figures": figures,
                                "loss_history": trainer.state.log_history})
    return figures


def sft(model_path: str, records: list[dict], output_dir: Path, params: SFTParams,
        callbacks: list | None = None, trust_remote_code: bool = False) -> dict:
    """Fine-tune `model_path` on prompt/completion `records`; save the (merged) model to `output_dir`.

    Returns the training figures: final loss, steps, tokens seen, seconds, tokens/s, trainable params.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if not records:
        raise ValueError("train: no training records (did the filter drop every trace?)")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    check_pad_not_eos(tokenizer, where=f"student tokenizer {model_path}")
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if params.bf16 else torch.float32, trust_remote_code=trust_remote_code
    )
    use_cpu = not torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(output_dir.parent / f".{output_dir.name}-trainer"),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        learning_rate=params.learning_rate,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        max_length=params.max_length,
        warmup_steps=params.warmup_ratio,
        weight_decay=params.weight_decay,
        lr_scheduler_type=params.lr_scheduler_type,
        seed=params.seed,
        logging_steps=params.logging_steps,
        bf16=params.bf16,
        use_cpu=use_cpu,
        save_strategy="no",
        report_to=[],
        completion_only_loss=True,
        dataset_num_proc=None,
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",
        **params.extra,
    )
    peft_config = lora_config(params)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks or [])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = trainer.train()
    return finish(trainer, result, tokenizer, output_dir, trainable, len(records), merge=peft_config is not None,
                  manifest={"base": model_path}, where="train")


def logit_kd(model_path: str, teacher_path: str, rows: list[dict], logprobs: Path, output_dir: Path,
             params: SFTParams, kd, sampling_temperature: float, logprobs_mode: str, callbacks: list | None = None,
             trust_remote_code: bool = False) -> dict:
    """Train `model_path` on the teacher's stored top-k distributions of the kept traces (distillery.kd)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from distillery.checks import check_same_vocab, check_temperature_both_sides
    from distillery.kd import build_examples, load_logprobs, make_trainer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    check_pad_not_eos(tokenizer, where=f"student tokenizer {model_path}")
    check_same_vocab(AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code), tokenizer,
                     where="logit_kd: teacher vs student tokenizer")
    check_temperature_both_sides(logprobs_mode, sampling_temperature, kd.temperature)
    examples = build_examples(rows, load_logprobs(logprobs), tokenizer, params.max_length)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if params.bf16 else torch.float32, trust_remote_code=trust_remote_code)
    if params.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(params))
    args = TrainingArguments(
        output_dir=str(output_dir.parent / f".{output_dir.name}-trainer"), num_train_epochs=params.epochs,
        max_steps=params.max_steps, learning_rate=params.learning_rate, per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps, warmup_steps=params.warmup_ratio,
        weight_decay=params.weight_decay, lr_scheduler_type=params.lr_scheduler_type, seed=params.seed,
        logging_steps=params.logging_steps, bf16=params.bf16, use_cpu=not torch.cuda.is_available(),
        save_strategy="no", report_to=[], include_num_input_tokens_seen="non_padding")
    trainer = make_trainer(model, tokenizer, examples, args, kd.temperature, kd.alpha, kd.divergence, kd.beta,
                           kd.tail, callbacks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = trainer.train()
    return finish(trainer, result, tokenizer, output_dir, trainable, len(examples), merge=bool(params.lora),
                  manifest={"base": model_path, "method": "logit_kd", "kd": kd.model_dump()}, where="logit_kd")


def gkd(model_path: str, teacher_path: str, rows: list[dict], output_dir: Path, params: SFTParams, g,
        callbacks: list | None = None, trust_remote_code: bool = False) -> dict:
    """On-policy distillation with TRL's GKDTrainer: a fraction lmbda of each batch is sampled by the student
    itself and scored by the live teacher under the generalized JSD (beta)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillery.checks import check_same_vocab, check_teacher_frozen

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    check_pad_not_eos(tokenizer, where=f"student tokenizer {model_path}")
    check_same_vocab(AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code), tokenizer,
                     where="gkd: teacher vs student tokenizer")
    if tokenizer.chat_template is None:
        raise ValueError(f"gkd: the student tokenizer ({model_path}) has no chat template; TRL's GKD needs one")
    dtype = torch.bfloat16 if params.bf16 else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype, trust_remote_code=trust_remote_code)
    teacher.eval().requires_grad_(False)
    check_teacher_frozen(teacher, where=f"teacher {teacher_path}")
    student = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": r.get("prompt_text", r["prompt"])},
                                            {"role": "assistant", "content": r["completion"]}]} for r in rows])
    args = GKDConfig(
        output_dir=str(output_dir.parent / f".{output_dir.name}-trainer"), num_train_epochs=params.epochs,
        max_steps=params.max_steps, learning_rate=params.learning_rate, per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps, warmup_steps=params.warmup_ratio,
        lr_scheduler_type=params.lr_scheduler_type, seed=params.seed, logging_steps=params.logging_steps,
        bf16=params.bf16, use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[],
        max_length=params.max_length, lmbda=g.lmbda, beta=g.beta, temperature=g.temperature,
        max_new_tokens=g.max_new_tokens, seq_kd=g.seq_kd, include_num_input_tokens_seen="non_padding")
    peft_config = lora_config(params)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks or [])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = trainer.train()
    return finish(trainer, result, tokenizer, output_dir, trainable, len(rows), merge=peft_config is not None,
                  manifest={"base": model_path, "method": "gkd", "gkd": g.model_dump()}, where="gkd")


def training_records(rows: list[dict], chat: bool) -> list[dict]:
    """Prompt/completion pairs for TRL. Chat pipelines use conversational form so TRL applies the student's
    own template; plain pipelines train on the exact prompt text the teacher saw."""
    if chat:
        return [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]
    return [{"prompt": r.get("prompt_text", r["prompt"]), "completion": r["completion"]} for r in rows]


def params_from(cfg: Pipeline) -> SFTParams:
    t = cfg.train
    return SFTParams(epochs=t.epochs, learning_rate=t.learning_rate, batch_size=t.batch_size,
                     gradient_accumulation_steps=t.gradient_accumulation_steps, max_length=t.max_length,
                     warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler_type,
                     seed=t.seed, logging_steps=t.logging_steps, bf16=t.bf16, max_steps=t.max_steps,
                     lora=t.lora.model_dump() if t.lora else None)


def loss_curve(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        ax.plot(*zip(*pts, strict=True), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("train: student loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _mlflow_callback(run):
    from transformers import TrainerCallback

    class LogToRun(TrainerCallback):
        """Streams the Trainer's logs to the stage's MLflow run (explicit run id; thread-safe)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                run.log_metrics({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=state.global_step)

    return LogToRun()


@task(name="train", cache_policy=NO_CACHE, log_prints=False)  # datasets prints bytecode when hashing
def train_task(cfg: Pipeline, ctx: RunContext, traces: str, student: str, generated: str | None = None) -> dict:
    from distillery.lineage import log_traces_input

    out = ctx.stage_dir("train")
    with ctx.tracker().stage("train", ctx.parent_run_id) as run:
        run.log_params({"student": cfg.student.path, **cfg.train.model_dump()})
        # lineage: what the student was trained on, and what it was filtered from
        if generated:
            log_traces_input(run, Path(generated), "generated", context="source")
        log_traces_input(run, Path(traces), "filtered", context="training")
        rows = read_jsonl(Path(traces))
        if cfg.train.method == "logit_kd":
            gen_dir = Path(generated or traces).parent
            manifest = json.loads((gen_dir / "manifest.json").read_text())
            figures = logit_kd(student, resolve_model(cfg.teacher.path), rows, gen_dir / "logprobs.parquet", out,
                               params_from(cfg), cfg.train.kd, cfg.generate.temperature,
                               (manifest.get("logprobs") or {}).get("mode", "raw_logprobs"),
                               callbacks=[_mlflow_callback(run)], trust_remote_code=cfg.student.trust_remote_code)
        elif cfg.train.method == "gkd":
            figures = gkd(student, resolve_model(cfg.teacher.path), rows, out, params_from(cfg), cfg.train.gkd,
                          callbacks=[_mlflow_callback(run)], trust_remote_code=cfg.student.trust_remote_code)
        else:
            figures = sft(student, training_records(rows, cfg.data.chat_template), out, params_from(cfg),
                          callbacks=[_mlflow_callback(run)], trust_remote_code=cfg.student.trust_remote_code)
        run.log_metrics(figures)
        import matplotlib.pyplot as plt

        fig = loss_curve(json.loads((out / "manifest.json").read_text())["loss_history"])
        run.log_figure(fig, "loss_curve.png")
        plt.close(fig)
        if cfg.log_models:
            run.log_artifact(out, "model")
    return {"path": str(out), "figures": figures, "run_id": run.run_id}
