"""The training harness every method and stage shares: parameters, the student (full, LoRA or QLoRA), the
Trainer arguments, the guards (finite loss, pad != eos, one vocabulary), the finish step that merges, checks and
saves the model atomically with its manifest last, and the MLflow callback and loss curve.

Used by distillery.methods (the train stage's methods), the prune stage's healing, the draft's distillation and
the demo teacher's build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillery.artifacts import atomic_dir, atomic_write_text, save_model, write_manifest
from distillery.checks import check_pad_not_eos
from distillery.console import say


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
    checkpoint_every: int = 0  # save the trainer's whole state every N steps (0: never); see run_trainer
    keep_checkpoints: int = 2
    pad_token: str | None = None  # the student's pad when its tokenizer pads with eos (student.pad_token)


COMPLETE = "distillery-complete"  # written into a checkpoint folder once the Trainer has saved all of it
FINGERPRINT = "distillery-fingerprint.json"


def trainer_dir(output_dir: Path) -> Path:
    """The Trainer's own folder for a stage output: hidden beside it, where its checkpoints go."""
    return output_dir.parent / f".{output_dir.name}-trainer"


def common_args(params: SFTParams, output_dir: Path) -> dict:
    """TrainingArguments every method shares. Transformers' default `logging_nan_inf_filter` would replace a NaN
    loss in the logs by the running mean and hide it; it is off, and `guard_finite` stops at the first one."""
    import torch

    return dict(
        output_dir=str(trainer_dir(output_dir)),
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
        save_strategy="steps" if params.checkpoint_every else "no",
        save_steps=save_steps(params),
        save_total_limit=params.keep_checkpoints,
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,
        disable_tqdm=False,
    )


