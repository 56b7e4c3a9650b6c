"""Demo assets: the tokenizer, the tiny Llama configs, and the `demo:` model references.

`demo:teacher` is the teacher the project trained itself (`python -m distillery.demo.build_teacher`), shipped
in `distillery/demo/assets/teacher`; `demo:student` is a smaller random-init model on the same tokenizer,
built on first use into the cache (seeded, so every machine gets the same weights).
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TEACHER_DIR = ASSETS / "teacher"
# `demo:teacher-b`: a second teacher on the same tokenizer (several-teacher distillation): the demo teacher trained
# on 250 more steps of other problems at twice the learning rate (demo_teacher.json there says what it gives).
TEACHER_B_DIR = ASSETS / "teacher-b"
# The r1 rehearsal's maths problems (distillery/rehearsal.py writes them); pipelines name them `rehearsal:problems`.
REHEARSAL_PROBLEMS = ASSETS / "r1-rehearsal-problems.jsonl"
# The model's vocab (embedding rows); the tokenizer has fewer tokens (the tiny corpus runs out of merges), and
# padding the embedding to a multiple of 32 suits bitsandbytes' CPU 4-bit kernel and vLLM alike.
VOCAB_SIZE = 512
SPECIAL = {"pad": "<pad>", "eos": "</s>", "bos": "<s>"}
THINK = ["<think>", "</think>"]
# The demo's plain format as a chat template: the user turn is the question text, the assistant turn the completion
# plus eos, no role markers; chat-based trainers (TRL's GKD) then see exactly the text SFT and vLLM see.
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)

# Llama shapes. head_dim 64 keeps vLLM's CPU attention kernels happy; widths are multiples of 32.
TEACHER_SHAPE = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)
# The student is a tenth of the teacher (0.28M vs 2.9M parameters): room to compress and to draft.
STUDENT_SHAPE = dict(
    hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=1, num_key_value_heads=1
)
# Other student sizes for the capacity-gap experiment (bench/methods.py): `demo:student-tiny` (0.15M, 20x smaller
# than the teacher) and `demo:student-mid` (1.0M, 2.9x smaller; a teacher assistant between them).
STUDENT_SIZES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1
    ),
    "mid": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2
    ),
    # born-again / self-distillation: a fresh random init of the teacher's own shape (2.9M)
    "teacher": TEACHER_SHAPE,
}


def cache_dir() -> Path:
    root = os.environ.get("DISTILLERY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "distillery"


def build_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE with one token per digit (arithmetic is learnt per digit), <think> tags as single
    ordinary tokens (so decoding with skip_special_tokens keeps them), and pad != eos."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK),
        special_tokens=[SPECIAL["pad"], SPECIAL["eos"], SPECIAL["bos"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    assert tok.get_vocab_size() <= VOCAB_SIZE, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"],
        eos_token=SPECIAL["eos"],
        bos_token=SPECIAL["bos"],
        model_max_length=256,
        padding_side="right",
    )


def llama_config(shape: dict, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **shape,
    )


def init_model(shape: dict, tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape, tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return model


def save_atomic(model, tokenizer, dest: Path) -> Path:
    """Write to a temp folder beside `dest`, then move it into place: a reader never sees half a model."""
    from distillery.artifacts import atomic_dir, save_model

    with atomic_dir(dest) as tmp:
        save_model(model, tokenizer, tmp)
    return dest


# A student with a tokenizer of its own (cross-tokenizer distillation): BPE trained on other problems to 320 tokens,
# so its merges, and most ids, differ from the teacher's.
OTHER_TOKENIZER_VOCAB = 320


def other_tokenizer_student(seed: int = 0) -> Path:
    """`demo:student-othertok`: the demo student's shape on a tokenizer of its own, random init, cached per seed."""
    from filelock import FileLock

    from distillery.demo import task

    dest = cache_dir() / "demo" / f"student-othertok-init-v1-seed{seed}"
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dest}.lock", timeout=600):
        if (dest / "config.json").exists():
            return dest
        tokenizer = build_tokenizer(
            [p.question + p.trace for p in task.problems(seed=12345, count=3000)], OTHER_TOKENIZER_VOCAB
        )
        tokenizer.chat_template = DEMO_CHAT_TEMPLATE
        return save_atomic(init_model(STUDENT_SHAPE, tokenizer, seed), tokenizer, dest)


def demo_student(seed: int = 0, size: str = "") -> Path:
    """The untrained demo student (or one of STUDENT_SIZES): random init on the teacher's tokenizer, cached per
    seed."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    shape = STUDENT_SIZES[size] if size else STUDENT_SHAPE
    # v3: the dark-knowledge task's tokenizer
    dest = cache_dir() / "demo" / f"student{'-' + size if size else ''}-init-v3-seed{seed}"
    if (dest / "config.json").exists():
        return dest
    if not (TEACHER_DIR / "config.json").exists():
        raise FileNotFoundError(f"demo teacher missing at {TEACHER_DIR}: run `python -m distillery.demo.build_teacher`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Two runs starting together on a fresh cache: the second would replace the folder the first is loading from.
    with FileLock(f"{dest}.lock", timeout=600):
        if (dest / "config.json").exists():  # made while this process waited
            return dest
        tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
        return save_atomic(init_model(shape, tokenizer, seed), tokenizer, dest)


def resolve_model(ref: str, seed: int = 0) -> str:
    """Turn a model reference from pipelines.yaml into something `from_pretrained` and vLLM accept."""
    from distillery import model_uris

    if model_uris.is_uri(ref):  # downloaded once per version into the cache
        return str(model_uris.download(model_uris.resolve(ref)))
    if ref.startswith("rehearsal:"):
        from distillery.rehearsal import model_dir

        return str(model_dir(ref.removeprefix("rehearsal:"), seed))
    if ref == "demo:teacher":
        if not (TEACHER_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"demo teacher missing at {TEACHER_DIR}: run `python -m distillery.demo.build_teacher`"
            )
        return str(TEACHER_DIR)
    if ref == "demo:teacher-b":
        if not (TEACHER_B_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"demo teacher-b missing at {TEACHER_B_DIR}: see distillery/demo/build_teacher.py for its command"
            )
        return str(TEACHER_B_DIR)
    if ref == "demo:student":
        return str(demo_student(seed))
    if ref == "demo:student-othertok":
        return str(other_tokenizer_student(seed))
    if ref.startswith("demo:student-"):
        size = ref.removeprefix("demo:student-")
        if size not in STUDENT_SIZES:
            raise ValueError(
                f"model {ref!r}: unknown demo student size; known: demo:student, "
                + ", ".join(f"demo:student-{k}" for k in STUDENT_SIZES)
            )
        return str(demo_student(seed, size))
    return ref
