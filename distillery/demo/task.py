"""Synthetic multi-step arithmetic word problems with checkable answers.

A problem reads "Question: Mia has 7 shells. She finds 5 more. Then she gives away 3. How many shells does
Mia have now?\nAnswer:" and a correct trace is " <think>7+5=12. 12-3=9.</think> The answer is 9."
Generation is seeded, so every split can be rebuilt bit for bit; splits are disjoint by question text.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

NAMES = [
    ("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"),
    ("Ivy", "She"), ("Max", "He"), ("Eva", "She"), ("Ben", "He"), ("Lia", "She"), ("Kai", "He"),
]
ITEMS = ["apples", "shells", "coins", "books", "stamps", "marbles", "cards", "pens"]
ADD = ["finds {n} more", "buys {n} more", "gets {n} more", "is given {n} more"]
SUB = ["gives away {n}", "loses {n}", "sells {n}", "trades away {n}"]
ANSWER_RE = re.compile(r"The answer is (-?\d+)")


@dataclass(frozen=True)
class Problem:
    question: str  # the prompt, ending in "Answer:"
    answer: int
    trace: str  # the gold completion: reasoning in <think>, then the final answer

    def as_record(self) -> dict:
        return {"prompt": self.question, "answer": str(self.answer), "completion": self.trace}


def make_problem(rng: random.Random, steps: int = 2, max_start: int = 20, max_operand: int = 9) -> Problem:
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = rng.randint(2, max_start)
    sentences = [f"{name} has {value} {item}."]
    work = []
    for i in range(steps):
        n = rng.randint(1, max_operand)
        if rng.random() < 0.5 and value - n >= 0:
            phrase, new = rng.choice(SUB).format(n=n), value - n
            work.append(f"{value}-{n}={new}.")
        else:
            phrase, new = rng.choice(ADD).format(n=n), value + n
            work.append(f"{value}+{n}={new}.")
        sentences.append(f"{'Then ' + pronoun.lower() if i else pronoun} {phrase}.")
        value = new
    question = (
        "Question: " + " ".join(sentences) + f" How many {item} does {name} have now?\nAnswer:"
    )
    trace = f" <think>{' '.join(work)}</think> The answer is {value}."
    return Problem(question, value, trace)


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


# The eval split is fixed first; every other split excludes its questions, so train and eval never meet.
EVAL_SEED, EVAL_SIZE = 1234, 200


def eval_problems() -> list[Problem]:
    return list(problems(EVAL_SEED, EVAL_SIZE))
