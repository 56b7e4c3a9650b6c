"""Prompts for the teacher: the demo task, a local jsonl file, or a hub dataset, as {id, prompt, answer}."""

from __future__ import annotations

import hashlib
from pathlib import Path

from distillery.artifacts import read_jsonl
from distillery.config import DataConfig

REPO = Path(__file__).resolve().parents[1]
DEMO_EVAL_FILE = REPO / "evals" / "demo_arith" / "test.jsonl"


def load_prompts(cfg: DataConfig) -> list[dict]:
    if cfg.source == "demo":
        from distillery.demo import task

        # Train prompts never repeat an eval question: the eval split is excluded by text.
        held_out = {r["question"] for r in read_jsonl(DEMO_EVAL_FILE)}
        rows = [
            {"prompt": p.question, "answer": str(p.answer)}
            for p in task.problems(seed=10_000 + cfg.seed, count=cfg.num_prompts or 500, exclude=held_out)
        ]
    elif cfg.source == "jsonl":
        raw = read_jsonl(Path(cfg.path))
        rows = [_pick(r, cfg, f"{cfg.path} line {i + 1}") for i, r in enumerate(raw)]
    else:
        try:
            from datasets import load_dataset
        except ImportError as e:  # pragma: no cover - datasets is a core dependency
            raise ImportError("data.source=hub needs `datasets`: pip install datasets") from e
        ds = load_dataset(cfg.path, cfg.config_name, split=cfg.split)
        rows = [_pick(r, cfg, f"{cfg.path}[{i}]") for i, r in enumerate(ds)]
    if cfg.num_prompts:
        rows = rows[: cfg.num_prompts]
    for row in rows:
        row["prompt"] = cfg.prompt_template.format(prompt=row["prompt"])
        row["id"] = hashlib.sha1(row["prompt"].encode()).hexdigest()[:16]
    return rows


def _pick(record: dict, cfg: DataConfig, where: str) -> dict:
    for field in (cfg.prompt_field, cfg.answer_field):
        if field not in record:
            raise KeyError(f"{where}: no field {field!r} (data.prompt_field / data.answer_field)")
    return {"prompt": str(record[cfg.prompt_field]), "answer": str(record[cfg.answer_field])}


_PROBE = "DISTILLERY_PROBE_7f3a"


def template_prefill(tokenizer) -> str:
    """What the chat template's generation prompt already puts inside the assistant turn: `<think>\\n` for
    DeepSeek-R1-Distill, nothing for Qwen2.5. The teacher's completion continues it, so a trace re-rendered in
    another model's template must carry it, or the student learns reasoning that never opens its `<think>`."""
    user = [{"role": "user", "content": _PROBE}]
    gen = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _PROBE}], tokenize=False)
    head = full[: full.rindex(_PROBE)]  # the conversation up to where the assistant's content starts
    return gen[len(head) :] if gen.startswith(head) else ""


def render_prompt(tokenizer, prompt: str, cfg: DataConfig) -> str:
    """The exact text the teacher sees: the chat template when the pipeline asks for it, else the prompt."""
    if not cfg.chat_template:
        return prompt
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
