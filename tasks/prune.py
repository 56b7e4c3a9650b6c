"""prune: structured pruning by measured importance, then a short healing distillation.

    distillery run demo --set prune.drop_layers=2 --set prune.width.intermediate_size=128

- depth: layer i's importance is the mean over real tokens of 1 - cos(h_in, h_out) on calibration traces
  (ShortGPT's "block influence"; Minitron uses the same signal for depth); the least important layers go.
- width (Minitron's activation importance): an MLP neuron's importance is its mean |activation| into
  down_proj; a query head's is the mean L2 norm of its output into o_proj. Every layer keeps the same number of
  neurons and heads (HF configs have one size for all layers). Grouped-query attention keeps or drops whole KV
  groups, ranked by the summed importance of their query heads, so the query/KV ratio is unchanged.
- heal: the unpruned model is the teacher; its full logits are distilled into the pruned model (forward KL at
  temperature T, T² scaled) on the kept traces. The unhealed model is saved too, so both are evaluated.
The saved models are plain HF checkpoints whose config matches their shapes (`num_hidden_layers`,
`intermediate_size`, `num_attention_heads`, `num_key_value_heads`, explicit `head_dim`): they load with
`from_pretrained` and in vLLM. Works for decoders with Llama-style blocks at `model.model.layers`
(`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`: Llama, Qwen2, Mistral families).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, content_hash, read_jsonl, save_model, write_manifest
from distillery.config import HealConfig, Pipeline, PruneConfig
from distillery.results import ModelArtifact, Traces
from distillery.runtime import RunContext


def decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"prune: {type(model).__name__} keeps no decoder blocks at model.model.layers")
    return inner, layers


def layer_importance(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 16) -> list[float]:
    import torch

    _, layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask_holder: dict = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[i] += ((1 - cos) * mask_holder["m"]).sum().double()

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for enc, mask in _masked_batches(model, tokenizer, texts, max_length, batch_size):
            mask_holder["m"] = mask
            count += int(mask.sum())
            with torch.no_grad():
                model(**enc)
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()


def drop_layers(model, drop: list[int]) -> None:
    """Remove decoder blocks in place and keep config and KV-cache indices consistent."""
    import torch

    inner, layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    inner.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(inner.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)


def _masked_batches(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 16):
    """Calibration batches on the model's device, with the float mask of real tokens."""
    for b in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[b : b + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
        ).to(model.device)
        yield enc, enc["attention_mask"].float()


def width_importance(model, tokenizer, texts: list[str], max_length: int) -> tuple[list, list]:
    """Per layer: mean |activation| of each MLP neuron (into down_proj) and mean L2 norm of each query head's
    output (into o_proj), over real tokens."""
    import torch

    _, layers = decoder_layers(model)
    head_dim = _head_dim(model.config)
    mlp = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    heads = [torch.zeros(layer.self_attn.o_proj.in_features // head_dim, dtype=torch.float64) for layer in layers]
    state: dict = {"count": 0}

    def on_down(i):
        def fn(module, args):
            m = state["mask"][..., None]
            mlp[i] += (args[0].float().abs() * m).sum((0, 1)).double().cpu()

        return fn

    def on_o(i):
        def fn(module, args):
            x = args[0].float()
            norms = x.view(*x.shape[:-1], -1, head_dim).norm(dim=-1)  # [B, T, heads]
            heads[i] += (norms * state["mask"][..., None]).sum((0, 1)).double().cpu()

        return fn

    handles = [
        h
        for i, layer in enumerate(layers)
        for h in (
            layer.mlp.down_proj.register_forward_pre_hook(on_down(i)),
            layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)),
        )
    ]
    try:
        model.eval()
        for enc, mask in _masked_batches(model, tokenizer, texts, max_length):
            state["mask"] = mask
            state["count"] += int(mask.sum())
            with torch.no_grad():
                model(**enc)
    finally:
        for h in handles:
            h.remove()
    n = max(state["count"], 1)
    return [(m / n).tolist() for m in mlp], [(h / n).tolist() for h in heads]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _linear(weight, bias=None):
    import torch

    out = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _rows(linear, idx):
    return _linear(linear.weight[idx], None if linear.bias is None else linear.bias[idx])


def _cols(linear, idx):
    return _linear(linear.weight[:, idx], linear.bias)


