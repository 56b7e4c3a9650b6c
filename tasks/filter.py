"""filter: keep the teacher traces a researcher would trust, and say what each rule dropped.

    distillery run demo --set filter.max_tokens=48

Rules, in order (a trace is counted against the first rule it fails): `truncated` (hit max_tokens),
`think_format` (exactly one well-formed, non-empty <think>…</think> before the answer), `length` (token
bounds), `answer` (final answer verified against the reference), `duplicate` (exact prompt+completion repeat).
Output: <run>/filter/kept.jsonl and report.json {rule: dropped, kept, kept per prompt}.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, atomic_write_text, read_jsonl, write_jsonl, write_manifest
from distillery.config import FilterConfig, Pipeline
from distillery.runtime import RunContext

RULES = ("truncated", "think_format", "length", "answer", "duplicate")
THINK = re.compile(r"^\s*<think>(?P<body>.*?)</think>(?P<after>.*)$", re.S)


def think_ok(text: str) -> bool:
    m = THINK.match(text)
    return bool(m and m["body"].strip() and "<think>" not in m["body"] and "</think>" not in m["after"]
                and m["after"].strip())


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def normalise(ans: str) -> str:
    s = ans.strip().strip("$").replace(",", "").replace(" ", "")
    try:
        f = float(s)
        return str(int(f)) if f.is_integer() else str(f)
    except ValueError:
        return s


def final_answer(text: str, cfg: FilterConfig) -> str | None:
    after = text.split("</think>")[-1]
    if cfg.verifier == "boxed":
        return extract_boxed(after)
    found = re.findall(cfg.answer_pattern, after)
    if not found:
        return None
    last = found[-1]
    return last[-1] if isinstance(last, tuple) else last


def verdict(row: dict, cfg: FilterConfig, seen: set) -> str | None:
    """The first rule `row` breaks, or None to keep it."""
    text = row["completion"]
    if row.get("prompt_text", "").rstrip().endswith("<think>"):  # the template prefilled the opening tag
        text = "<think>" + text
    if cfg.drop_truncated and row.get("finish_reason") == "length":
        return "truncated"
    if cfg.require_think and not think_ok(text):
        return "think_format"
    n = row.get("num_tokens", 0)
    if n < cfg.min_tokens or (cfg.max_tokens is not None and n > cfg.max_tokens):
        return "length"
    if cfg.verifier != "none":
        got = final_answer(text, cfg)
        if got is None or normalise(got) != normalise(str(row["answer"])):
            return "answer"
    if cfg.dedupe:
        key = (row["prompt"], row["completion"].strip())
        if key in seen:
            return "duplicate"
        seen.add(key)
    return None


def filter_traces(rows: list[dict], cfg: FilterConfig) -> tuple[list[dict], dict]:
    seen: set = set()
    dropped: Counter = Counter()
    kept: list[dict] = []
    per_prompt_total: Counter = Counter(r["prompt_id"] for r in rows)
    per_prompt_kept: Counter = Counter()
    for row in rows:
        rule = verdict(row, cfg, seen)
        if rule:
            dropped[rule] += 1
        else:
            kept.append(row)
            per_prompt_kept[row["prompt_id"]] += 1
    prompts = len(per_prompt_total)
    report = {
        "input": len(rows), "kept": len(kept), "dropped": {r: dropped.get(r, 0) for r in RULES},
        "keep_rate": len(kept) / len(rows) if rows else 0.0, "prompts": prompts,
        "prompts_with_a_kept_trace": len(per_prompt_kept),
        "kept_per_prompt_histogram": dict(sorted(Counter(per_prompt_kept.get(p, 0)
                                                          for p in per_prompt_total).items())),
    }
    return kept, report


def run_filter(cfg: Pipeline, traces: Path, out_dir: Path) -> dict:
    rows = read_jsonl(traces)
    kept, report = filter_traces(rows, cfg.filter)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "kept.jsonl", kept)
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2))
        write_manifest(tmp, {"kind": "traces", "source": str(traces), "report": report})
    return {"path": str(out_dir / "kept.jsonl"), "report": report}


@task(name="filter", cache_policy=NO_CACHE)
def filter_task(cfg: Pipeline, ctx: RunContext, traces: str) -> dict:
    with ctx.tracker().stage("filter", ctx.parent_run_id) as run:
        run.log_params(cfg.filter.model_dump())
        result = run_filter(cfg, Path(traces), ctx.stage_dir("filter"))
        rep = result["report"]
        run.log_metrics({"input": rep["input"], "kept": rep["kept"], "keep_rate": rep["keep_rate"],
                         **{f"dropped.{k}": v for k, v in rep["dropped"].items()}})
        run.log_dict(rep, "filter_report.json")
        if rep["kept"] == 0:
            raise ValueError(f"filter: every trace was dropped ({rep['dropped']}); check the verifier settings")
    return result
