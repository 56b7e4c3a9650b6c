"""filter: keep the teacher traces a researcher would trust, and say what each rule dropped.

    distillery run demo --set filter.max_tokens=48 --set filter.keep_per_prompt=1

Rules, in order (a trace is counted against the first rule it fails; cheap per-trace rules first):
  truncated       hit the generation max_tokens
  think_format    exactly one well-formed, non-empty <think>…</think> before a non-empty answer
  length          token bounds (min_tokens, max_tokens)
  contaminated    the prompt shares a word n-gram (decontam_ngram) with a question of an eval set the
                  pipeline evaluates on (evaluate.tasks found under evals/)
  answer          the final answer, checked against the reference by `verifier` (see VERIFIERS)
  duplicate       exact prompt+completion repeat
  near_duplicate  MinHash Jaccard >= near_dedupe_threshold with a trace kept for the same prompt
  over_k          beyond the keep_per_prompt shortest passing traces of its prompt
Output: <run>/filter/kept.jsonl and report.json: dropped per rule, kept, keep rate, per-prompt pass rates,
kept lengths; the stage's MLflow run also gets the report as filter_report.json and filter_report.png.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, atomic_write_text, content_hash, read_jsonl, write_jsonl, write_manifest
from distillery.config import FilterConfig, Pipeline
from distillery.results import Traces
from distillery.runtime import RunContext
from distillery.verify import VERIFIERS, think_ok

log = logging.getLogger(__name__)

RULES = ("truncated", "think_format", "length", "contaminated", "answer", "duplicate", "near_duplicate", "over_k")
EVALS = Path(__file__).resolve().parents[1] / "evals"  # the local lm-eval tasks the evaluate stage runs
SIMPLE_FIELD = re.compile(r"^\s*\{\{\s*(\w+)\s*\}\}\s*$")
PASS_RATE_BINS = 5
LENGTH_BINS = 10
NUM_PERM = 128  # MinHash size: Jaccard estimate std ~0.03 near 0.9


# ---- decontamination ----------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped: reformatting a question does not hide it."""
    return re.findall(r"\w+", text.casefold())


def ngrams(text: str, n: int) -> set[str]:
    """Word n-grams; a text shorter than n words is one gram, its whole normalised text."""
    w = words(text)
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


def eval_texts(task_names: list[str], root: Path = EVALS) -> list[str]:
    """The questions of the local lm-eval tasks `task_names` (evals/<name>/), as the model is asked them.

    Reads each task YAML's doc_to_text (a simple "{{field}}" template) and the jsonl files of its evaluated
    split in dataset_kwargs.data_files. Tasks that are not local, or not in that shape, are skipped with a
    warning: their questions are not checked.
    """
    texts: list[str] = []
    for name in task_names:
        folder = root / name
        if not folder.is_dir():
            log.warning("filter: eval task %r is not in %s; traces are not decontaminated against it", name, root)
            continue
        found = False
        for path in sorted(folder.glob("*.yaml")):
            try:
                doc = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                continue  # !function tags and the like: not a file this reader understands
            if not isinstance(doc, dict) or doc.get("task") not in (name, None):
                continue
            field = SIMPLE_FIELD.match(str(doc.get("doc_to_text", "")))
            files = (doc.get("dataset_kwargs") or {}).get("data_files")
            if not field or not files:
                continue
            if isinstance(files, dict):  # only the split lm-eval scores, not e.g. a few-shot train split
                split = doc.get("test_split") or doc.get("validation_split")
                files = files.get(split, [])
            for rel in [files] if isinstance(files, str) else files:
                texts += [str(r[field[1]]) for r in read_jsonl(folder / rel) if field[1] in r]
                found = True
        if not found:
            log.warning(
                "filter: eval task %r has no YAML with a {{field}} doc_to_text and jsonl data_files; "
                "traces are not decontaminated against it",
                name,
            )
    return texts


# ---- the filter ---------------------------------------------------------------------------------------------


class NearDuplicates:
    """MinHash signatures of the traces kept so far, per prompt: similar traces of different prompts are fine."""

    def __init__(self, threshold: float, ngram: int):
        try:
            from datasketch import MinHash
        except ImportError as e:
            raise ImportError(
                "filter.near_dedupe needs datasketch: pip install 'datasketch==2.0.0' "
                "(or set filter.near_dedupe: false)"
            ) from e
        self.minhash, self.threshold, self.ngram = MinHash, threshold, ngram
        self.proto = MinHash(num_perm=NUM_PERM, seed=1)  # shared permutations: no per-trace RNG set-up
        self.kept: dict[str, list] = defaultdict(list)

    def shingles(self, text: str) -> set[str]:
        # Whitespace tokens keep operators and numbers: "3+5=8" and "3*5=8" are different steps.
        w = text.casefold().split()
        if len(w) < self.ngram:
            return {" ".join(w)}
        return {" ".join(w[i : i + self.ngram]) for i in range(len(w) - self.ngram + 1)}

    def seen(self, prompt_id: str, text: str) -> bool:
        """True if `text` is near a kept trace of the prompt; otherwise remember it as kept."""
        m = self.minhash(num_perm=NUM_PERM, permutations=self.proto.permutations, scheme=self.proto.scheme)
        m.update_batch([s.encode() for s in self.shingles(text)])
        # Groups are a handful of samples per prompt: comparing with each is cheaper than LSH bands, and exact.
        if any(m.jaccard(k) >= self.threshold for k in self.kept[prompt_id]):
            return True
        self.kept[prompt_id].append(m)
        return False


