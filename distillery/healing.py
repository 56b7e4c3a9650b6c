"""Quantization-aware healing: LoRA adapters on the NF4 student learn the full-precision student's distribution.

NF4 rounds every weight; the adapters (bf16/fp32, a few percent of the parameters) learn the difference back from
the model it was quantized from, by forward KL on its full next-token distribution at the kept traces' completion
tokens (distillery.feature's trainer, no feature term). The NF4 weights stay as they are: the result is the NF4
folder plus an adapter folder (PEFT) whose base is that NF4 folder, loaded with `load_healed` or by transformers'
own adapter loading, at NF4's memory plus the adapters'.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER = "adapter_config.json"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER).is_file()


def base_of(path: str | Path) -> Path:
    """The base model folder an adapter folder names (absolute, or relative to the adapter folder)."""
    base = Path(json.loads((Path(path) / ADAPTER).read_text())["base_model_name_or_path"])
    return base if base.is_absolute() else (Path(path) / base).resolve()


def load_healed(path: str | Path, trust_remote_code: bool = False):
    """The NF4 base with its healing adapters, ready for inference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_of(path),
        device_map="auto" if torch.cuda.is_available() else "cpu",
        trust_remote_code=trust_remote_code,
    )
    return PeftModel.from_pretrained(base, str(path)).eval()


def heal(
    nf4_dir: str,
    full_path: str,
    records: list[dict],
    out_dir: Path,
    h,
    trust_remote_code: bool = False,
    callbacks: list | None = None,
) -> dict:
    """Train healing adapters on `nf4_dir` from `full_path` over prompt/completion `records`; save the adapter
    folder (its base: nf4_dir) to `out_dir`. Returns the figures."""
    import time

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from distillery.artifacts import atomic_dir, write_manifest
    from distillery.checks import check_teacher_frozen
    from distillery.config import FeatureSection, KDConfig
    from distillery.feature import build_examples, make_trainer

    tokenizer = AutoTokenizer.from_pretrained(nf4_dir, trust_remote_code=trust_remote_code)
    cuda = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(
        nf4_dir, device_map="auto" if cuda else "cpu", trust_remote_code=trust_remote_code
    )
    if getattr(base.config, "quantization_config", None) is None:
        raise ValueError(f"quantize.heal: {nf4_dir} is not a quantized model")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(
        base, LoraConfig(r=h.lora_r, lora_alpha=h.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    teacher = AutoModelForCausalLM.from_pretrained(full_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    teacher.to(model.device).eval().requires_grad_(False)
    check_teacher_frozen(teacher, where=f"quantize.heal: full-precision student {full_path}")
    examples = build_examples(records, tokenizer, h.max_length)
    with atomic_dir(out_dir) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / "trainer"),
            max_steps=h.steps,
            per_device_train_batch_size=h.batch_size,
            learning_rate=h.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,  # a fraction of the steps (transformers 5 folded warmup_ratio into warmup_steps)
            logging_steps=max(1, h.steps // 20),
            save_strategy="no",
            report_to=[],
            seed=h.seed,
            use_cpu=not cuda,
            disable_tqdm=False,  # a progress bar (transformers prints every log line when it is off)
            logging_nan_inf_filter=False,
        )
        kd = KDConfig(temperature=h.temperature, alpha=1.0, divergence="forward_kl")
        trainer = make_trainer(model, teacher, tokenizer, examples, args, kd, FeatureSection(weight=0.0), callbacks)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_file = tmp / ADAPTER  # the base named relative to the adapter: the run folder can move
        adapter_cfg = json.loads(cfg_file.read_text())
        adapter_cfg["base_model_name_or_path"] = str(Path("..") / Path(nf4_dir).name)
        cfg_file.write_text(json.dumps(adapter_cfg, indent=2))
        import shutil

        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        adapter_bytes = sum(f.stat().st_size for f in tmp.glob("adapter_model.safetensors"))
        figures = {
            "heal_steps": int(result.global_step),
            "heal_first_kd": losses[0] if losses else float("nan"),
            "heal_final_kd": losses[-1] if losses else float("nan"),
            "heal_seconds": seconds,
            "adapter_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
            "adapter_bytes": adapter_bytes,
        }
        write_manifest(
            tmp,
            {"kind": "model", "format": "nf4-healed", "base": nf4_dir, "teacher": full_path, "figures": figures},
        )
    return {"path": str(out_dir), "figures": figures}