def prune_width(
    model, mlp_importance: list, head_importance: list, intermediate_size: int | None, num_heads: int | None
) -> dict:
    """Keep the `intermediate_size` most important MLP neurons and `num_heads` query heads (whole KV groups) in
    every layer, in place; the config is updated to the new shapes. Returns what was kept per layer."""
    import torch

    cfg = model.config
    _, layers = decoder_layers(model)
    head_dim, n_heads = _head_dim(cfg), cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    group = n_heads // n_kv
    if intermediate_size is not None and intermediate_size > cfg.intermediate_size:
        raise ValueError(
            f"prune.width.intermediate_size: {intermediate_size} is above the model's {cfg.intermediate_size}"
        )
    if num_heads is not None and (num_heads > n_heads or num_heads % group):
        raise ValueError(
            f"prune.width.num_attention_heads: {num_heads} must be at most {n_heads} and a multiple of "
            f"{group} (query heads per KV group: {n_heads} heads, {n_kv} KV heads)"
        )
    kept: dict = {"mlp": [], "kv_groups": []}
    for i, layer in enumerate(layers):
        if intermediate_size is not None:
            idx = torch.tensor(sorted(torch.tensor(mlp_importance[i]).topk(intermediate_size).indices.tolist()))
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, idx), _rows(mlp.up_proj, idx)
            mlp.down_proj = _cols(mlp.down_proj, idx)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = intermediate_size
            kept["mlp"].append(idx.tolist())
        if num_heads is not None:
            scores = torch.tensor(head_importance[i]).view(n_kv, group).sum(-1)
            groups = sorted(scores.topk(num_heads // group).indices.tolist())
            q_heads = [g * group + j for g in groups for j in range(group)]
            q_idx = torch.tensor([h * head_dim + d for h in q_heads for d in range(head_dim)])
            kv_idx = torch.tensor([g * head_dim + d for g in groups for d in range(head_dim)])
            attn = layer.self_attn
            attn.q_proj, attn.o_proj = _rows(attn.q_proj, q_idx), _cols(attn.o_proj, q_idx)
            attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv_idx), _rows(attn.v_proj, kv_idx)
            for name, value in (("num_heads", num_heads), ("num_key_value_heads", len(groups))):
                if hasattr(attn, name):
                    setattr(attn, name, value)
            kept["kv_groups"].append(groups)
    if intermediate_size is not None:
        cfg.intermediate_size = intermediate_size
    if num_heads is not None:
        cfg.head_dim = head_dim  # no longer hidden_size // num_attention_heads
        cfg.num_attention_heads, cfg.num_key_value_heads = num_heads, num_heads // group
    return kept


def heal(
    pruned,
    teacher,
    tokenizer,
    texts: list[str],
    h: HealConfig,
    out_dir: Path,
    bf16: bool = False,
    callbacks: list | None = None,
    checkpoint=None,
) -> dict:
    """Distil the unpruned model's full next-token distribution into the pruned one (forward KL, T² scaled) on
    `texts`, every real token counted. Returns the trainer's loss history and figures."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from distillery.checks import check_teacher_frozen
    from distillery.losses import full_kd
    from distillery.training import SFTParams, common_args, guard_finite, run_trainer, with_checkpoints

    teacher.eval().requires_grad_(False)
    check_teacher_frozen(teacher, where="heal: unpruned teacher")

    class HealTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            with torch.no_grad():
                t_logits = teacher(**inputs).logits
            loss = full_kd(out.logits[:, :-1], t_logits[:, :-1], h.temperature, labels=labels[:, 1:])
            return (loss, out) if return_outputs else loss

    enc = tokenizer(texts, truncation=True, max_length=h.max_length, add_special_tokens=False)
    data = Dataset.from_dict({"input_ids": enc["input_ids"]})
    params = with_checkpoints(
        SFTParams(
            epochs=h.epochs,
            max_steps=h.max_steps,
            learning_rate=h.learning_rate,
            batch_size=h.batch_size,
            max_length=h.max_length,
            bf16=bf16,
            logging_steps=10,
        ),
        checkpoint,
    )
    args = TrainingArguments(**common_args(params, out_dir), remove_unused_columns=False)
    trainer = guard_finite(
        HealTrainer(
            model=pruned,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=callbacks or [],
        ),
        "heal",
    )
    result = run_trainer(trainer, "prune.heal")
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    return {
        "heal_steps": trainer.state.global_step,
        "heal_seconds": float(result.metrics["train_runtime"]),
        "heal_loss_first": losses[0] if losses else float("nan"),
        "heal_loss_last": losses[-1] if losses else float("nan"),
        "heal_history": trainer.state.log_history,
    }


def save_checked(model, tok, out_dir: Path, manifest: dict) -> None:
    """Atomically, then reloaded with plain from_pretrained and checked to give the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with atomic_dir(out_dir) as tmp:
        save_model(model, tok, tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype)
        with torch.no_grad():
            diff = float((model(input_ids=probe).logits - reloaded(input_ids=probe).logits).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"prune: the saved model does not reload to the pruned one (max logit diff {diff:.3g})")
        write_manifest(tmp, manifest)


def prune(
    model_path: str,
    texts: list[str],
    cfg: PruneConfig,
    out_dir: Path,
    trust_remote_code: bool = False,
    unhealed_dir: Path | None = None,
    bf16: bool = False,
    callbacks: list | None = None,
    checkpoint=None,
) -> dict:
    """Depth and/or width pruning of `model_path` into `out_dir`; with `cfg.heal`, the unhealed model goes to
    `unhealed_dir` and the healed one to `out_dir`. `checkpoint` (CheckpointConfig): the healing's checkpoints."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise ValueError("prune: no calibration texts")
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    original = copy.deepcopy(model) if cfg.heal else None
    n_layers = model.config.num_hidden_layers
    if cfg.drop_layers >= n_layers:
        raise ValueError(f"prune.drop_layers: {cfg.drop_layers} would leave no layers of {n_layers}")
    params_before = model.num_parameters()
    calib = texts[: cfg.calibration_samples]
    importance, drop, kept = [], [], {}
    if cfg.drop_layers:
        importance = layer_importance(model, tok, calib, cfg.max_length)
        drop = sorted(sorted(range(n_layers), key=lambda i: importance[i])[: cfg.drop_layers])
        drop_layers(model, drop)
    shape_before = {k: getattr(model.config, k) for k in ("intermediate_size", "num_attention_heads")}
    if cfg.width:
        mlp_imp, head_imp = width_importance(model, tok, calib, cfg.max_length)  # measured after the depth cut
        kept = prune_width(model, mlp_imp, head_imp, cfg.width.intermediate_size, cfg.width.num_attention_heads)
    c = model.config
    figures = {
        "layers_before": n_layers,
        "layers_after": c.num_hidden_layers,
        "intermediate_before": shape_before["intermediate_size"],
        "intermediate_after": c.intermediate_size,
        "heads_before": shape_before["num_attention_heads"],
        "heads_after": c.num_attention_heads,
        "params_before": params_before,
        "params_after": model.num_parameters(),
        "param_ratio": model.num_parameters() / params_before,
    }
    manifest = {
        "kind": "model",
        "base": model_path,
        "importance": importance,
        "dropped": drop,
        "width_kept": kept,
        "figures": figures,
    }
    result = {"path": str(out_dir), "importance": importance, "dropped": drop, "figures": figures}
    if cfg.heal:
        unhealed_dir = unhealed_dir or out_dir.parent / f"{out_dir.name}-unhealed"
        save_checked(model, tok, unhealed_dir, {**manifest, "healed": False})
        heal_texts = texts[: cfg.heal.num_texts] if cfg.heal.num_texts else texts
        healed = heal(model, original, tok, heal_texts, cfg.heal, out_dir, bf16, callbacks, checkpoint)
        figures.update({k: v for k, v in healed.items() if k != "heal_history"})
        manifest.update(healed=True, heal=cfg.heal.model_dump(), loss_history=healed["heal_history"])
        result["unhealed_path"] = str(unhealed_dir)
        del original
    save_checked(model, tok, out_dir, manifest)
    if cfg.heal:  # the healed model is saved: its checkpoints are spent
        import shutil

        from distillery.training import trainer_dir

        shutil.rmtree(trainer_dir(out_dir), ignore_errors=True)
    return result


@task(name="prune", cache_policy=NO_CACHE, log_prints=False)  # datasets prints bytecode when hashing
def prune_task(cfg: Pipeline, ctx: RunContext, student: ModelArtifact, traces: Traces | None) -> list[ModelArtifact]:
    """The pruned (and healed) student, last; before it the unhealed one when it is kept for comparison. Calibrated
    on the kept `traces`, or on the prompts when the pipeline has none."""
    with ctx.tracker().stage("prune", ctx.parent_run_id) as run:
        run.log_params(cfg.prune.model_dump())
        rows = read_jsonl(Path(traces.path)) if traces else []
        texts = [r.get("prompt_text", r["prompt"]) + r["completion"] for r in rows]
        if not texts:  # no traces in this pipeline: calibrate on the prompts alone
            from distillery.data import load_prompts

            texts = [p["prompt"] for p in load_prompts(cfg.data)]
        from distillery.training import mlflow_callback

        result = prune(
            student.path,
            texts,
            cfg.prune,
            ctx.stage_dir("prune"),
            cfg.student.trust_remote_code,
            unhealed_dir=ctx.stage_dir("prune-unhealed"),
            bf16=cfg.train.bf16,
            callbacks=[mlflow_callback(run)],
            checkpoint=cfg.checkpoint,
        )
        run.log_metrics(result["figures"])
        run.log_metrics({f"importance.layer_{i}": v for i, v in enumerate(result["importance"])})
        run.log_dict({"importance": result["importance"], "dropped": result["dropped"]}, "layer_importance.json")
        if cfg.log_models:
            run.log_artifact(result["path"], "model")
            if "unhealed_path" in result:
                run.log_artifact(result["unhealed_path"], "model-unhealed")
    figures, made = result["figures"], []
    if "unhealed_path" in result:  # evaluated beside the healed one: what healing bought
        path = result["unhealed_path"]
        made.append(
            ModelArtifact(
                label="student-pruned-unhealed",
                path=path,
                stage="prune-unhealed",
                run_id=run.run_id,
                params=figures["params_after"],
                figures=figures,
                content_hash=content_hash(path),
                artifact="model-unhealed",
            )
        )
    made.append(
        ModelArtifact(
            label="student-pruned",
            path=result["path"],
            stage="prune",
            run_id=run.run_id,
            params=figures["params_after"],
            figures=figures,
            content_hash=content_hash(result["path"]),
        )
    )
    return made
