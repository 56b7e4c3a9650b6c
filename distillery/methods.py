"""The training methods, by `train.method`: the student learns from the teacher.

- hard: the dataset's reference answers only (no teacher), the baseline every method is measured against;
- sft: TRL SFTTrainer on the kept teacher traces (sequence-level KD), loss on completion tokens only;
- logit_kd: the teacher's stored top-k distribution at every trace token (distillery.kd);
- gkd: TRL's on-policy GKDTrainer against the live teacher;
- on_policy: TRL's DistillationTrainer: the student's own rollouts (vLLM on a GPU), the live teacher's full
  distribution at each of their tokens, reverse KL by default, from the SFT student;
- feature: hidden states of chosen layer pairs through a learned projection, mixed with logit KD on the live
  teacher's full distribution (distillery.feature, written by hand);
- cross_tokenizer: teacher and student on different tokenizers, TRL's GOLDTrainer (ULD, exact on shared tokens);
- dpo: SFT, then pairs of the student's own samples ranked by the verifier or the teacher, TRL DPOTrainer.
Full fine-tuning, LoRA, or QLoRA (adapters on a bitsandbytes NF4 base) through PEFT (distillery.training). Every
method refuses pad == eos and stops at the first non-finite loss. Adding one: a function here that ends in
`training.finish`, a branch in `run_method`, its name in TrainConfig.method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillery.artifacts import read_jsonl
from distillery.checks import check_template_keeps_turn
from distillery.config import Pipeline
from distillery.demo.assets import resolve_model
from distillery.training import (
    SFTParams,
    assistant_turn,
    common_args,
    finish,
    guard_finite,
    hard_label_records,
    load_student,
    run_trainer,
    student_tokenizer,
    to_preference_record,
    trainable_count,
    training_records,
)

# The name each method's student goes by in the table and the registry.
METHOD_LABELS = {
    "hard": "student-hard",
    "sft": "student-sft",
    "logit_kd": "student-kd",
    "gkd": "student-gkd",
    "on_policy": "student-onpolicy",
    "feature": "student-feature",
    "cross_tokenizer": "student-xtok",
    "dpo": "student-dpo",
}


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
    tokenizer = student_tokenizer(model_path, None, where, trust_remote_code, params.pad_token)
    if not isinstance(records[0]["prompt"], str):  # conversational: TRL renders them with the student's template
        check_template_keeps_turn(tokenizer, where=f"{where}: student tokenizer {model_path}")
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
    result = run_trainer(trainer, where)
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
    chat: bool = False,
) -> dict:
    """Train `model_path` on the teacher's stored top-k distributions of the kept traces (distillery.kd)."""
    from transformers import TrainingArguments

    from distillery.checks import check_same_template, check_temperature_both_sides
    from distillery.kd import build_examples, load_logprobs, make_trainer

    tokenizer = student_tokenizer(model_path, teacher_path, "logit_kd", trust_remote_code, params.pad_token)
    check_temperature_both_sides(logprobs_mode, sampling_temperature, kd.temperature)
    if chat:  # the examples are the teacher's rendered prompts: the student must be served the same format
        check_same_template(teacher_path, tokenizer, "logit_kd", trust_remote_code)
    if not logprobs.is_file():
        raise FileNotFoundError(f"logit_kd: no stored teacher logprobs at {logprobs} (set generate.logprobs: k > 0)")
    examples = build_examples(rows, load_logprobs(logprobs), tokenizer, params.max_length)
    model = load_student(model_path, params, trust_remote_code)
    rows_out = model.get_output_embeddings().weight.shape[0]
    chunk = kd.chunk_size if kd.chunk_size is not None else (1024 if rows_out >= 32_000 else 0)
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
            chunk_size=chunk,
        ),
        "logit_kd",
    )
    result = run_trainer(trainer, "logit_kd")
    folded = sum(i >= rows_out for ex in examples for pos in ex["top_ids"] for i in pos)
    return finish(
        trainer,
        result,
        tokenizer,
        output_dir,
        trainable_count(model),
        len(examples),
        params,
        model_path,
        manifest={
            "base": model_path,
            "method": "logit_kd",
            "kd": {**kd.model_dump(), "chunk_size": chunk},
            # teacher top-k ids past the student's output rows (padding rows of a larger teacher embedding), whose
            # mass went to the tail (losses.topk_kd)
            "teacher_ids_past_student_rows": folded,
        },
        where="logit_kd",
        trust_remote_code=trust_remote_code,
    )


