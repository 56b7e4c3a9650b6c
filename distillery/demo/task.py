"""Synthetic multi-step arithmetic word problems with checkable answers and many right ways to answer them.

A problem reads "Question: Mia has 7 shells. She finds 5 more. Then she gives away 3. How many shells does
Mia have now?\nAnswer:". Unlike a one-template task, a correct trace is one of many, as with a real LLM's free
text, so a teacher that learnt the task spreads its probability over them (dark knowledge soft targets carry):

- the additive steps may be done in any order that never goes below zero ("7+5=12. 12-3=9." or
  "7-3=4. 4+5=9."),
- an addition may be written either way round ("7+5=12." or "5+7=12."), and so may a product,
- the reasoning opens with one of several phrases, steps are joined by one of several words, and the answer is
  stated in one of several hundred ways (lead, subject, verb, what follows the number), always ending
  "The answer is N." (what every verifier reads).

Every choice is uniform, so `trace_entropy` is the exact entropy (nats) of the gold traces of a problem, and
`parse_trace` recovers the choices behind a trace (or says it is not a gold one). Hard items (`HARD_FRACTION` of
every in-distribution split) end with a multiplication of the running total by 2..9 ("Then she multiplies them
by 7."), which a small model only partly learns; out-of-distribution items (`ood_eval_problems`) ask the same
arithmetic about names and items training never uses. (Longer chains and larger numbers were tried first: the
demo teacher, trained on 1-3 steps and starts up to 20, never writes a fourth step or a start above 20, so it
scored 2-4% there, too little to tell students apart.)
Generation is seeded, so every split can be rebuilt bit for bit; splits are disjoint by question text.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

NAMES = [
    ("Mia", "She"),
    ("Tom", "He"),
    ("Ana", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Sam", "He"),
    ("Ivy", "She"),
    ("Max", "He"),
    ("Eva", "She"),
    ("Ben", "He"),
    ("Lia", "She"),
    ("Kai", "He"),
]
ITEMS = ["apples", "shells", "coins", "books", "stamps", "marbles", "cards", "pens"]
ADD = ["finds {n} more", "buys {n} more", "gets {n} more", "is given {n} more"]
SUB = ["gives away {n}", "loses {n}", "sells {n}", "trades away {n}"]
MUL = "multiplies them by {n}"
# The free parts of a trace, each slot's options equally right: how the reasoning opens, what joins two steps,
# and the sentence before the fixed "The answer is N." (lead, comma, subject, verb, what follows the number).
OPENERS = [
    "",
    "Let me see. ",
    "Step by step. ",
    "OK, ",
    "Right, ",
    "First, ",
    "So, ",
    "Well, ",
    "Hmm. ",
    "Let me think. ",
]
JOINERS = [" ", " Then ", " Next, ", " Now ", " After that, ", " And "]
LEADS = ["So", "Thus", "In the end", "Finally", "Now", "All in all", "Altogether", "Overall"]
COMMAS = ["", ","]
VERBS = ["has", "ends up with", "is left with", "keeps", "holds", "owns"]
TAILS = ["{item}", "in total", "now", "of them"]
ANSWER_RE = re.compile(r"The answer is (-?\d+)")
HARD_FRACTION = 0.25  # share of in-distribution items that end with a multiplication
TRAIN_STEPS = (1, 2, 3)  # additive steps
# Out of distribution: names and items that no training question uses.
OOD_NAMES = [("Noa", "She"), ("Raj", "He"), ("Uma", "She"), ("Ole", "He"), ("Ada", "She"), ("Gus", "He")]
OOD_ITEMS = ["stickers", "beads", "cups", "keys", "shirts", "rocks"]


@dataclass(frozen=True)
class Problem:
    question: str  # the prompt, ending in "Answer:"
    answer: int
    trace: str  # one gold completion, drawn uniformly from the problem's valid traces
    name: str = ""
    pronoun: str = "She"
    item: str = ""
    start: int = 0
    ops: tuple[tuple[str, int], ...] = ()  # ("+", 5), ("-", 3), ("*", 7) in question order
    kind: str = "easy"  # easy | hard (ends with a product) | ood (unseen names and items)

    def as_record(self) -> dict:
        return {"prompt": self.question, "answer": str(self.answer), "completion": self.trace}


@dataclass(frozen=True)
class Choices:
    """The free choices that make one trace of a problem: the order of its steps, each step's form, the opener,
    the joiners between steps and the slots of the closing sentence (indices into the lists above)."""

    order: tuple[tuple[str, int], ...]
    forms: tuple[int, ...]
    opener: int
    joiners: tuple[int, ...]
    lead: int
    comma: int
    subject: int  # 0: the name, 1: the pronoun
    verb: int
    tail: int


def _orders(start: int, ops: tuple[tuple[str, int], ...]) -> list[tuple[tuple[str, int], ...]]:
    """Every order of the additive steps that never goes below zero; a product stays last."""
    additive = [o for o in ops if o[0] != "*"]
    tail = [o for o in ops if o[0] == "*"]
    found = []
    for perm in dict.fromkeys(itertools.permutations(additive)):
        v, ok = start, True
        for op, n in perm:
            v = v + n if op == "+" else v - n
            ok = ok and v >= 0
        if ok:
            found.append(tuple(perm) + tuple(tail))
    return found


def _step_forms(value: int, op: str, n: int) -> tuple[list[str], int]:
    if op == "+":
        new = value + n
        forms = [
            f"{value}+{n}={new}.",
            f"{n}+{value}={new}.",
            f"{value} plus {n} is {new}.",
            f"{n} plus {value} is {new}.",
        ]
    elif op == "-":
        new = value - n
        forms = [f"{value}-{n}={new}.", f"{value} minus {n} is {new}."]
    else:
        new = value * n
        forms = [
            f"{value}*{n}={new}.",
            f"{n}*{value}={new}.",
            f"{value} times {n} is {new}.",
            f"{n} times {value} is {new}.",
        ]
    return list(dict.fromkeys(forms)), new  # 3+3 written either way is one form


def _closer(p: Problem, c: Choices) -> str:
    subject = p.name if c.subject == 0 else p.pronoun.lower()
    tail = TAILS[c.tail].format(item=p.item)
    return f" {LEADS[c.lead]}{COMMAS[c.comma]} {subject} {VERBS[c.verb]} {p.answer} {tail}. The answer is {p.answer}."


def render(p: Problem, c: Choices) -> str:
    v, work = p.start, []
    for (op, n), f in zip(c.order, c.forms, strict=True):
        options, v = _step_forms(v, op, n)
        work.append(options[f])
    think = work[0] + "".join(JOINERS[j] + w for j, w in zip(c.joiners, work[1:], strict=True))
    return f" <think>{OPENERS[c.opener]}{think}</think>" + _closer(p, c)


def _form_counts(p: Problem, order) -> list[int]:
    v, counts = p.start, []
    for op, n in order:
        options, v = _step_forms(v, op, n)
        counts.append(len(options))
    return counts


CLOSER_WAYS = len(LEADS) * len(COMMAS) * 2 * len(VERBS) * len(TAILS)


def trace_entropy(p: Problem) -> float:
    """Exact entropy (nats) of the gold-trace distribution `sample_trace` draws from: an order uniformly, then
    each step's form, the opener, the joiners and the closing slots, each uniformly."""
    orders = _orders(p.start, p.ops)
    forms = sum(sum(math.log(c) for c in _form_counts(p, o)) for o in orders) / len(orders)
    joins = (len(p.ops) - 1) * math.log(len(JOINERS))
    return math.log(len(orders)) + forms + math.log(len(OPENERS)) + joins + math.log(CLOSER_WAYS)


