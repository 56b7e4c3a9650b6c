"""EAGLE-3 draft heads (Li et al. 2025), trained on the teacher's hidden states with vLLM's `speculators` library.

The head is speculators' `Eagle3DraftModel` and its loss (KL to the teacher's full next-token distribution over
`ttt_steps` unrolled draft steps, "training-time test"); the loop is written here, because speculators' trainer is a
distributed GPU launcher that reads hidden states vLLM dumped to disk. Here the teacher (transformers) makes them on
the fly for each packed batch of its own samples:

- aux features: the teacher's hidden states entering layers `target_layers` (vLLM's numbering: id i is what layer
  i reads, transformers' `hidden_states[i]`), concatenated;
- the target: the teacher's last hidden state *before* its final norm (the head applies the teacher's norm and
  lm_head to it), so its distribution is exactly the teacher's logits;
- alignment (speculators' `shift_batch`): at position t the head reads feature t-1 and token t and learns the
  teacher's distribution at t; only completion tokens carry loss.

The saved folder is speculators' format (config `speculators_model_type: eagle3`, safetensors), which vLLM loads
with `speculative_config={"method": "eagle3", "model": <folder>}`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

INSTALL = (
    "draft.kind eagle3 needs vLLM's speculators library: `make install` (requirements/cpu.lock), or "
    "`pip install --no-deps speculators==0.9.0 hs-connectors==0.9.0`"
)


def require_speculators() -> None:
    try:
        import speculators  # noqa: F401
    except ImportError as e:
        raise RuntimeError(INSTALL) from e


def layer_ids(num_layers: int, chosen: list[int] | None = None) -> list[int]:
    """The three teacher layers the head reads: `chosen`, else speculators' default [2, L/2, L-3] (EAGLE-3's low,
    middle and high features), or for a teacher under 6 layers three evenly spaced in [1, L-1]."""
    if chosen is not None:
        if max(chosen) >= num_layers:
            raise ValueError(f"draft.eagle3.target_layers: the teacher has {num_layers} layers (0..{num_layers - 1})")
        return list(chosen)
    if num_layers >= 6:
        return [2, num_layers // 2, num_layers - 3]
    if num_layers < 4:
        raise ValueError(f"draft.kind eagle3: the teacher has {num_layers} layers; EAGLE-3 reads three past the first")
    return [round(i * (num_layers - 1) / 3) for i in (1, 2, 3)]


def final_norm(model):
    """The teacher's final norm, whose input is the hidden state EAGLE-3 learns to predict from."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise ValueError(
            f"draft.kind eagle3: cannot find the final norm of {type(model).__name__} (expected `model.norm`)"
        )
    return norm


def teacher_features(model, input_ids, attention_mask, layers: list[int]):
    """(aux, last) for a padded batch: aux [B, T, 3H] the hidden states entering `layers`, last [B, T, H] the last
    hidden state before the final norm."""
    import torch

    captured = {}
    hook = final_norm(model).register_forward_pre_hook(lambda _m, args: captured.__setitem__("last", args[0]))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        hook.remove()
    aux = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
    return aux, captured["last"]


def tokenize_samples(tokenizer, samples: list[dict], max_tokens: int) -> list[dict]:
    """Token ids and loss masks of the teacher's samples: `prompt_text` as the engine tokenized it (special tokens
    added), the completion after it (loss on it only), and eos where the sample stopped on its own."""
    rows = []
    for s in samples:
        prompt = tokenizer(s["prompt_text"])["input_ids"]
        completion = tokenizer(s["completion"], add_special_tokens=False)["input_ids"]
        if s.get("finish_reason") == "stop" and tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_tokens]
        mask = ([0] * len(prompt) + [1] * len(completion))[:max_tokens]
        if sum(mask) and len(ids) > 2:
            rows.append({"input_ids": ids, "loss_mask": mask})
    if not rows:
        raise ValueError("draft.kind eagle3: no teacher sample with completion tokens to train on")
    return rows


def vocab_mapping(rows: list[dict], draft_vocab: int, vocab: int):
    """speculators' pruned draft vocabulary: the `draft_vocab` tokens the teacher emits most in its samples."""
    from collections import Counter

    from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution

    counts = Counter(t for r in rows for t, m in zip(r["input_ids"], r["loss_mask"], strict=True) if m)
    return build_vocab_mappings_from_distribution(dict(counts), draft_vocab, vocab)


def batches(rows: list[dict], tokens_per_step: int, rng: random.Random):
    """Endless packed batches: shuffled samples, as many as fit in `tokens_per_step` tokens (at least one)."""
    order: list[int] = []
    while True:
        batch, used = [], 0
        while True:
            if not order:
                order = list(range(len(rows)))
                rng.shuffle(order)
            n = len(rows[order[-1]]["input_ids"])
            if batch and used + n > tokens_per_step:
                break
            batch.append(rows[order.pop()])
            used += n
        yield batch


