"""pipelines.yaml, parsed once into typed, validated models. Tasks receive these objects, never raw dicts.

    distillery validate pipelines.yaml

Every problem is reported as one line naming its place, e.g. `pipelines.demo.train.learning_rate: must be > 0`.
"""

from __future__ import annotations

import copy
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from distillery import model_uris
from distillery.demo.assets import STUDENT_SIZES

STAGES = ("generate", "filter", "train", "prune", "quantize", "evaluate", "draft")
Stage = Literal["generate", "filter", "train", "prune", "quantize", "evaluate", "draft"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEMO_REFS = (
    "demo:teacher",
    "demo:teacher-b",
    "demo:student",
    "demo:student-othertok",
    *(f"demo:student-{size}" for size in STUDENT_SIZES),
)
REHEARSAL_REFS = (
    "rehearsal:teacher",
    "rehearsal:student",
    "rehearsal:student-r1",
)  # distillery/rehearsal.py: real vocabularies, built here
BUILTIN_PREFIXES = ("demo:", "rehearsal:")  # models the project builds itself, on first use


class ConfigError(ValueError):
    """A pipelines file that cannot run. `lines` holds one `place: problem` line per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


LOCAL_PREFIXES = ("/", "./", "../", "~")  # how a local path is told from a hub id


def _check_local_path(value: str, info: ValidationInfo, what: str) -> str:
    """Paths start with '/', './', '../' or '~' and must exist; anything else of the form org/name is a hub id."""
    if value.startswith(LOCAL_PREFIXES):
        base = Path((info.context or {}).get("base_dir", "."))
        path = (base / Path(value).expanduser()).resolve()
        if not path.exists():
            raise ValueError(f"{what} path does not exist: {value}")
        return str(path)
    return value


class ModelRef(Strict):
    path: str = Field(
        description="demo:teacher | demo:student | a local folder (./, /, ~) | a hub id org/name | an MLflow model: "
        "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/<path>"
    )
    revision: str | None = Field(None, description="hub revision (commit, tag, branch); recorded for lineage")
    trust_remote_code: bool = Field(False, description="run the model repo's own Python code; off by default")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    pad_token: str | None = Field(
        None,
        description="student: the token to pad with, for tokenizers that pad with eos (DeepSeek-R1-Distill's), "
        "which training refuses: e.g. '<|fim_pad|>'; saved with the trained student",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str, info: ValidationInfo) -> str:
        if v.startswith(BUILTIN_PREFIXES):
            if v not in DEMO_REFS + REHEARSAL_REFS:
                raise ValueError(f"unknown demo model {v!r}; expected one of {', '.join(DEMO_REFS + REHEARSAL_REFS)}")
            return v
        if v.startswith(model_uris.PREFIXES):  # whether it names something is preflight's question: it asks MLflow
            if problem := model_uris.syntax_problem(v):
                raise ValueError(f"model path {problem}")
            return v
        if not v.startswith(LOCAL_PREFIXES) and not HUB_ID.match(v):
            raise ValueError(
                f"model path {v!r}: local paths start with / ./ ../ or ~; hub ids look like org/name; MLflow models "
                "are models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<path>"
            )
        return _check_local_path(v, info, "model")


class DataConfig(Strict):
    source: Literal["demo", "jsonl", "hub"] = "demo"
    path: str | None = Field(
        None,
        description="jsonl file (source=jsonl; rehearsal:problems is the shipped one) or hub dataset id (source=hub)",
    )
    config_name: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    num_prompts: Annotated[int, Field(gt=0)] | None = Field(None, description="use the first N prompts")
    seed: int = 0
    chat_template: bool = Field(False, description="wrap prompts in the teacher's chat template")
    system_prompt: str | None = None
    prompt_template: str = Field("{prompt}", description="format string applied to the raw prompt field")

    @model_validator(mode="after")
    def _needs_path(self) -> DataConfig:
        if self.source != "demo" and not self.path:
            raise ValueError(f"path is required when source is {self.source!r}")
        return self

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v == "rehearsal:problems":  # shipped with the package, wherever the pipelines file lives
            from distillery.demo.assets import REHEARSAL_PROBLEMS

            return str(REHEARSAL_PROBLEMS)
        return None if v is None else _check_local_path(v, info, "data")


class OpenAIConfig(Strict):
    base_url: str = Field(description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="model name the endpoint serves")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key (never logged)")
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    max_retries: Annotated[int, Field(ge=0)] = Field(5, description="retries with backoff on 429/5xx/timeouts")
    timeout: Annotated[float, Field(gt=0)] = 120.0


class EnsembleConfig(Strict):
    teachers: Annotated[list[ModelRef], Field(min_length=1)] = Field(
        description="teachers besides `teacher`, on its tokenizer (same tokens, same ids)"
    )
    merge: Literal["traces", "average"] = Field(
        "traces",
        description="traces: every teacher samples every prompt and the filter's verifier keeps whichever are right; "
        "average: `teacher` samples, every teacher scores each token, and the stored top-k is their mixture",
    )
    weights: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="average: each teacher's share of the mixture, `teacher` first; default equal"
    )
    batch_size: Annotated[int, Field(gt=0)] = Field(8, description="average: traces per scoring forward pass")

    @model_validator(mode="after")
    def _weights(self) -> EnsembleConfig:
        if self.weights is not None:
            if self.merge != "average":
                raise ValueError("weights: only merge 'average' mixes distributions; traces are merged by verifier")
            if len(self.weights) != len(self.teachers) + 1:
                raise ValueError(
                    f"weights: {len(self.weights)} given for {len(self.teachers) + 1} teachers (`teacher` first)"
                )
        return self


class GenerateConfig(Strict):
    backend: Literal["vllm", "transformers", "openai"] = "vllm"
    n: Annotated[int, Field(ge=1, description="samples per prompt")] = 1
    temperature: Annotated[float, Field(ge=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_tokens: Annotated[int, Field(gt=0)] = 256
    stop: list[str] = []
    seed: int = 0
    batch_size: Annotated[int, Field(gt=0, description="transformers backend batch size")] = 64
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    enforce_eager: bool = Field(False, description="skip torch.compile/CUDA graphs: faster start, slower run")
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "bfloat16"
    kv_cache_gib: Annotated[float, Field(gt=0)] = Field(1.0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    data_parallel_size: Annotated[int, Field(ge=1)] = Field(1, description="vLLM engine replicas (GPUs)")
    logprobs: Annotated[int, Field(ge=0, le=64)] = Field(0, description="top-k teacher logprobs kept per token; 0=off")
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        "raw_logprobs", description="raw: log-softmax of the logits at T=1; processed: after temperature/top-p"
    )
    think_prefill: bool = Field(False, description="end the rendered prompt with '<think>\\n' if the template doesn't")
    shard_size: Annotated[int, Field(gt=0)] = Field(256, description="prompts per shard: the unit of resumption")
    cache_dir: str | None = Field(None, description="finished shards, by content; default <output_dir>/.cache")
    openai: OpenAIConfig | None = Field(None, description="endpoint settings for backend: openai")
    ensemble: EnsembleConfig | None = Field(
        None, description="several teachers: their traces merged by the verifier, or their distributions averaged"
    )

    @model_validator(mode="after")
    def _openai(self) -> GenerateConfig:
        if self.backend == "openai" and self.openai is None:
            raise ValueError("backend 'openai' needs an openai: {base_url, model} section")
        if self.ensemble is not None:
            if self.backend == "openai":
                raise ValueError(
                    "ensemble: the teachers are local models (backend vllm or transformers), not endpoints"
                )
            if self.ensemble.merge == "average" and self.logprobs == 0:
                raise ValueError(
                    "ensemble.merge average: mixes the teachers' per-token distributions; set logprobs > 0"
                )
            if self.ensemble.merge == "average" and self.logprobs_mode != "raw_logprobs":
                raise ValueError(
                    "ensemble.merge average: the teachers are scored at T = 1; set logprobs_mode raw_logprobs"
                )
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"n = {self.n} with temperature 0: greedy samples are identical; use n: 1 or temperature > 0"
            )
        return self


class FilterConfig(Strict):
    verifier: Literal["regex", "exact", "numeric", "math", "boxed", "none"] = Field(
        "regex",
        description="how the final answer (after </think>) is checked against the reference: regex "
        "(answer_pattern capture, normalised), exact (whole answer or capture, normalised), numeric (within "
        "tolerance; 1,000 3.50 -2 3/4), math (math-verify, LaTeX/\\boxed{}), boxed (last \\boxed{}, plain or "
        "math-verify), none",
    )
    answer_pattern: str = Field(r"The answer is (-?\d+)", description="regex whose last group is the answer")
    tolerance: Annotated[float, Field(ge=0, lt=1)] = Field(1e-6, description="numeric verifier: relative tolerance")
    require_think: bool = Field(True, description="exactly one non-empty <think>…</think> before the answer")
    min_tokens: Annotated[int, Field(ge=0)] = Field(1, description="fewest completion tokens a kept trace has")
    max_tokens: Annotated[int, Field(gt=0)] | None = Field(None, description="most completion tokens; null: no bound")
    drop_truncated: bool = Field(True, description="drop completions that hit max_tokens")
    dedupe: bool = Field(True, description="drop exact prompt+completion repeats")
    near_dedupe: bool = Field(
        True, description="drop traces near-identical (MinHash) to a kept trace of the same prompt"
    )
    near_dedupe_threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        0.9,
        description="near_dedupe: estimated Jaccard similarity of word n-gram shingles at which a trace is a "
        "near duplicate",
    )
    near_dedupe_ngram: Annotated[int, Field(ge=1, le=64)] = Field(5, description="near_dedupe: words per shingle")
    decontaminate: bool = Field(
        True, description="drop traces whose prompt shares a word n-gram with a question of the local evaluate.tasks"
    )
    decontam_ngram: Annotated[int, Field(ge=1, le=1024)] = Field(
        13,
        description="decontaminate: words per n-gram; a text shorter than this is compared whole, so a value "
        "above the longest question matches only whole-question copies",
    )
    keep_per_prompt: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="best-k-of-n: keep at most this many passing traces per prompt, the shortest first; "
        "null keeps every passing trace",
    )
    holdout_prompts: Annotated[int, Field(ge=0)] = Field(
        0,
        description="kept traces of this many prompts (the last ones) go to heldout.jsonl instead of training: "
        "evaluate reports every model's perplexity on them",
    )

    @field_validator("answer_pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            if re.compile(v).groups < 1:
                raise ValueError("needs a capture group for the answer")
        except re.error as e:
            raise ValueError(f"not a valid regex: {e}") from e
        return v

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) is below min_tokens ({self.min_tokens})")
        return self


class LoraConfig(Strict):
    r: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: str | list[str] = "all-linear"
    quantize: Literal["nf4"] | None = Field(
        None,
        description="QLoRA: load the frozen base in 4-bit NF4 (double quant) through bitsandbytes; the adapter "
        "is merged into the dequantized base it was trained against. (An LLM.int8 base is not offered: it also "
        "quantizes activations, so no float model reproduces what the adapter learned.)",
    )


class KDConfig(Strict):
    temperature: Annotated[float, Field(gt=0)] = Field(2.0, description="divides teacher and student logits alike")
    alpha: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5, description="weight of the soft-target loss; 1-alpha goes to cross-entropy on the teacher's tokens"
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: Annotated[float, Field(ge=0, le=1)] = Field(0.5, description="jsd interpolation: 0 forward, 1 reverse KL")
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket",
        description="mass outside the stored top-k: one "
        "pseudo-token on both sides, tempered alike, or renormalise "
        "over the k",
    )
    scale_t2: bool = Field(
        True,
        description="multiply the soft loss by T² (Hinton et al.): without it the soft "
        "gradient shrinks as 1/T² at large T (bench/temperature.py); false only to measure that",
    )
    chunk_size: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="positions whose output-layer logits are built at once (losses.chunked_kd_ce: the same loss "
        "and gradient in less memory); 0 builds the whole batch's; default 1024 for a student with 32k+ "
        "vocabulary rows, else 0",
    )


class GKDSection(Strict):
    lmbda: Annotated[float, Field(ge=0, le=1)] = Field(0.5, description="fraction of on-policy (student) samples")
    beta: Annotated[float, Field(ge=0, le=1)] = Field(0.5, description="generalized JSD: 0 forward, 1 reverse KL")
    temperature: Annotated[float, Field(gt=0)] = Field(0.9, description="student sampling temperature")
    max_new_tokens: Annotated[int, Field(gt=0)] = 128
    seq_kd: bool = Field(False, description="also train on teacher-generated sequences (sequence-level KD)")


class TeacherServerConfig(Strict):
    base_url: str = Field(description="the teacher's vLLM server (distillery serve-model), e.g. http://127.0.0.1:8000")
    api_key_env: str = Field("DISTILLERY_API_KEY", description="environment variable holding its key (never logged)")
    timeout: Annotated[float, Field(gt=0)] = Field(120.0, description="seconds to wait for one scoring request")
    max_retries: Annotated[int, Field(ge=0)] = Field(
        3, description="retries with backoff on refused connections, timeouts and 5xx, then one clear error"
    )
    top_k: Annotated[int, Field(ge=1, le=20)] = Field(
        1,
        description="teacher log-probs per token from the server: the loss is over those tokens plus one tail "
        "bucket (the server gives no full distribution); beta > 0 needs 1 (TRL: the sampled token and the tail)",
    )


class OnPolicySection(Strict):
    beta: Annotated[float, Field(ge=0, le=1)] = Field(
        1.0,
        description="generalized JSD between student and teacher on the student's own samples: 1 reverse KL "
        "(the default: the teacher costs every token the student chose), 0 forward KL, 0.5 JSD",
    )
    temperature: Annotated[float, Field(gt=0)] = Field(
        1.0, description="the student's sampling temperature, and the temperature of both distributions in the loss"
    )
    max_new_tokens: Annotated[int, Field(gt=0)] = Field(128, description="tokens per student rollout")
    sft_first: bool = Field(
        True,
        description="SFT on the kept traces first (the train.* settings), then on-policy from that student, as the "
        "GKD paper starts from a supervised student",
    )
    generation: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="how the student samples its rollouts: vllm (colocated on the trainer's GPU, weights synced "
        "every step; TRL's vLLM path needs CUDA), transformers (generate); auto: vllm on a GPU, else transformers",
    )
    max_steps: int | None = Field(
        None,
        description="on-policy steps; default train.max_steps (and train.epochs over the traces' distinct prompts)",
    )
    learning_rate: Annotated[float, Field(gt=0)] | None = Field(None, description="default train.learning_rate")
    teacher_server: TeacherServerConfig | None = Field(
        None,
        description="score the rollouts with the teacher behind this OpenAI-compatible vLLM server instead of "
        "loading it: a teacher of any size stays out of the trainer's memory (TRL ServerDistillationTrainer)",
    )

    @model_validator(mode="after")
    def _served(self) -> OnPolicySection:
        s = self.teacher_server
        if s is None:
            return self
        if self.beta > 0 and s.top_k != 1:
            raise ValueError(
                f"teacher_server.top_k: {s.top_k} with beta {self.beta}: a served teacher's reverse-KL or JSD loss is "
                "over the sampled token and a tail bucket (top_k 1); top_k > 1 needs beta 0 (forward KL)"
            )
        if self.temperature != 1.0:
            raise ValueError(
                f"temperature: {self.temperature} with teacher_server: the server returns the teacher's log-probs at "
                "T = 1 (vLLM's prompt log-probs are not tempered), so both sides must be at 1.0"
            )
        return self


class CrossTokenizerSection(Strict):
    lmbda: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="fraction of batches the student samples itself (on-policy); 0: the teacher's traces only"
    )
    hybrid: bool = Field(
        True,
        description="tokens both vocabularies share get the exact divergence (JSD, beta) and the rest ULD's sorted-"
        "probability distance (TRL GOLD's hybrid loss); false: ULD on every token",
    )
    beta: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="JSD of the matched tokens: 0 forward KL")
    ce_weight: Annotated[float, Field(ge=0)] = Field(
        1.0, description="cross-entropy on the student's own tokenization of the trace, as in the ULD paper"
    )
    temperature: Annotated[float, Field(gt=0)] = Field(1.0, description="both distributions' temperature")
    max_new_tokens: Annotated[int, Field(gt=0)] = Field(96, description="student rollouts when lmbda > 0")
    max_steps: int | None = Field(None, description="default train.max_steps")


class FeatureSection(Strict):
    weight: Annotated[float, Field(ge=0)] = Field(
        1.0, description="weight of the hidden-state term, added to train.kd's logit loss (alpha·KD + (1-alpha)·CE)"
    )
    loss: Literal["cosine", "mse"] = Field("cosine", description="1 - cosine similarity, or mean squared error")
    layers: list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]] | None = Field(
        None,
        description="[student, teacher] hidden-state index pairs (0 = embeddings, L = last block after the final "
        "norm); default: each student block with the teacher block at the same relative depth",
    )


class DPOSection(Strict):
    judge: Literal["verifier", "teacher"] = Field(
        "verifier",
        description="verifier: a sample filter.verifier accepts beats one it rejects; teacher: the "
        "sample with the highest mean token log-prob under the teacher beats the lowest",
    )
    sft_first: bool = Field(
        True,
        description="SFT on the kept traces first (the train.* settings), then sample, "
        "judge and DPO from that model, which is also the DPO reference",
    )
    samples: Annotated[int, Field(ge=2)] = Field(4, description="student samples per prompt to pair up")
    temperature: Annotated[float, Field(gt=0)] = 1.0
    max_new_tokens: Annotated[int, Field(gt=0)] = 256
    num_prompts: Annotated[int, Field(gt=0)] | None = Field(None, description="first N kept prompts; default all")
    pairs_per_prompt: Annotated[int, Field(ge=1)] = 1
    min_margin: Annotated[float, Field(ge=0)] = Field(
        0.0, description="teacher judge: least gap in mean token log-prob between chosen and rejected"
    )
    beta: Annotated[float, Field(gt=0)] = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sigmoid_norm"] = "sigmoid"
    sft_weight: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="add this weight of NLL on the chosen samples (RPO): keeps DPO from lowering the "
        "likelihood of the chosen answers along with the rejected ones",
    )
    epochs: Annotated[float, Field(gt=0)] = 1.0
    learning_rate: Annotated[float, Field(gt=0)] = 5e-6


class TrainConfig(Strict):
    method: Literal["hard", "sft", "logit_kd", "gkd", "on_policy", "feature", "cross_tokenizer", "dpo"] = Field(
        "sft",
        description="hard: the dataset's answers only, no teacher (the baseline); sft: teacher traces as "
        "targets; logit_kd: the teacher's stored top-k distribution at every token; gkd: on-policy generalized KD "
        "with the live teacher (TRL GKDTrainer, transformers sampling, a mix of student and trace batches); "
        "on_policy: every completion the student's own rollout, the live teacher's full distribution at each of its "
        "tokens (TRL DistillationTrainer, reverse KL by default, vLLM rollouts on a GPU); feature: hidden states of "
        "chosen layers through a learned projection to the teacher's, plus train.kd's logit loss against the live "
        "teacher (born-again: a student of the teacher's own shape, e.g. demo:student-teacher); cross_tokenizer: "
        "teacher and student on different tokenizers (TRL GOLD: ULD, exact on the shared tokens); dpo: pairs of "
        "student samples ranked by the verifier or the teacher, then TRL DPOTrainer",
    )
    kd: KDConfig = KDConfig()
    gkd: GKDSection = GKDSection()
    on_policy: OnPolicySection = OnPolicySection()
    feature: FeatureSection = FeatureSection()
    cross_tokenizer: CrossTokenizerSection = CrossTokenizerSection()
    dpo: DPOSection = DPOSection()
    hard_label_template: str = Field(
        "{answer}", description="method hard: the completion for a prompt, from its reference answer"
    )
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = Field(-1, description="> 0 overrides epochs")
    learning_rate: Annotated[float, Field(gt=0)] = 2e-5
    batch_size: Annotated[int, Field(gt=0)] = 8
    gradient_accumulation_steps: Annotated[int, Field(gt=0)] = 1
    max_length: Annotated[int, Field(gt=0)] = 1024
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    seed: int = 0
    logging_steps: Annotated[int, Field(gt=0)] = 10
    bf16: bool = False
    lora: LoraConfig | None = Field(None, description="LoRA via PEFT; omit for full fine-tuning")


class WidthPrune(Strict):
    intermediate_size: Annotated[int, Field(gt=0)] | None = Field(
        None, description="MLP neurons to keep per layer, ranked by mean |activation| into down_proj"
    )
    num_attention_heads: Annotated[int, Field(gt=0)] | None = Field(
        None,
        description="query heads to keep per layer; grouped-query attention keeps or drops whole KV groups "
        "(ranked by the summed output norm of their query heads), so this must be a multiple of heads per group",
    )

    @model_validator(mode="after")
    def _something(self) -> WidthPrune:
        if self.intermediate_size is None and self.num_attention_heads is None:
            raise ValueError("set intermediate_size and/or num_attention_heads")
        return self


class HealConfig(Strict):
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = Field(-1, description="> 0 overrides epochs")
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    batch_size: Annotated[int, Field(gt=0)] = 32
    temperature: Annotated[float, Field(gt=0)] = Field(1.0, description="KD temperature (T² scaled)")
    max_length: Annotated[int, Field(gt=0)] = 256
    num_texts: Annotated[int, Field(gt=0)] | None = Field(None, description="first N kept traces; default all")


class PruneConfig(Strict):
    drop_layers: Annotated[int, Field(ge=0)] = Field(1, description="depth: decoder layers to remove")
    importance: Literal["cosine"] = Field("cosine", description="depth: 1 - cos(block input, block output)")
    width: WidthPrune | None = Field(None, description="width: MLP neurons and attention heads to keep")
    calibration_samples: Annotated[int, Field(gt=0)] = 64
    max_length: Annotated[int, Field(gt=0)] = 256
    heal: HealConfig | None = Field(
        None,
        description="after pruning, distil the unpruned model's full logits into "
        "the pruned one on the kept traces (forward KL); omit to ship it unhealed",
    )

    @model_validator(mode="after")
    def _something(self) -> PruneConfig:
        if self.drop_layers == 0 and self.width is None:
            raise ValueError("nothing to prune: set drop_layers > 0 and/or width")
        return self


class QuantHealConfig(Strict):
    steps: Annotated[int, Field(gt=0)] = Field(200, description="optimizer steps of the healing distillation")
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    batch_size: Annotated[int, Field(gt=0)] = 16
    lora_r: Annotated[int, Field(gt=0)] = 8
    lora_alpha: Annotated[int, Field(gt=0)] = 16
    temperature: Annotated[float, Field(gt=0)] = Field(1.0, description="KD temperature (T²-scaled forward KL)")
    max_length: Annotated[int, Field(gt=0)] = 512
    seed: int = 0


class QuantizeConfig(Strict):
    formats: Annotated[list[Literal["int8", "nf4"]], Field(min_length=1)] = ["int8", "nf4"]
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    double_quant: bool = True
    source: Literal["latest", "train", "prune"] = "latest"
    heal: QuantHealConfig | None = Field(
        None,
        description="quantization-aware healing: LoRA adapters on the NF4 model, distilled from the full-precision "
        "student (forward KL on its full distribution) over the kept traces; the NF4 model plus adapters is "
        "student-nf4-healed, evaluated beside plain student-nf4",
    )


class EvaluateConfig(Strict):
    tasks: Annotated[list[str], Field(min_length=1)] = ["demo_arith"]
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="lm-eval model type: hf (transformers) or vllm (lm-eval's vLLM backend, in its own "
        "process; bitsandbytes-quantized models are always evaluated with hf)",
    )
    tensor_parallel_size: Annotated[int, Field(ge=1)] = Field(1, description="backend vllm: GPUs per model copy")
    data_parallel_size: Annotated[int, Field(ge=1)] = Field(
        1, description="backend vllm: model copies (lm-eval runs them as Ray workers: needs `ray`)"
    )
    limit: Annotated[int, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0)] = 32
    max_gen_toks: Annotated[int, Field(gt=0)] = 128
    seed: int = 1234
    include_untrained: bool = Field(True, description="also evaluate the student before training")
    throughput_prompts: Annotated[int, Field(gt=0)] = 16
    throughput_new_tokens: Annotated[int, Field(gt=0)] = 64
    metric: str = Field("exact_match", description="the lm-eval metric reported as accuracy")
    chat_template: bool | None = Field(
        None,
        description="wrap each task prompt in each model's own chat template (lm-eval apply_chat_template), as the "
        "models are served; default: data.chat_template",
    )
    ood_task: str | None = Field(
        None,
        description="which of `tasks` is out of distribution (e.g. longer chains "
        "than training): its accuracy is every model's ood_accuracy",
    )

    @model_validator(mode="after")
    def _ood_is_a_task(self) -> EvaluateConfig:
        if self.ood_task is not None and self.ood_task not in self.tasks:
            raise ValueError(f"ood_task {self.ood_task!r} is not one of evaluate.tasks {self.tasks}")
        return self


class DraftDistillConfig(Strict):
    """DistillSpec-style alignment of the draft to the teacher (Zhou et al. 2023): the draft samples its own
    continuations of the pipeline's prompts (on-policy) and learns the teacher's full next-token distribution on them
    (TRL DistillationTrainer). Forward KL by default: acceptance under speculative sampling is 1 - TVD(teacher,
    draft), and forward KL keeps the draft's mass where the teacher's is."""

    steps: Annotated[int, Field(gt=0)] = 200
    learning_rate: Annotated[float, Field(gt=0)] = 1.0e-4
    batch_size: Annotated[int, Field(gt=0)] = 32
    num_prompts: Annotated[int, Field(gt=0)] = Field(2000, description="training prompts (never the eval split)")
    beta: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="0 forward KL, 0.5 JSD, 1 reverse KL")
    temperature: Annotated[float, Field(gt=0)] = Field(1.0, description="draft sampling and loss temperature")
    max_new_tokens: Annotated[int, Field(gt=0)] = 64
    seed: int = 0
    logging_steps: Annotated[int, Field(gt=0)] = 10


class Eagle3Config(Strict):
    """An EAGLE-3 head (Li et al. 2025) trained on the teacher's own hidden states (vLLM's `speculators` library:
    its model and loss, training loop here), served by vLLM's EAGLE-3 proposer. The head reads three of the
    teacher's layers plus the token embedding and learns the teacher's next-token distribution over `ttt_steps`
    steps of its own drafting (training-time test)."""

    steps: Annotated[int, Field(gt=0)] = 300
    learning_rate: Annotated[float, Field(gt=0)] = 1.0e-3
    tokens_per_step: Annotated[int, Field(ge=64)] = Field(
        2048, description="samples are packed into one sequence of at most this many tokens per optimizer step"
    )
    num_layers: Annotated[int, Field(ge=1, le=4)] = Field(1, description="decoder layers of the head (EAGLE-3: 1)")
    ttt_steps: Annotated[int, Field(ge=1, le=8)] = Field(3, description="draft steps unrolled in training")
    target_layers: list[int] | None = Field(
        None,
        description="the teacher's layers the head reads (vLLM's numbering: the input of layer i); default: "
        "speculators' [2, L/2, L-3], or evenly spaced for a teacher under 6 layers",
    )
    loss: Literal["kl_div", "ce", "tv", "js_div"] = Field(
        "kl_div", description="speculators' loss against the teacher's full distribution (kl_div: forward KL)"
    )
    num_samples: Annotated[int, Field(gt=0)] = Field(
        4000, description="the most teacher samples (from stage generate) it trains on"
    )
    draft_vocab_size: Annotated[int, Field(ge=16)] | None = Field(
        None,
        description="the head's output vocabulary: the teacher's most emitted tokens (EAGLE-3 uses 32k for a 150k "
        "vocabulary); default: the teacher's whole vocabulary",
    )
    seed: int = 0
    logging_steps: Annotated[int, Field(gt=0)] = 10

    @field_validator("target_layers")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 3 or len(set(v)) != 3 or min(v) < 0):
            raise ValueError("three distinct layer numbers >= 0 (vLLM's EAGLE-3 reads three)")
        return v


class DraftConfig(Strict):
    backend: Literal["vllm"] = "vllm"
    kind: Literal["model", "eagle3"] = Field(
        "model",
        description="model: the student as a standalone draft; eagle3: an EAGLE-3 head trained on the teacher's "
        "hidden states over its own samples (draft.eagle3)",
    )
    eagle3: Eagle3Config = Eagle3Config()
    source: Literal["latest", "train", "prune"] = "train"
    num_speculative_tokens: Annotated[int, Field(ge=1, le=16)] = 4
    num_prompts: Annotated[int, Field(gt=0)] = 32
    max_tokens: Annotated[int, Field(gt=0)] = 64
    enforce_eager: bool = True
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    distill: DraftDistillConfig | None = Field(
        None, description="on-policy distillation of the draft toward the teacher before it is measured; off if absent"
    )
    sample_temperature: Annotated[float, Field(gt=0)] | None = Field(
        1.0,
        description="also measure sampled acceptance with transformers assisted generation (speculative "
        "sampling) at this temperature; null skips it",
    )
    sample_prompts: Annotated[int, Field(gt=0)] = Field(16, description="prompts for the sampled measurement")
    max_num_seqs: Annotated[int, Field(gt=0)] | None = Field(
        None,
        description="the most sequences vLLM decodes at once in the draft runs; 1 measures the latency-bound "
        "decoding drafts are for (default: vLLM's)",
    )

    @model_validator(mode="after")
    def _kind(self) -> DraftConfig:
        if self.kind == "eagle3" and self.distill is not None:
            raise ValueError("draft.distill: aligns a standalone draft model; draft.kind eagle3 trains its own head")
        return self


MODEL_STAGES = ("train", "prune", "quantize")
ModelStage = Literal["train", "prune", "quantize"]
# The figures evaluate records per model (tasks/evaluate.py); each registered version carries them as metric.* tags.
GATE_METRICS = ("accuracy", "accuracy_stderr", "params", "memory_bytes", "tokens_per_s", "eval_seconds")


class GateConfig(Strict):
    metric: str = Field("accuracy", description=f"evaluate figure compared: {', '.join(GATE_METRICS)}")
    higher_is_better: bool = Field(True, description="false for figures like memory_bytes, where less wins")
    min_delta: Annotated[float, Field(ge=0)] = Field(
        0.0, description="the candidate must beat the champion by more than this to take the alias"
    )
    model: Literal["best", "last"] = Field(
        "last", description="the gate candidate: the last version this run registered, or its best by metric"
    )

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in GATE_METRICS:
            raise ValueError(f"unknown metric {v!r}; expected one of {', '.join(GATE_METRICS)}")
        return v


class RegistryConfig(Strict):
    model_name: Annotated[str, Field(min_length=1)] = Field(description="registered model; one version per model")
    stages: Annotated[list[ModelStage], Field(min_length=1)] | None = Field(
        None,
        description="model stages whose models become versions (quantize: one per format); default every "
        "model stage the pipeline runs",
    )
    gate: GateConfig = Field(GateConfig(), description="when alias `champion` moves to the run's `candidate`")

    @field_validator("stages")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        return v


class ScheduleConfig(Strict):
    """When `distillery deploy` / `distillery serve` have the server start runs of the pipeline on their own."""

    cron: str | None = Field(None, description="cron string, e.g. '0 3 * * *' (03:00 daily in `timezone`)")
    interval: Annotated[float, Field(gt=0)] | None = Field(None, description="seconds between runs")
    timezone: str = Field("UTC", description="IANA name, e.g. Europe/Berlin: what the cron hours mean")
    overrides: list[str] = Field(
        [],
        description="`key=value` overrides for the scheduled runs, applied like "
        "--set; checked against the pipeline when the file is loaded",
    )
    active: bool = Field(True, description="false: the schedule is registered but paused (no runs)")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from prefect._vendor.croniter import croniter  # Prefect's own parser: what the server will accept

        if not croniter.is_valid(v) or any(f.casefold() in ("r", "h") for f in v.split()):
            raise ValueError(f"not a valid cron string: {v!r} (five fields, e.g. '0 3 * * *')")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        if v not in zoneinfo.available_timezones():
            raise ValueError(f"unknown timezone {v!r}; expected an IANA name like UTC or Europe/Berlin")
        return v

    @field_validator("overrides")
    @classmethod
    def _pairs(cls, v: list[str]) -> list[str]:
        for item in v:
            key, sep, _ = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{item!r}: expected key=value, e.g. train.epochs=1")
        return v

    @model_validator(mode="after")
    def _one(self) -> ScheduleConfig:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("set exactly one of cron and interval")
        return self


DEFAULT_LIMIT = "distillery-gpu"


class ConcurrencyConfig(Strict):
    """A Prefect global concurrency limit: a run holds one slot while its stages run, so two runs never share a GPU."""

    enabled: bool = Field(True, description="false: runs take no slot")
    limit_name: Annotated[str, Field(min_length=1)] = Field(DEFAULT_LIMIT, description="global concurrency limit")
    slots: Annotated[int, Field(ge=1)] = Field(
        1,
        description="runs at once (GPUs); `distillery deploy` creates "
        "the limit with this many slots when it is missing",
    )


class CheckpointConfig(Strict):
    every_steps: Annotated[int, Field(ge=0)] = Field(
        500,
        description="train, prune.heal and draft.distill save their whole trainer state every N optimizer steps "
        "(rounded up to a multiple of the stage's logging_steps; 0: never); a killed run started again on the same "
        "run folder resumes from the last complete one",
    )
    keep: Annotated[int, Field(ge=1)] = Field(2, description="how many of the latest checkpoints to keep")


class Pipeline(Strict):
    description: str = ""
    teacher: ModelRef
    student: ModelRef
    data: DataConfig = DataConfig()
    stages: Annotated[list[Stage], Field(min_length=1)] = list(STAGES)
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    draft: DraftConfig = DraftConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    registry: RegistryConfig | None = None
    experiment: str = Field("distillery", description="MLflow experiment name")
    log_models: bool = Field(
        True, description="log each stage's model folder to its MLflow run (registered ones are always logged)"
    )
    output_dir: str = Field("runs", description="where stage artifacts go, relative to the working directory")
    schedule: ScheduleConfig | None = Field(None, description="runs the server starts on its own (cron or interval)")
    concurrency: ConcurrencyConfig = Field(
        ConcurrencyConfig(),
        description="the global concurrency limit a run takes a slot of; default: the file's top-level `concurrency`",
    )

    @field_validator("stages")
    @classmethod
    def _order(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        if v != sorted(v, key=STAGES.index):
            raise ValueError(f"stages must run in the order {', '.join(STAGES)}")
        if "filter" in v and "generate" not in v:
            raise ValueError("stage 'filter' needs stage 'generate'")
        return v

    @model_validator(mode="after")
    def _sources(self) -> Pipeline:
        if self.evaluate.chat_template is None:  # chat models are evaluated as they are trained and served
            self.evaluate = self.evaluate.model_copy(update={"chat_template": self.data.chat_template})
        for name in ("quantize", "draft"):
            src = getattr(self, name).source
            if name == "draft" and self.draft.kind == "eagle3":  # the head is made from the teacher, not a student
                continue
            if name in self.stages and src != "latest" and src not in self.stages:
                raise ValueError(f"{name}.source: stage {src!r} is not in stages")
        if "draft" in self.stages and self.draft.kind == "eagle3" and "generate" not in self.stages:
            raise ValueError("draft.kind: eagle3 trains on the teacher's samples and needs stage 'generate'")
        if "quantize" in self.stages and self.quantize.heal is not None:
            if "nf4" not in self.quantize.formats:
                raise ValueError("quantize.heal: heals the NF4 model; add nf4 to quantize.formats")
            if "filter" not in self.stages:
                raise ValueError("quantize.heal: distils on the kept traces and needs stage 'filter'")
        if "train" in self.stages and self.train.method != "hard" and "filter" not in self.stages:
            raise ValueError(
                f"stages: train.method {self.train.method!r} learns from the teacher's traces and needs "
                "stage 'filter' (only method 'hard' trains on the dataset's answers alone)"
            )
        if self.teacher.pad_token is not None:
            raise ValueError("teacher.pad_token: only the student is trained and padded; set student.pad_token")
        if "{answer}" not in self.train.hard_label_template:
            raise ValueError("train.hard_label_template: must contain {answer}")
        if "train" in self.stages and self.train.method == "logit_kd" and self.generate.logprobs == 0:
            raise ValueError("train.method: logit_kd needs the teacher's top-k: set generate.logprobs > 0")
        ens = self.generate.ensemble
        if ens and ens.merge == "average" and "train" in self.stages and self.train.method != "logit_kd":
            raise ValueError(
                f"generate.ensemble.merge average: only train.method logit_kd reads the averaged distributions "
                f"({self.train.method!r} would learn from `teacher` alone); use merge traces, or logit_kd"
            )
        if self.registry:
            missing = [s for s in self.registry.stages or [] if s not in self.stages]
            if missing:
                raise ValueError(f"registry.stages: stage {missing[0]!r} is not in stages")
            if not set(MODEL_STAGES) & set(self.stages):
                raise ValueError(f"registry: no model stage ({', '.join(MODEL_STAGES)}) in stages to register")
        return self


class PipelinesFile(Strict):
    concurrency: ConcurrencyConfig = Field(ConcurrencyConfig(), description="default for every pipeline")
    pipelines: Annotated[dict[str, Pipeline], Field(min_length=1)]


def _inherit_concurrency(data: dict, raw: dict) -> None:
    """A pipeline without its own `concurrency` section takes the file's (so one line serialises every pipeline)."""
    if isinstance(data.get("concurrency"), dict) and isinstance(raw, dict) and "concurrency" not in raw:
        raw["concurrency"] = copy.deepcopy(data["concurrency"])


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "too_short": "must have at least {min_length} item(s)",
}