class TraceFilter:
    """The rules up to near_duplicate, one trace at a time, in input order (the first of a duplicate wins)."""

    def __init__(self, cfg: FilterConfig, eval_set: Sequence[str] = ()):
        self.cfg = cfg
        self.verify = VERIFIERS[cfg.verifier]
        self.eval_grams: set[str] = set()
        if cfg.decontaminate:
            for text in eval_set:
                self.eval_grams |= ngrams(text, cfg.decontam_ngram)
        self.contaminated: dict[str, bool] = {}  # per prompt: n samples share it
        self.seen: set = set()
        self.near = NearDuplicates(cfg.near_dedupe_threshold, cfg.near_dedupe_ngram) if cfg.near_dedupe else None

    def __call__(self, row: dict) -> str | None:
        """The first rule `row` breaks, or None to keep it."""
        cfg, text = self.cfg, row["completion"]
        if row.get("prompt_text", "").rstrip().endswith("<think>"):  # the template prefilled the opening tag
            text = "<think>" + text
        if cfg.drop_truncated and row.get("finish_reason") == "length":
            return "truncated"
        if cfg.require_think and not think_ok(text):
            return "think_format"
        n = row.get("num_tokens", 0)
        if n < cfg.min_tokens or (cfg.max_tokens is not None and n > cfg.max_tokens):
            return "length"
        if self.eval_grams:
            prompt = row["prompt"]
            if prompt not in self.contaminated:
                self.contaminated[prompt] = not self.eval_grams.isdisjoint(ngrams(prompt, cfg.decontam_ngram))
            if self.contaminated[prompt]:
                return "contaminated"
        if cfg.verifier != "none" and not self.verify(text, str(row["answer"]), cfg):
            return "answer"
        if cfg.dedupe:
            key = (row["prompt"], row["completion"].strip())
            if key in self.seen:
                return "duplicate"
            self.seen.add(key)
        if self.near and self.near.seen(row["prompt_id"], row["completion"]):
            return "near_duplicate"
        return None


def verdict(row: dict, cfg: FilterConfig, eval_set: Sequence[str] = ()) -> str | None:
    """The first rule a lone `row` breaks (over_k needs the whole set: see filter_traces)."""
    return TraceFilter(cfg, eval_set)(row)


