"""Pulling a final answer out of generated text, and normalising it so that equal answers vote together."""

from __future__ import annotations

import re

_NUM = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_PATTERNS = [
    re.compile(r"\\boxed\{([^{}]*)\}"),
    # "the answer is 34 + 17 = 51" means 51: skip a worked expression up to its last "=", and never stop inside
    # a number or in front of an operator (that would read the expression's first operand as the answer)
    re.compile(r"[Aa]nswer\s*(?:is|:|=)\s*:?\s*\$?\s*(?:[\d \t.,()+\-*/×÷^]+=[ \t]*)*(" + _NUM
               + r")(?![\d,]|[./]\d|\s*[+\-*/×÷^]\s*\d)"),
    re.compile(r"[Aa]nswer\s*(?:is|:)\s*\(?([A-Ea-e])\b\)?"),
]


def normalize(answer: str | None) -> str | None:
    if answer is None:
        return None
    a = answer.strip().strip("$ .").replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", a):
        a = a.split(".")[0]
    return a or None


def extract_answer(text: str) -> str | None:
    """``\\boxed{..}``, ``Answer: X`` / ``the answer is X`` (number or choice letter), else the last number."""
    if not text:
        return None
    for pat in _PATTERNS:
        hits = pat.findall(text)
        if hits:
            return normalize(hits[-1])
    nums = re.findall(r"(?<![\d)])" + _NUM, text)  # in "20-8" the minus is an operator, not 8's sign
    return normalize(nums[-1]) if nums else None