def sample_choices(p: Problem, rng: random.Random) -> Choices:
    orders = _orders(p.start, p.ops)
    order = orders[rng.randrange(len(orders))]
    return Choices(
        order,
        tuple(rng.randrange(c) for c in _form_counts(p, order)),
        rng.randrange(len(OPENERS)),
        tuple(rng.randrange(len(JOINERS)) for _ in p.ops[1:]),
        rng.randrange(len(LEADS)),
        rng.randrange(len(COMMAS)),
        rng.randrange(2),
        rng.randrange(len(VERBS)),
        rng.randrange(len(TAILS)),
    )


def sample_trace(p: Problem, rng: random.Random) -> str:
    return render(p, sample_choices(p, rng))


def parse_trace(p: Problem, text: str) -> Choices | None:
    """The choices behind `text` if it is one of the problem's gold traces (to the character), else None: how a
    sampled student's alternatives are counted."""
    text = text.removesuffix("</s>")
    if not text.startswith(" <think>") or "</think>" not in text:
        return None
    think, closer = text[len(" <think>") :].split("</think>", 1)
    valid = set(_orders(p.start, p.ops))

    def steps(rest: str, value: int, done: tuple, forms: tuple, joiners: tuple):
        if len(done) == len(p.ops):
            if not rest and done in valid:
                yield done, forms, joiners
            return
        if done:
            heads = [(j, rest[len(s) :]) for j, s in enumerate(JOINERS) if rest.startswith(s)]
        else:
            heads = [(None, rest)]
        remaining = list(p.ops)
        for o in done:
            remaining.remove(o)
        for j, r in heads:
            for o in dict.fromkeys(remaining):
                options, new = _step_forms(value, *o)
                for f, s in enumerate(options):
                    if r.startswith(s):
                        yield from steps(
                            r[len(s) :], new, done + (o,), forms + (f,), joiners + (() if j is None else (j,))
                        )

    for oi, opener in enumerate(OPENERS):
        if not think.startswith(opener):
            continue
        for order, forms, joiners in steps(think[len(opener) :], p.start, (), (), ()):
            for lead, comma, subject, verb, tail in itertools.product(
                range(len(LEADS)), range(len(COMMAS)), range(2), range(len(VERBS)), range(len(TAILS))
            ):
                c = Choices(order, forms, oi, joiners, lead, comma, subject, verb, tail)
                if _closer(p, c) == closer:
                    return c
    return None


