"""prune: structured depth pruning: drop the decoder layers that change their input the least.

    distillery run demo --set prune.drop_layers=2

Importance of layer i is the mean over real tokens of 1 - cos(h_in, h_out) on calibration traces (ShortGPT's
"block influence"; Minitron uses the same signal for depth). The saved model is a plain HF checkpoint with
`num_hidden_layers` reduced, so it loads with `from_pretrained` and in vLLM. Works for decoder models that
keep their blocks in `model.model.layers` (Llama, Qwen2, Mistral, Gemma families).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, read_jsonl, write_manifest
from distillery.config import Pipeline, PruneConfig
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
        for b in range(0, len(texts), batch_size):
            enc = tokenizer(texts[b : b + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=False).to(model.device)
            mask_holder["m"] = enc["attention_mask"].float()
            count += int(enc["attention_mask"].sum())
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


def prune(model_path: str, texts: list[str], cfg: PruneConfig, out_dir: Path, trust_remote_code: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise ValueError("prune: no calibration texts")
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    n_layers = model.config.num_hidden_layers
    if cfg.drop_layers >= n_layers:
        raise ValueError(f"prune.drop_layers: {cfg.drop_layers} would leave no layers of {n_layers}")
    params_before = sum(p.numel() for p in model.parameters())
    importance = layer_importance(model, tok, texts[: cfg.calibration_samples], cfg.max_length)
    drop = sorted(sorted(range(n_layers), key=lambda i: importance[i])[: cfg.drop_layers])
    drop_layers(model, drop)
    params_after = sum(p.numel() for p in model.parameters())
    figures = {"layers_before": n_layers, "layers_after": model.config.num_hidden_layers,
               "params_before": params_before, "params_after": params_after,
               "param_ratio": params_after / params_before}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_manifest(tmp, {"kind": "model", "base": model_path, "importance": importance, "dropped": drop,
                             "figures": figures})
    return {"path": str(out_dir), "importance": importance, "dropped": drop, "figures": figures}


@task(name="prune", cache_policy=NO_CACHE)
def prune_task(cfg: Pipeline, ctx: RunContext, student: str, traces: str | None) -> dict:
    with ctx.tracker().stage("prune", ctx.parent_run_id) as run:
        run.log_params(cfg.prune.model_dump())
        rows = read_jsonl(Path(traces)) if traces else []
        texts = [r.get("prompt_text", r["prompt"]) + r["completion"] for r in rows]
        if not texts:  # no traces in this pipeline: calibrate on the prompts alone
            from distillery.data import load_prompts

            texts = [p["prompt"] for p in load_prompts(cfg.data)]
        result = prune(student, texts, cfg.prune, ctx.stage_dir("prune"), cfg.student.trust_remote_code)
        run.log_metrics(result["figures"])
        run.log_metrics({f"importance.layer_{i}": v for i, v in enumerate(result["importance"])})
        run.log_dict({"importance": result["importance"], "dropped": result["dropped"]}, "layer_importance.json")
        if cfg.log_models:
            run.log_artifact(result["path"], "model")
    return {**result, "run_id": run.run_id}
