"""Verifiers: is a completion's final answer the reference? Shared by the filter stage (which traces to keep),
and DPO (which of the student's samples is chosen).

    VERIFIERS[cfg.verifier](completion_text, reference_answer, filter_cfg) -> bool

Adding one: `@register("name")` here and its name in FilterConfig.verifier.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from fractions import Fraction

from distillery.config import FilterConfig

THINK = re.compile(r"^\s*<think>(?P<body>.*?)</think>(?P<after>.*)$", re.S)
# A number as written in an answer: 1,000 / 3.50 / -2 / .5 / 3/4. Thousands groups before plain digits so
# "1,000" is one number while "1, 2" is two.
NUMBER = re.compile(r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")


def think_ok(text: str) -> bool:
    m = THINK.match(text)
    return bool(
        m and m["body"].strip() and "<think>" not in m["body"] and "</think>" not in m["after"] and m["after"].strip()
    )


def answer_part(text: str) -> str:
    """What the model says after its reasoning: answers inside <think> never count."""
    return text.split("</think>")[-1]


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


def _last_match(after: str, cfg: FilterConfig) -> re.Match | None:
    matches = list(re.finditer(cfg.answer_pattern, after))
    return matches[-1] if matches else None


def regex_answer(after: str, cfg: FilterConfig) -> str | None:
    """The last group of the last answer_pattern match."""
    m = _last_match(after, cfg)
    return None if m is None else m[m.re.groups]


def parse_number(s: str) -> float | None:
    """'1,000' '3.50' '-2' '3/4' '$5' '50%' -> a float; None when it is not a number."""
    s = s.strip().strip("$").rstrip(".%").replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return float(Fraction(num) / Fraction(den))
        return float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        return None


def _math_equal(reference: str, text: str) -> bool | None:
    """math-verify's verdict on `text` against `reference`; None when either side does not parse."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("filter.verifier=math/boxed needs math-verify: pip install 'math-verify==0.9.0'") from e
    # math-verify times out with signal.alarm, which only works in the main thread; Prefect runs tasks in
    # worker threads, so there it runs without a timeout (it only parses the extracted final answer).
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    # A bare reference like x^2+1 only parses as LaTeX once it is in math mode.
    wrapped = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    gold = parse(wrapped, parsing_timeout=timeout) or parse(reference, parsing_timeout=timeout)
    got = parse(text, parsing_timeout=timeout)
    if not gold or not got:
        return None
    return bool(verify(gold, got, timeout_seconds=timeout))


class _NoTimeoutNotice(logging.Filter):
    """math-verify warns on every call made without a timeout; once is enough (see _math_equal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


# ---- verifiers: name -> (completion text, reference answer, cfg) -> correct? ------------------------------

Verifier = Callable[[str, str, FilterConfig], bool]
VERIFIERS: dict[str, Verifier] = {}


def register(name: str) -> Callable[[Verifier], Verifier]:
    def add(fn: Verifier) -> Verifier:
        VERIFIERS[name] = fn
        return fn

    return add


@register("regex")
def verify_regex(text: str, reference: str, cfg: FilterConfig) -> bool:
    got = regex_answer(answer_part(text), cfg)
    return got is not None and normalise(got) == normalise(reference)


def _exact_form(s: str) -> str:
    return normalise(s.strip().rstrip(".")).casefold()


@register("exact")
def verify_exact(text: str, reference: str, cfg: FilterConfig) -> bool:
    """The whole answer after </think>, or its answer_pattern capture, equals the reference (case-folded)."""
    after, want = answer_part(text), _exact_form(reference)
    got = regex_answer(after, cfg)
    return _exact_form(after) == want or (got is not None and _exact_form(got) == want)


@register("numeric")
def verify_numeric(text: str, reference: str, cfg: FilterConfig) -> bool:
    """The answer_pattern capture, or else the last number after </think>, within `tolerance` of the reference."""
    after = answer_part(text)
    m = _last_match(after, cfg)
    if m is not None and m.start(m.re.groups) >= 0:
        # Read the whole number the capture starts (the default pattern stops "3.50" at "3").
        num = NUMBER.match(after, m.start(m.re.groups))
        got = num[0] if num and len(num[0]) >= len(m[m.re.groups]) else m[m.re.groups]
    else:
        found = NUMBER.findall(after)
        got = found[-1] if found else None
    a, b = (None if got is None else parse_number(got)), parse_number(reference)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=cfg.tolerance)


@register("math")
def verify_math(text: str, reference: str, cfg: FilterConfig) -> bool:
    """math-verify on the final answer (\\boxed{} preferred, any LaTeX or number otherwise)."""
    after = answer_part(text)
    if _math_equal(reference, after):
        return True
    boxed = extract_boxed(after)  # what math-verify cannot parse may still match as plain text
    return boxed is not None and normalise(boxed) == normalise(reference)


@register("boxed")
def verify_boxed(text: str, reference: str, cfg: FilterConfig) -> bool:
    """The last \\boxed{} after </think> is required; equal as plain text or by math-verify."""
    got = extract_boxed(answer_part(text))
    if got is None:
        return False
    return normalise(got) == normalise(reference) or bool(_math_equal(reference, f"\\boxed{{{got}}}"))


@register("none")
def verify_none(text: str, reference: str, cfg: FilterConfig) -> bool:
    return True
