"""Structured pruning, generic over Llama-style decoders: width (MLP neurons, attention heads by KV group), depth,
and healing by distillation from the unpruned model."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.config import HealConfig, PruneConfig
from tasks.prune import prune, prune_width, width_importance

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),  # q/k/v biases
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def tiny(family: str, tokenizer, seed: int = 0):
    """A 2-layer decoder of `family` with grouped-query attention: 4 query heads in 2 KV groups."""
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    cfg = cfg_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def kill_units(model, dead_neurons: int, dead_group: int):
    """Make the last `dead_neurons` MLP neurons and KV group `dead_group` output exactly zero in every layer, so
    pruning exactly them must leave the logits unchanged."""
    hd = model.config.head_dim if getattr(model.config, "head_dim", None) else 16
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[-dead_neurons:] = 0  # silu(gate) * 0 = 0 into down_proj
            v = layer.self_attn.v_proj
            v.weight[dead_group * hd : (dead_group + 1) * hd] = 0
            if v.bias is not None:
                v.bias[dead_group * hd : (dead_group + 1) * hd] = 0


def texts(n=24, seed=7):
    from distillery.demo import task

    return [p.question + p.trace for p in task.problems(seed=seed, count=n)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_width_pruning_removes_exactly_the_dead_units(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(family, tokenizer)
    kill_units(model, dead_neurons=32, dead_group=1)
    probe = tokenizer(texts(4), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        before = model(**probe).logits
    mlp_imp, head_imp = width_importance(model, tokenizer, texts(), max_length=64)
    assert all(max(m[-32:]) == 0 and min(m[:-32]) > 0 for m in mlp_imp)
    assert all(h[2] == h[3] == 0 and min(h[:2]) > 0 for h in head_imp)  # group 1 = query heads 2, 3
    kept = prune_width(model, mlp_imp, head_imp, intermediate_size=64, num_heads=2)
    assert kept["kv_groups"] == [[0], [0]] and kept["mlp"][0] == list(range(64))
    with torch.no_grad():
        after = model(**probe).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        64,
        2,
        1,
        16,
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain from_pretrained, new shapes
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, before, atol=1e-5, rtol=1e-5)


def test_heads_must_come_in_whole_kv_groups(tokenizer):
    model = tiny("llama", tokenizer)
    mlp_imp, head_imp = width_importance(model, tokenizer, texts(4), max_length=32)
    with pytest.raises(ValueError, match=r"num_attention_heads: 3 must be at most 4 and a multiple of 2"):
        prune_width(model, mlp_imp, head_imp, intermediate_size=None, num_heads=3)
    with pytest.raises(ValueError, match="intermediate_size: 200 is above"):
        prune_width(model, mlp_imp, head_imp, intermediate_size=200, num_heads=None)


def test_prune_config_needs_something_to_prune():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="nothing to prune"):
        PruneConfig(drop_layers=0)
    with pytest.raises(ValidationError, match="set intermediate_size and/or num_attention_heads"):
        PruneConfig(width={})


def held_out_kl(student, teacher, tokenizer) -> float:
    from distillery.losses import full_kd

    enc = tokenizer(texts(16, seed=8), return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(full_kd(student(**enc).logits[:, :-1], teacher(**enc).logits[:, :-1], labels=labels[:, 1:]))


def test_depth_and_width_pruned_teacher_is_healed_by_distillation(tokenizer, tmp_path):
    """The demo teacher loses a layer and half its MLP; healing (KD from the unpruned teacher) brings the pruned
    model's distribution back towards the original on held-out traces. Both models are saved and reload."""
    from transformers import AutoModelForCausalLM

    from distillery.demo.assets import TEACHER_DIR

    cfg = PruneConfig(
        drop_layers=1,
        width={"intermediate_size": 256},
        calibration_samples=16,
        max_length=96,
        heal=HealConfig(max_steps=24, batch_size=16, learning_rate=2e-3, max_length=96),
    )
    res = prune(str(TEACHER_DIR), texts(192), cfg, tmp_path / "healed", unhealed_dir=tmp_path / "unhealed")
    f = res["figures"]
    assert (f["layers_after"], f["intermediate_after"], f["heads_after"]) == (3, 256, f["heads_before"])
    assert f["heal_steps"] == 24 and f["params_after"] < 0.7 * f["params_before"]
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER_DIR).eval()
    unhealed = AutoModelForCausalLM.from_pretrained(tmp_path / "unhealed").eval()
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    assert healed.config.use_cache and healed.config.num_hidden_layers == 3
    before, after = held_out_kl(unhealed, teacher, tokenizer), held_out_kl(healed, teacher, tokenizer)
    assert after < 0.85 * before, (before, after)
    manifest = json.loads((tmp_path / "healed" / "manifest.json").read_text())
    assert manifest["healed"] and manifest["dropped"] and len(manifest["width_kept"]["mlp"]) == 3
