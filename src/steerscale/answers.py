"""The one answer reader: every way steerscale pulls a final answer out of generated text, and normalises it.

A strategy's vote (``scale``) and a task's score (``measure``) read answers here, so they can agree: evaluation
hands each task's own reader (``Task.read_answer``) to the strategy as its ``answer_fn``, and the task scores the
answer that same reader returns. Readers, each ``text -> str | None``:

* ``extract_answer``: ``\\boxed{..}``, ``Answer: X`` / ``the answer is X`` (number or choice letter), else the last
  number; normalised so that equal answers vote together (the strategies' default);
* ``last_number``: the last number (GSM8K's convention); ``boxed_or_number``: MATH's (``\\boxed{}`` first);
* ``answer_line``: the text after the last ``Answer:`` (else the last line), what reasoning-gym's checkers read;
* ``choice_letter``: the chosen option of a multiple-choice reply, as an index;
* ``normalize_text``: the whole reply, SQuAD-normalised (open QA, TruthfulQA generation).

This module is at the bottom of the package (it imports only ``errors``): both ``scale`` and ``measure`` use it.
"""

from __future__ import annotations

import math
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


def last_number(text: str) -> str | None:
    """The last number in ``text`` (commas and ``$`` removed), the usual GSM8K answer extraction."""
    hits = re.findall(r"-?\$?\d[\d,]*(?:\.\d+)?", text or "")
    if not hits:
        return None
    return hits[-1].replace(",", "").replace("$", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    except ValueError:
        return a.strip() == b.strip()


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), the MATH answer convention."""
    idx = (text or "").rfind("\\boxed")
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        return None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def boxed_or_number(text: str) -> str | None:
    """MATH's reader: the last ``\\boxed{}`` content, else the last number."""
    boxed = last_boxed(text)
    return boxed if boxed is not None else last_number(text)


def normalize_math(s: str | None) -> str:
    """A light MATH answer normaliser: strip spaces, ``\\left``/``\\right``, ``$``, ``\\!``, trailing dots,
    ``\\dfrac``->``\\frac``, ``^\\circ``, ``\\text{...}`` wrappers. Exact match after this is the metric."""
    if s is None:
        return ""
    s = s.strip().strip("$").rstrip(".")
    for a, b in [("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), (" ", "")]:
        s = s.replace(a, b)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"\\mbox\{(.*?)\}", r"\1", s)
    return s


def normalize_text(s: str | None) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    s = re.sub(r"[^\w\s]", " ", (s or "").lower())
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(a: str, b: str) -> float:
    ta, tb = normalize_text(a).split(), normalize_text(b).split()
    if not ta or not tb:
        return float(ta == tb)
    common = sum(min(ta.count(w), tb.count(w)) for w in set(ta))
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def answer_line(text: str) -> str:
    """The text after the last ``Answer:`` (else the last non-empty line): what reasoning-gym's checkers see."""
    text = text or ""
    i = text.lower().rfind("answer:")
    if i >= 0:
        rest = text[i + len("answer:"):].strip()
        return rest.splitlines()[0].strip() if rest else ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def choice_letter(text: str, n_choices: int) -> int | None:
    """The index of the first standalone answer letter in a multiple-choice reply (``B``, ``(B)``, ``B.``,
    ``Answer: B``), or None."""
    valid = LETTERS[:n_choices]
    m = re.search(rf"(?:answer|option)\s*(?:is|:)?\s*\(?([{valid}])\b", text or "", re.I)
    if m and m.group(1).upper() in valid:
        return valid.index(m.group(1).upper())
    m = re.search(rf"(?<![A-Za-z])\(?([{valid}])(?:[).:]|\s|$)", (text or "").strip())
    return valid.index(m.group(1)) if m else None