def packed(teacher, batch: list[dict], layers: list[int], device):
    """One packed sequence for the head: each sample's teacher features, shifted as speculators' `shift_batch`
    does (feature t-1 with token t, target t), positions from 1 per sample, document ids apart."""
    import torch
    from speculators.models.eagle3.data import shift_batch

    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    att = torch.zeros(len(batch), width, dtype=torch.long)
    for i, r in enumerate(batch):  # right-padded: every sample's positions start at 0, as the engine's do
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        att[i, : len(r["input_ids"])] = 1
    aux, last = teacher_features(teacher, ids.to(device), att.to(device), layers)
    parts = []
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        parts.append(
            shift_batch(
                {
                    "input_ids": ids[i, :n].to(device),
                    "hidden_states": aux[i, :n],
                    "verifier_last_hidden_states": last[i, :n],
                    "loss_mask": torch.tensor(r["loss_mask"], dtype=torch.bool, device=device),
                    "lengths": torch.tensor([n]),
                    "position_ids": torch.arange(n, device=device),
                }
            )
        )
    cat = {k: torch.cat([p[k] for p in parts]).unsqueeze(0) for k in parts[0] if k != "lengths"}
    cat["document_ids"] = torch.cat(
        [torch.full((len(p["input_ids"]),), j, dtype=torch.long, device=device) for j, p in enumerate(parts)]
    ).unsqueeze(0)
    return cat


def train_eagle3(
    teacher_path: str,
    samples: list[dict],
    out: Path,
    e,
    *,
    max_tokens: int = 512,
    trust_remote_code: bool = False,
    on_log=None,
) -> dict:
    """Train an EAGLE-3 head for `teacher_path` on its samples (rows with prompt_text, completion, finish_reason)
    and save it to `out` (speculators format, written whole or not at all). `e`: an Eagle3Config. `on_log(step,
    metrics)` receives the logged figures. Returns figures: steps, seconds, final loss and per-step accuracy."""
    require_speculators()
    import torch
    from speculators.losses import resolve_loss_config
    from speculators.models.eagle3 import Eagle3DraftModel
    from speculators.train.cli import create_transformer_layer_config
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from distillery.artifacts import atomic_dir, write_manifest
    from distillery.checks import check_teacher_frozen

    torch.manual_seed(e.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", config)
    layers = layer_ids(config.num_hidden_layers, e.target_layers)
    rows = tokenize_samples(tokenizer, samples, max_tokens)
    vocab = config.vocab_size
    draft_vocab = min(e.draft_vocab_size or vocab, vocab)
    d2t, t2d = vocab_mapping(rows, draft_vocab, vocab) if draft_vocab < vocab else (None, None)

    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_path,
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        trust_remote_code=trust_remote_code,
    ).to(device)
    teacher.eval().requires_grad_(False)
    check_teacher_frozen(teacher, where=f"teacher {teacher_path}")

    # speculators' own draft decoder config: a Llama layer of the teacher's width and attention shape (what vLLM's
    # EAGLE-3 serves), whatever the teacher's architecture (Qwen2 included)
    layer_config = create_transformer_layer_config(
        teacher_path, e.num_layers, "llama", None, None, list(range(e.num_layers)), trust_remote_code=trust_remote_code
    )
    head = Eagle3DraftModel.from_training_args(
        layer_config,
        t2d=t2d,
        d2t=d2t,
        draft_vocab_size=draft_vocab,
        norm_before_residual=True,
        ttt_steps=e.ttt_steps,
        verifier_name_or_path=teacher_path,
        target_layer_ids=layers,
        # flex attention needs a compiler on CPU; sdpa with a dense block mask is speculators' other path
        draft_attn_impl="simple_flex_attention" if device == "cuda" else "sdpa",
        trust_remote_code=trust_remote_code,
    ).to(device)
    head.train()
    trainable = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=e.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, e.steps // 20), e.steps)
    loss_config = resolve_loss_config(e.loss, "fused" if device == "cuda" else "eager")  # fused: Triton kernels
    stream = batches(rows, e.tokens_per_step, random.Random(e.seed))
    history: list[dict] = []
    window: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(1, e.steps + 1):
        batch = packed(teacher, next(stream), layers, device)
        _, loss, metrics = head(**batch, ttt_steps=e.ttt_steps, loss_config=loss_config)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"draft.eagle3: loss is {loss.item()} at step {step}; lower learning_rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        for k, v in metrics.items():
            window[k] = window.get(k, 0.0) + float(v)
        if step % e.logging_steps == 0 or step == e.steps:
            figures = {"step": step, "loss": window["loss_sum"] / window["loss_total"]}
            for i in range(e.ttt_steps):  # accuracy of draft position i+1 given all earlier ones were right
                total = window.get(f"cond_acc_{i}_total", 0.0)
                figures[f"accuracy_pos_{i + 1}"] = window.get(f"cond_acc_{i}_sum", 0.0) / total if total else 0.0
            history.append(figures)
            if on_log:
                on_log(step, figures)
            window = {}
    seconds = time.perf_counter() - start
    head.eval()
    with atomic_dir(out) as tmp:
        head.save_pretrained(tmp, safe_serialization=True)
        write_manifest(
            tmp,
            {
                "kind": "model",
                "role": "draft",
                "draft_kind": "eagle3",
                "teacher": teacher_path,
                "target_layers": layers,
                "draft_vocab_size": draft_vocab,
                "samples": len(rows),
                "eagle3": e.model_dump(),
                "loss_history": history,
            },
        )
    last = history[-1]
    return {
        "steps": e.steps,
        "train_seconds": seconds,
        "final_loss": last["loss"],  # finite: a non-finite step loss stops training
        "samples": len(rows),
        "trainable_params": sum(p.numel() for p in trainable),
        **{k: v for k, v in last.items() if k.startswith("accuracy_pos_")},
    }


def is_eagle3(folder: str | Path) -> bool:
    """Whether a folder holds an EAGLE-3 head in speculators' format (served with method eagle3)."""
    import json

    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    c = json.loads(config.read_text())
    return (
        c.get("speculators_model_type") == "eagle3" or (c.get("speculators_config") or {}).get("algorithm") == "eagle3"
    )