def sft_phase(
    model_path: str,
    rows: list[dict],
    output_dir: Path,
    params: SFTParams,
    callbacks: list | None,
    trust_remote_code: bool,
    chat: bool,
    method: str,
) -> tuple[str, dict]:
    """A two-phase method's SFT on the kept traces, into `<output_dir>-sft`: the student to start the second phase
    from, and the phase's figures as `sft_<figure>`."""
    sft_dir = output_dir.parent / f"{output_dir.name}-sft"
    figs = sft(
        model_path, training_records(rows, chat), sft_dir, params, callbacks, trust_remote_code, where=f"{method} (sft)"
    )
    return str(sft_dir), {f"sft_{k}": v for k, v in figs.items()}


def with_totals(figures: dict) -> dict:
    """`total_<figure>`: the whole budget, an SFT phase included, for comparisons with single-phase methods."""
    for k in ("steps", "tokens_seen", "train_seconds"):
        figures[f"total_{k}"] = figures[k] + figures.get(f"sft_{k}", 0)
    return figures


def frozen_teacher(teacher_path: str, params: SFTParams, trust_remote_code: bool):
    """The live teacher for an on-policy method: eval mode, no grads (checked), in the training dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from distillery.checks import check_teacher_frozen

    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_path, dtype=torch.bfloat16 if params.bf16 else torch.float32, trust_remote_code=trust_remote_code
    )
    teacher.eval().requires_grad_(False)
    check_teacher_frozen(teacher, where=f"teacher {teacher_path}")
    return teacher


def conversations(rows: list[dict], chat: bool):
    """The traces as one user/assistant conversation each, for TRL's chat-based trainers (GKD, GOLD): the raw
    question and the whole assistant turn in chat pipelines, the exact prompt text and completion otherwise."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": r["prompt"] if chat else r.get("prompt_text", r["prompt"])},
                    {"role": "assistant", "content": assistant_turn(r) if chat else r["completion"]},
                ]
            }
            for r in rows
        ]
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
    chat: bool = False,
) -> dict:
    """On-policy distillation with TRL's GKDTrainer: a fraction lmbda of each batch is sampled by the student
    itself and scored by the live teacher under the generalized JSD (beta)."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = student_tokenizer(model_path, teacher_path, "gkd", trust_remote_code, params.pad_token)
    if tokenizer.chat_template is None:
        raise ValueError(f"gkd: the student tokenizer ({model_path}) has no chat template; TRL's GKD needs one")
    check_template_keeps_turn(tokenizer, where=f"gkd: student tokenizer {model_path}")
    teacher = frozen_teacher(teacher_path, params, trust_remote_code)
    student = load_student(model_path, params, trust_remote_code)
    data = conversations(rows, chat)
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
    result = run_trainer(trainer, "gkd")
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


def on_policy(
    model_path: str,
    teacher_path: str,
    rows: list[dict],
    output_dir: Path,
    params: SFTParams,
    o,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
    chat: bool = False,
) -> dict:
    """On-policy distillation with TRL's DistillationTrainer: (SFT on the traces, then) every step the student
    samples a completion for each prompt of its batch (vLLM colocated on a GPU, transformers' generate otherwise)
    and learns, at each token it chose, the live teacher's full next-token distribution under the generalized JSD
    (`o.beta`; 1 = reverse KL). The traces give only their prompts here."""
    import torch
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    figures: dict[str, Any] = {}
    start = model_path
    if o.sft_first:
        start, figures = sft_phase(
            model_path, rows, output_dir, params, callbacks, trust_remote_code, chat, "on_policy"
        )
    tokenizer = student_tokenizer(start, teacher_path, "on_policy", trust_remote_code, params.pad_token)
    if chat:
        if tokenizer.chat_template is None:
            raise ValueError(f"on_policy: data.chat_template is on but the student tokenizer ({start}) has none")
        check_template_keeps_turn(tokenizer, where=f"on_policy: student tokenizer {start}")
    tokenizer.padding_side = "left"  # rollouts are generated from left-padded prompts
    use_vllm = o.generation == "vllm" or (o.generation == "auto" and torch.cuda.is_available())
    if use_vllm and not torch.cuda.is_available():
        raise ValueError("train.on_policy.generation: vllm rollouts run colocated on a GPU (TRL); none here")
    served = o.teacher_server
    client = teacher = None
    if served is not None:  # the teacher never enters this process: it scores the rollouts from its server
        from distillery.teacher_server import TeacherClient

        client = TeacherClient(served.base_url, served.api_key_env, served.timeout, served.max_retries)
        client.check_tokenizer(tokenizer)
    else:
        teacher = frozen_teacher(teacher_path, params, trust_remote_code)
    student = load_student(start, params, trust_remote_code)
    prompts = list({r.get("prompt_id", r["prompt"]): r for r in rows}.values())  # a rollout per prompt per pass
    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": r["prompt"]}] if chat else r.get("prompt_text", r["prompt"])}
            for r in prompts
        ]
    )
    base = common_args(params, output_dir)
    if o.max_steps is not None:
        base["max_steps"] = o.max_steps
    if o.learning_rate is not None:
        base["learning_rate"] = o.learning_rate
    config_cls = DistillationConfig
    extra: dict[str, Any] = {}
    if served is not None:
        from trl.experimental.server_distillation import ServerDistillationConfig

        config_cls = ServerDistillationConfig
        extra = {"teacher_model_server_url": client.base_url, "loss_top_k": served.top_k, "loss_add_tail": True}
    args = config_cls(
        **base,
        **extra,
        beta=o.beta,
        temperature=o.temperature,
        top_p=1.0,
        top_k=0,
        max_completion_length=o.max_new_tokens,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        gradient_checkpointing=False,
        disable_dropout=True,
        shuffle_dataset=True,
    )
    common = dict(model=student, args=args, train_dataset=data, processing_class=tokenizer, callbacks=callbacks or [])
    trainer = guard_finite(
        served_teacher_trainer(client, **common) if client else DistillationTrainer(teacher_model=teacher, **common),
        "on_policy",
    )
    result = run_trainer(trainer, "on_policy")
    tokenizer.padding_side = "right"  # as the student was: a saved tokenizer pads as training does
    figures.update(
        finish(
            trainer,
            result,
            tokenizer,
            output_dir,
            trainable_count(trainer.model),
            len(prompts),
            params,
            start,
            manifest={
                "base": model_path,
                "method": "on_policy",
                "on_policy": {**o.model_dump(), "vllm": use_vllm},
                **({"teacher_server": {"model": client.model, "requests": client.requests}} if client else {}),
            },
            where="on_policy",
            trust_remote_code=trust_remote_code,
        )
    )
    return with_totals(figures)


def feature(
    model_path: str,
    teacher_path: str,
    rows: list[dict],
    output_dir: Path,
    params: SFTParams,
    kd,
    feat,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
    chat: bool = False,
) -> dict:
    """Hidden-state distillation (distillery.feature): the student's chosen layers, projected to the teacher's
    width, match the live frozen teacher's on the kept traces, mixed with logit KD on the full distribution."""
    from transformers import TrainingArguments

    from distillery.feature import build_examples, make_trainer

    tokenizer = student_tokenizer(model_path, teacher_path, "feature", trust_remote_code, params.pad_token)
    if chat:  # the student's own template, as SFT renders a conversation
        check_template_keeps_turn(tokenizer, where=f"feature: student tokenizer {model_path}")
        records = [
            {
                "prompt": tokenizer.apply_chat_template(
                    [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False
                ),
                "completion": assistant_turn(r),
            }
            for r in rows
        ]
    else:
        records = training_records(rows, chat=False)
    if params.lora:
        raise ValueError("train.method feature: full fine-tuning only for now (train.lora is set)")
    examples = build_examples(records, tokenizer, params.max_length)
    teacher = frozen_teacher(teacher_path, params, trust_remote_code)
    model = load_student(model_path, params, trust_remote_code)
    args = TrainingArguments(**common_args(params, output_dir))
    trainer = guard_finite(
        make_trainer(model, teacher, tokenizer, examples, args, kd, feat, callbacks),
        "feature",
    )
    result = run_trainer(trainer, "feature")
    return finish(
        trainer,
        result,
        tokenizer,
        output_dir,
        trainable_count(model),
        len(examples),
        params,
        model_path,
        manifest={
            "base": model_path,
            "method": "feature",
            "kd": kd.model_dump(),
            "feature": {
                **feat.model_dump(),
                "pairs": trainer.feature_pairs,
                "widths": [model.config.hidden_size, teacher.config.hidden_size],
            },
        },
        where="feature",
        trust_remote_code=trust_remote_code,
    )


def cross_tokenizer(
    model_path: str,
    teacher_path: str,
    rows: list[dict],
    output_dir: Path,
    params: SFTParams,
    c,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
    chat: bool = False,
) -> dict:
    """Teacher and student on different tokenizers, with TRL's GOLDTrainer: each trace is tokenized by both, the
    teacher's distributions are aligned to the student's tokens (merging the probabilities of split tokens), and
    the loss is ULD's distance between sorted probabilities, exact (JSD) on the tokens both vocabularies share when
    `c.hybrid`; plus cross-entropy on the student's tokens. The vocabulary check is the one other methods refuse
    on, inverted: the same vocabulary is refused here (logit_kd or on_policy are exact then)."""
    from transformers import AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    from distillery.checks import DistillationCheckError

    tokenizer = student_tokenizer(model_path, None, "cross_tokenizer", trust_remote_code, params.pad_token)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    if teacher_tok.get_vocab() == tokenizer.get_vocab():
        raise DistillationCheckError(
            "cross_tokenizer: teacher and student share one vocabulary; use logit_kd, on_policy or gkd, whose "
            "divergence is exact there"
        )
    if tokenizer.chat_template is None or teacher_tok.chat_template is None:
        raise ValueError("cross_tokenizer: TRL's GOLD renders conversations; both tokenizers need a chat template")
    check_template_keeps_turn(tokenizer, where=f"cross_tokenizer: student tokenizer {model_path}")
    teacher = frozen_teacher(teacher_path, params, trust_remote_code)
    student = load_student(model_path, params, trust_remote_code)
    data = conversations(rows, chat)
    base = common_args(params, output_dir)
    if c.max_steps is not None:
        base["max_steps"] = c.max_steps
    args = GOLDConfig(
        **base,
        max_length=params.max_length,
        lmbda=c.lmbda,
        beta=c.beta,
        temperature=c.temperature,
        max_completion_length=c.max_new_tokens,
        use_uld_loss=True,
        uld_use_hybrid_loss=c.hybrid,
        uld_crossentropy_weight=c.ce_weight,
        uld_student_temperature=c.temperature,
        uld_teacher_temperature=c.temperature,
        teacher_tokenizer_name_or_path=teacher_path,
        disable_dropout=True,
    )
    trainer = guard_finite(
        GOLDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=callbacks or [],
        ),
        "cross_tokenizer",
    )
    result = run_trainer(trainer, "cross_tokenizer")
    return finish(
        trainer,
        result,
        tokenizer,
        output_dir,
        trainable_count(trainer.model),
        len(rows),
        params,
        model_path,
        manifest={
            "base": model_path,
            "method": "cross_tokenizer",
            "cross_tokenizer": c.model_dump(),
            "vocab": {"student": len(tokenizer), "teacher": len(teacher_tok)},
        },
        where="cross_tokenizer",
        trust_remote_code=trust_remote_code,
    )


def served_teacher_trainer(client, **kwargs):
    """TRL's ServerDistillationTrainer with `client` (distillery.teacher_server) in place of the VLLMClient its
    __init__ builds, which sends no API key and sets no timeout: its __init__ is that of DistillationTrainer (no
    local teacher) plus the three settings it stores, as TRL 1.16 has it."""
    from trl import DistillationTrainer
    from trl.experimental.server_distillation import ServerDistillationTrainer

    class ServedTeacherTrainer(ServerDistillationTrainer):
        def __init__(self, **kw):
            DistillationTrainer.__init__(self, teacher_model=None, **kw)
            a = kw["args"]
            self.reverse_kl_top_1_mode, self.loss_top_k, self.loss_add_tail = (
                a.reverse_kl_top_1_mode,
                a.loss_top_k,
                a.loss_add_tail,
            )
            self.teacher_client = client

    return ServedTeacherTrainer(**kwargs)


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
        start, figures = sft_phase(model_path, rows, output_dir, params, callbacks, trust_remote_code, chat, "dpo")
    tokenizer = student_tokenizer(
        start, None, "dpo", trust_remote_code, params.pad_token
    )  # the teacher judges text, not ids
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
    result = run_trainer(trainer, "dpo")
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
    return with_totals(figures)


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
        gen_dir = generated_dir(Path(traces), generated)
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
            chat,
        )
    if t.method == "gkd":
        return gkd(student, teacher, rows, out, params, t.gkd, callbacks, trust, chat)
    if t.method == "on_policy":
        return on_policy(student, teacher, rows, out, params, t.on_policy, callbacks, trust, chat)
    if t.method == "cross_tokenizer":
        return cross_tokenizer(student, teacher, rows, out, params, t.cross_tokenizer, callbacks, trust, chat)
    if t.method == "feature":
        return feature(student, teacher, rows, out, params, t.kd, t.feature, callbacks, trust, chat)
    if t.method == "dpo":
        from distillery.verify import VERIFIERS

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


def generated_dir(traces: Path, generated: str | None) -> Path:
    """The generate stage's folder, which holds the teacher's logprobs: given, or the one the filter's manifest
    names as its source (kept traces given alone, as `distillery train --traces .../filter/kept.jsonl`), or the
    traces' own folder (generated traces given directly)."""
    if generated:
        return Path(generated).parent
    manifest = traces.parent / "manifest.json"
    source = json.loads(manifest.read_text()).get("source") if manifest.is_file() else None
    if source and Path(source).parent.joinpath("logprobs.parquet").is_file():
        return Path(source).parent
    return traces.parent


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
        checkpoint_every=cfg.checkpoint.every_steps,
        keep_checkpoints=cfg.checkpoint.keep,
        pad_token=cfg.student.pad_token,
    )