def make_problem(
    rng: random.Random,
    steps: int | None = None,
    max_start: int = 20,
    max_operand: int = 9,
    hard: bool | None = None,
    kind: str | None = None,
    names: list[tuple[str, str]] = NAMES,
    items: list[str] = ITEMS,
) -> Problem:
    """One problem: `steps` additive steps (uniform over TRAIN_STEPS if None), then a product when `hard`
    (drawn with HARD_FRACTION if None)."""
    if hard is None:
        hard = rng.random() < HARD_FRACTION
    if steps is None:
        steps = rng.choice(TRAIN_STEPS[:2] if hard else TRAIN_STEPS)
    name, pronoun = rng.choice(names)
    item = rng.choice(items)
    value = rng.randint(2, max_start)
    start = value
    sentences = [f"{name} has {value} {item}."]
    ops: list[tuple[str, int]] = []
    for i in range(steps + int(hard)):
        last_product = hard and i == steps
        n = rng.randint(2, 9) if last_product else rng.randint(1, max_operand)
        if last_product:
            phrase, op, value = MUL.format(n=n), "*", value * n
        elif rng.random() < 0.5 and value - n >= 0:
            phrase, op, value = rng.choice(SUB).format(n=n), "-", value - n
        else:
            phrase, op, value = rng.choice(ADD).format(n=n), "+", value + n
        ops.append((op, n))
        sentences.append(f"{'Then ' + pronoun.lower() if i else pronoun} {phrase}.")
    question = "Question: " + " ".join(sentences) + f" How many {item} does {name} have now?\nAnswer:"
    p = Problem(question, value, "", name, pronoun, item, start, tuple(ops), kind or ("hard" if hard else "easy"))
    return replace(p, trace=sample_trace(p, rng))


def problems(seed: int, count: int, exclude: set[str] | None = None, **kwargs) -> Iterator[Problem]:
    """`count` distinct problems, none whose question is in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    made = 0
    while made < count:
        p = make_problem(rng, **kwargs)
        if p.question in seen:
            continue
        seen.add(p.question)
        made += 1
        yield p


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last "The answer is N" after the reasoning."""
    found = ANSWER_RE.findall(text.split("</think>")[-1])
    return found[-1] if found else None


# The eval splits are fixed first; every other split excludes their questions, so train and eval never meet.
EVAL_SEED, EVAL_SIZE = 1234, 200
OOD_SEED, OOD_SIZE = 4321, 200


def eval_problems() -> list[Problem]:
    return list(problems(EVAL_SEED, EVAL_SIZE))


def ood_eval_problems() -> list[Problem]:
    """The same arithmetic (1-3 additive steps, a product in HARD_FRACTION of them), asked about people and things
    training never names: the answer needs the unseen words copied and the numbers worked as before."""
    return list(problems(OOD_SEED, OOD_SIZE, names=OOD_NAMES, items=OOD_ITEMS, kind="ood"))