def length_histogram(lengths: list[int], bins: int = LENGTH_BINS) -> dict:
    """Integer-edged equal-width bins [edge_i, edge_i+1) over the observed range."""
    if not lengths:
        return {"edges": [], "counts": []}
    lo, hi = min(lengths), max(lengths)
    width = -(-(hi - lo + 1) // bins)
    bins = -(-(hi - lo + 1) // width)  # no empty bins past the longest
    counts = [0] * bins
    for n in lengths:
        counts[(n - lo) // width] += 1
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": counts}


def filter_traces(rows: list[dict], cfg: FilterConfig, eval_set: Sequence[str] = ()) -> tuple[list[dict], dict]:
    """Apply every rule; `eval_set` holds the eval questions for the contaminated rule."""
    check = TraceFilter(cfg, eval_set)
    dropped: Counter = Counter()
    passing: dict[str, list[int]] = defaultdict(list)  # prompt -> row indices that pass every rule but over_k
    for i, row in enumerate(rows):
        rule = check(row)
        if rule:
            dropped[rule] += 1
        else:
            passing[row["prompt_id"]].append(i)
    keep: set[int] = set()
    for idx in passing.values():
        if cfg.keep_per_prompt is not None:  # best k of n: the shortest correct traces, ties in input order
            idx = sorted(idx, key=lambda i: (rows[i].get("num_tokens", 0), i))[: cfg.keep_per_prompt]
        keep.update(idx)
    dropped["over_k"] = sum(len(v) for v in passing.values()) - len(keep)
    kept = [r for i, r in enumerate(rows) if i in keep]

    total = Counter(r["prompt_id"] for r in rows)
    per_prompt_kept = Counter(r["prompt_id"] for r in kept)
    # Pass rate: the share of a prompt's samples that pass every quality rule (the k-of-n cap is a choice,
    # not a failure). Bins of width 1/PASS_RATE_BINS, the last one closed: 1.0 falls in 0.8-1.0.
    rates = {p: len(passing.get(p, ())) / t for p, t in total.items()}
    hist = [0] * PASS_RATE_BINS
    for p, t in total.items():
        hist[min(len(passing.get(p, ())) * PASS_RATE_BINS // t, PASS_RATE_BINS - 1)] += 1
    edges = [round(i / PASS_RATE_BINS, 2) for i in range(PASS_RATE_BINS + 1)]
    report = {
        "input": len(rows),
        "kept": len(kept),
        "dropped": {r: dropped.get(r, 0) for r in RULES},
        "keep_rate": len(kept) / len(rows) if rows else 0.0,
        "prompts": len(total),
        "prompts_with_a_kept_trace": len(per_prompt_kept),
        "kept_per_prompt_histogram": dict(sorted(Counter(per_prompt_kept.get(p, 0) for p in total).items())),
        "pass_rate_per_prompt": {
            "mean": sum(rates.values()) / len(rates) if rates else 0.0,
            "histogram": {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": hist[i] for i in range(PASS_RATE_BINS)},
        },
        "length_histogram": length_histogram([r.get("num_tokens", 0) for r in kept]),
    }
    return kept, report


def report_figure(report: dict):
    """Two panels: traces dropped per rule, and the token lengths of the kept ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    rules = list(report["dropped"])
    bars = left.bar(rules, [report["dropped"][r] for r in rules], color="tab:red")
    left.bar_label(bars, fontsize=8)
    left.set_ylabel("traces dropped")
    left.set_title(f"filter: kept {report['kept']} of {report['input']} ({report['keep_rate']:.0%})")
    left.tick_params(axis="x", rotation=35, labelsize=8)
    hist = report["length_histogram"]
    if hist["counts"]:
        right.stairs(hist["counts"], hist["edges"], fill=True, color="tab:blue", alpha=0.7)
    right.set_xlabel("completion tokens")
    right.set_ylabel("kept traces")
    right.set_title("kept trace lengths")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def run_filter(cfg: Pipeline, traces: Path, out_dir: Path) -> dict:
    rows = read_jsonl(traces)
    f = cfg.filter
    eval_set = eval_texts(cfg.evaluate.tasks) if f.decontaminate else []
    kept, report = filter_traces(rows, f, eval_set)
    report["decontamination"] = {
        "enabled": f.decontaminate,
        "eval_tasks": cfg.evaluate.tasks,
        "eval_texts": len(eval_set),
        "ngram": f.decontam_ngram,
    }
    # in prompt order (several teachers' traces come teacher by teacher): the held-out prompts are the last ones
    has_kept = {r["prompt_id"] for r in kept}
    prompt_ids = [p for p in dict.fromkeys(r["prompt_id"] for r in rows) if p in has_kept]
    held_ids = set(prompt_ids[max(0, len(prompt_ids) - f.holdout_prompts) :]) if f.holdout_prompts else set()
    heldout = [r for r in kept if r["prompt_id"] in held_ids]
    kept = [r for r in kept if r["prompt_id"] not in held_ids]
    report["heldout"] = {"prompts": len(held_ids), "traces": len(heldout)}
    authors = list(dict.fromkeys(r.get("teacher") for r in rows))
    if len(authors) > 1:  # several teachers' traces merged by the verifier: what each one contributed
        report["by_teacher"] = [
            {
                "teacher": t,
                "input": sum(r.get("teacher") == t for r in rows),
                "kept": sum(r.get("teacher") == t for r in kept + heldout),
            }
            for t in authors
        ]
        for b in report["by_teacher"]:
            b["keep_rate"] = b["kept"] / max(b["input"], 1)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "kept.jsonl", kept)
        if heldout:
            write_jsonl(tmp / "heldout.jsonl", heldout)
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2))
        write_manifest(tmp, {"kind": "traces", "source": str(traces), "report": report})
    return {
        "path": str(out_dir / "kept.jsonl"),
        "report": report,
        "heldout": str(out_dir / "heldout.jsonl") if heldout else None,
    }


@task(name="filter", cache_policy=NO_CACHE)
def filter_task(cfg: Pipeline, ctx: RunContext, traces: Traces) -> Traces:
    with ctx.tracker().stage("filter", ctx.parent_run_id) as run:
        run.log_params(cfg.filter.model_dump())
        result = run_filter(cfg, Path(traces.path), ctx.stage_dir("filter"))
        rep = result["report"]
        run.log_metrics(
            {
                "input": rep["input"],
                "kept": rep["kept"],
                "keep_rate": rep["keep_rate"],
                "prompts": rep["prompts"],
                "prompts_with_a_kept_trace": rep["prompts_with_a_kept_trace"],
                "pass_rate_mean": rep["pass_rate_per_prompt"]["mean"],
                **{f"dropped.{k}": v for k, v in rep["dropped"].items()},
                **{f"teacher{j}_keep_rate": b["keep_rate"] for j, b in enumerate(rep.get("by_teacher", []))},
            }
        )
        run.log_dict(rep, "filter_report.json")
        import matplotlib.pyplot as plt

        fig = report_figure(rep)
        run.log_figure(fig, "filter_report.png")
        plt.close(fig)
        if rep["kept"] == 0:
            raise ValueError(f"filter: every trace was dropped ({rep['dropped']}); check the verifier settings")
    figures = {"kept": rep["kept"], "keep_rate": rep["keep_rate"]}
    path = Path(result["path"])
    return Traces(str(path), "filter", run.run_id, figures, content_hash(path.parent), result["heldout"], rep)