def save_steps(params: SFTParams) -> int:
    """`checkpoint_every`, rounded up to a multiple of `logging_steps`. A resumed Trainer starts its running loss at the
    checkpoint, so a checkpoint inside a logging window would make the loss logged for that window (and a stage's
    final_loss) differ from an uninterrupted run's; on a window's edge, every logged loss is the same."""
    every = params.checkpoint_every or 500
    return -(-every // params.logging_steps) * params.logging_steps


def with_checkpoints(params: SFTParams, checkpoint) -> SFTParams:
    """`params` with the pipeline's `checkpoint` settings (CheckpointConfig; None: none)."""
    from dataclasses import replace

    if checkpoint is None:
        return params
    return replace(params, checkpoint_every=checkpoint.every_steps, keep_checkpoints=checkpoint.keep)


def run_trainer(trainer, where: str):
    """`trainer.train()`, resumable. With checkpoints on, the Trainer saves its whole state (weights, optimizer,
    scheduler, RNG, step; the data order follows from the seed and step) every N steps into the hidden folder beside
    the stage's output; a checkpoint counts once the Trainer has finished writing it (`COMPLETE`, written last, as a
    manifest is). A run killed mid-way and started again on the same output resumes from the last complete one and
    ends with the weights an uninterrupted run would have. A checkpoint of other settings or data is not resumed."""
    import json
    import shutil

    from transformers import TrainerCallback

    args = trainer.args
    if args.save_strategy == "no":
        return trainer.train()
    folder = Path(args.output_dir)
    fingerprint = _fingerprint(trainer)
    if trainer.is_world_process_zero():
        if folder.is_dir():
            recorded = folder / FINGERPRINT
            stale = recorded.is_file() and json.loads(recorded.read_text()) != fingerprint
            for ckpt in folder.glob("checkpoint-*"):
                if stale or not (ckpt / COMPLETE).is_file():  # other settings, or debris of a kill mid-save
                    shutil.rmtree(ckpt, ignore_errors=True)
        atomic_write_text(folder / FINGERPRINT, json.dumps(fingerprint, indent=2, sort_keys=True))
    trainer.accelerator.wait_for_everyone()  # every process then sees the same checkpoints

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                atomic_write_text(Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE, "")

    trainer.add_callback(MarkComplete())
    done = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    last = str(done[-1]) if done else None
    if last:
        say(f"{where}: resuming from {last}")
    trainer.distillery_resumed_from = int(last.rsplit("-", 1)[1]) if last else 0
    return trainer.train(resume_from_checkpoint=last)


def _fingerprint(trainer) -> dict:
    """What a checkpoint must match to be resumed: the training arguments that shape the run, and the data."""
    import hashlib

    args = {k: v for k, v in trainer.args.to_dict().items() if k not in ("output_dir", "logging_dir", "run_name")}
    data = trainer.train_dataset
    digest = hashlib.sha256(repr(data[: min(len(data), 64)]).encode()).hexdigest() if data is not None else None
    return {"args": json_safe(args), "examples": len(data) if data is not None else None, "data_head": digest}


def json_safe(x):
    import json

    return json.loads(json.dumps(x, default=str))


def qlora_config(params: SFTParams):
    """QLoRA's quantized frozen base (bitsandbytes), or None."""
    if (params.lora or {}).get("quantize") != "nf4":
        return None
    from distillery.bnb import bnb_config, require_bnb
    from distillery.config import QuantizeConfig

    require_bnb()  # the quantize stage's NF4 (double quant), computing in the training dtype
    return bnb_config("nf4", QuantizeConfig(double_quant=True, compute_dtype="bfloat16" if params.bf16 else "float32"))


def load_student(model_path: str, params: SFTParams, trust_remote_code: bool = False):
    """The model to train: full weights, LoRA adapters (PEFT) on it, or QLoRA adapters on a bnb-quantized base."""
    import torch
    from transformers import AutoModelForCausalLM

    quant = qlora_config(params)
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
    quant = qlora_config(params)
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
        "resumed_from_step": getattr(trainer, "distillery_resumed_from", 0),
    }
    # Under `accelerate launch` every process trained the same weights; one writes them, the others never touch
    # output_dir and wait until it is complete, so no process exits while the model is half written.
    if trainer.is_world_process_zero():
        model, merge = merged_model(trainer.model, params, base_path, trust_remote_code)
        if params.pad_token is not None:  # the saved config pads as the saved tokenizer does
            model.config.pad_token_id = tokenizer.pad_token_id
            if model.generation_config is not None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id
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
    if trainer.is_world_process_zero():  # the model is saved: its checkpoints are spent
        import shutil

        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    return figures


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def student_tokenizer(
    model_path: str, teacher_path: str | None, where: str, trust_remote_code: bool = False, pad_token: str | None = None
):
    """The student's tokenizer, refused when pad == eos or (with a teacher) when the vocabularies differ.
    `pad_token` (student.pad_token) replaces the pad: one token of the vocabulary, never eos."""
    from transformers import AutoTokenizer

    from distillery.checks import DistillationCheckError, check_round_trip, check_same_vocab

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise DistillationCheckError(
                f"student.pad_token: {pad_token!r} is not one token of {model_path}'s vocabulary; name one that is "
                "(Qwen-family tokenizers have '<|fim_pad|>')"
            )
        tokenizer.pad_token = pad_token
    check_pad_not_eos(tokenizer, where=f"student tokenizer {model_path}")
    check_round_trip(tokenizer, where=f"student tokenizer {model_path}")
    if teacher_path:
        check_same_vocab(
            AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code),
            tokenizer,
            where=f"{where}: teacher vs student tokenizer",
        )
    return tokenizer


def assistant_turn(row: dict) -> str:
    """The teacher's whole assistant turn: the part its chat template prefilled (R1-Distill's `<think>\\n`)
    and the completion that continues it."""
    return row.get("assistant_prefill", "") + row["completion"]


def training_records(rows: list[dict], chat: bool) -> list[dict]:
    """Prompt/completion pairs for TRL. Chat pipelines use conversational form so TRL applies the student's
    own template (the trace leaves the teacher's: its prompt is the raw question, its turn what the teacher's
    template prefilled plus what the teacher wrote); plain pipelines train on the exact prompt text the teacher
    saw."""
    if chat:
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": assistant_turn(r)}],
            }
            for r in rows
        ]
    return [{"prompt": r.get("prompt_text", r["prompt"]), "completion": r["completion"]} for r in rows]


def hard_label_records(rows: list[dict], template: str, chat: bool) -> list[dict]:
    """The no-teacher baseline: each distinct prompt once, its completion the reference answer in `template`."""
    unique = {r.get("prompt_id", r.get("id")): r for r in rows}.values()
    return training_records([{**r, "completion": template.format(answer=r["answer"])} for r in unique], chat)


def to_preference_record(pair: dict, chat: bool) -> dict:
    if chat:
        return {
            "prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
        }
    return {"prompt": pair["prompt_text"], "chosen": pair["chosen"], "rejected": pair["rejected"]}


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