def _format(err: dict, prefix: str) -> str:
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal["))]
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in _MESSAGES:
        nice = {k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in ctx.items()}
        msg = _MESSAGES[kind].format(**nice)
    elif kind == "literal_error":
        msg = f"must be one of {ctx.get('expected', '')}"
    elif kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
    else:
        msg = err["msg"][0].lower() + err["msg"][1:]
    return f"{'.'.join([prefix, *loc]) if prefix else '.'.join(loc)}: {msg}"


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError([f"--set {dotted}: {key} is not a section"])
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`key.sub=value` strings; the value is read as YAML (so 1e-3, true, [a, b] mean what they look like), and
    as the plain string when it is not YAML (`{prompt` is a string, not a traceback)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {item}: expected key=value, e.g. train.learning_rate=1e-4"])
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def read_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: file not found"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping with a 'pipelines' key"])
    return data


def load_file(path: str | Path) -> PipelinesFile:
    data = read_file(path)
    for raw in (data.get("pipelines") or {}).values() if isinstance(data.get("pipelines"), dict) else ():
        _inherit_concurrency(data, raw)
    context = {"base_dir": str(Path(path).resolve().parent)}
    try:
        f = PipelinesFile.model_validate(copy.deepcopy(data), context=context)
    except ValidationError as e:
        raise ConfigError([_format(err, "") for err in e.errors()]) from None
    lines = []
    for name, p in f.pipelines.items():
        if p.schedule and p.schedule.overrides:
            lines += _check_overrides(name, data["pipelines"][name], p.schedule.overrides, context)
    limits: dict[str, tuple[str, int]] = {}
    for name, p in f.pipelines.items():
        c = p.concurrency
        if not c.enabled:
            continue
        first, slots = limits.setdefault(c.limit_name, (name, c.slots))
        if slots != c.slots:
            lines.append(
                f"pipelines.{name}.concurrency.slots: limit {c.limit_name!r} has {slots} slot(s) in "
                f"pipelines.{first}; one limit has one size"
            )
    if lines:
        raise ConfigError(lines)
    return f


