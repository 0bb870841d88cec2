"""Deciding whether a response answers a row correctly.

* ``exact``: the response equals the answer after normalisation (surrounding whitespace, quotes and a final
  period dropped, inner whitespace collapsed; case kept, since case can be the point of an answer);
* ``math``: the last ``\\boxed{...}`` (or the whole response) is mathematically equal to the answer, by
  ``math-verify``;
* ``choice``: the multiple-choice letter the response settles on equals the answer's letter;
* ``yesno``: ``<answer>yes</answer>`` or ``<answer>no</answer>`` in the response matches the answer.

``auto`` takes the row's ``verifier`` field when it has one, else ``exact``. A reasoning model's
``<think>...</think>`` block is removed before any verifier looks at a response.
"""

from __future__ import annotations

import re
from typing import Callable

from .errors import OpcdError

THINK = re.compile(r"^.*?</think>", re.DOTALL)


def strip_thinking(response: str) -> str:
    return THINK.sub("", response, count=1) if "</think>" in response else response


def normalize(text: str) -> str:
    text = " ".join(text.split())
    text = text.strip().strip("\"'`").strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact(response: str, answer: str) -> bool:
    return normalize(response) == normalize(answer)


def math(response: str, answer: str) -> bool:
    from math_verify import parse, verify

    boxed = last_boxed(response)
    gold = parse(answer if "\\boxed" in answer or "$" in answer else f"${answer}$")
    guess = parse(f"\\boxed{{{boxed}}}" if boxed is not None else response)
    try:
        return bool(gold) and bool(guess) and bool(verify(gold, guess))
    except Exception:  # math-verify can fail on malformed expressions: then it is not a correct answer
        return False


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


CHOICE_PATTERNS = [
    re.compile(r"<answer>\s*\(?([A-J])\)?[^<]*</answer>", re.IGNORECASE),  # <answer>(B)</answer>, the official code's
    re.compile(r"answer\s*(?:is|:)?\s*\(?([A-J])\)?\b", re.IGNORECASE),
    re.compile(r"\\boxed\{\(?([A-J])\)?\}"),
    re.compile(r"^\(?([A-J])\)?(?:[.):]|$)", re.MULTILINE),
]


def choice_letter(text: str) -> str | None:
    """The option letter a response settles on: its last ``<answer>X</answer>``, "answer: X", boxed letter, or line
    starting with one."""
    for pattern in CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def choice(response: str, answer: str) -> bool:
    want = choice_letter(answer.strip()) or answer.strip().upper()[:1]
    return choice_letter(response) == want


YESNO = re.compile(r"<answer>\s*(yes|no)\s*</answer>", re.IGNORECASE)


def yesno(response: str, answer: str) -> bool:
    found = YESNO.findall(response)
    want = YESNO.findall(answer)
    want_word = (want[-1] if want else answer).strip().lower()
    return bool(found) and found[-1].lower() == want_word


VERIFIERS: dict[str, Callable[[str, str], bool]] = {"exact": exact, "math": math, "choice": choice, "yesno": yesno}


def verifier_for(row_verifier: str | None, chosen: str) -> Callable[[str, str], bool]:
    """The verifier for a row: the ``--verifier`` flag unless it is ``auto``, then the row's own, else exact."""
    name = row_verifier if chosen == "auto" and row_verifier else ("exact" if chosen == "auto" else chosen)
    if name not in VERIFIERS:
        raise OpcdError(f"unknown verifier {name!r}; choose one of {', '.join(VERIFIERS)}")
    return VERIFIERS[name]


def is_correct(response: str, answer: str, row_verifier: str | None, chosen: str) -> bool:
    return verifier_for(row_verifier, chosen)(strip_thinking(response), answer)