def _check_overrides(name: str, raw: dict, overrides: list[str], context: dict) -> list[str]:
    """A schedule's overrides must make a valid pipeline: find out now, not at 3 a.m. when the run starts."""
    where = f"pipelines.{name}.schedule.overrides"
    raw = copy.deepcopy(raw)
    raw.pop("schedule", None)
    try:
        for key, value in parse_overrides(overrides).items():
            set_dotted(raw, key, value)
    except ConfigError as e:
        return [f"{where}: {e.lines[0].removeprefix('--set ')}"]
    try:
        Pipeline.model_validate(raw, context=context)
    except ValidationError as e:
        return [f"{where}: {_format(err, '')}" for err in e.errors()]
    return []


def load_pipeline(path: str | Path, name: str, overrides: dict[str, Any] | None = None) -> Pipeline:
    """One pipeline of the file, with `--set` overrides applied before validation."""
    data = read_file(path)
    pipelines = data.get("pipelines") or {}
    if name not in pipelines:
        known = ", ".join(sorted(pipelines)) or "none"
        raise ConfigError([f"pipelines.{name}: unknown pipeline (defined: {known})"])
    raw = pipelines[name]
    _inherit_concurrency(data, raw)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    try:
        return Pipeline.model_validate(raw, context={"base_dir": str(Path(path).resolve().parent)})
    except ValidationError as e:
        raise ConfigError([_format(err, f"pipelines.{name}") for err in e.errors()]) from None
