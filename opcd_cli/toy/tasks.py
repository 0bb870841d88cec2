"""The toy world's tasks: word rules given by a system prompt, a hidden code law learned from experience, and a
game of locked doors played turn by turn on that law.

Two kinds of context change the right answer here:

* **Rules** (system-prompt style). The user sends a short lowercase word; a system prompt says what to do
  with it ("write the word backwards"). Without a system prompt the toy models copy the word, so a rule is
  only followed when its prompt is in context, until OPCD moves it into the weights.
* **Codes** (experience style). Every word has a code, a digit that depends only on its first letter, by a
  law the models never see during pretraining. Answers state the piece of the law they rest on
  (``Code of kip?`` -> ``k-words have code K7``: words starting with k have code K7), and experience items
  such as ``- EXPERIENCE ITEM: k-words have code K7`` state pieces of the law; with them in context the models
  look the code up, without them they guess the digit.
* **Doors** (the same law, played as a game). A corridor of locked doors, each marked with a word; the player
  opens a door by answering its code question, turn by turn, and the game is lost at the first wrong code.
  The experience items that state the law are the safe path.

Everything here is pure Python and deterministic given a ``random.Random``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, Sequence

from ..experience import ITEM_PREFIX, trace_line  # noqa: F401  (trace_line: the toy builder reads it here)

LETTERS = string.ascii_lowercase
CAPITALS = string.ascii_uppercase
VOWELS = set("aeiou")
CONSONANTS = "".join(c for c in LETTERS if c not in VOWELS)

EXTRACT_INSTRUCTION = "Write one experience item for each lesson."


@dataclass(frozen=True)
class Rule:
    name: str
    instruction: str
    apply: Callable[[str], str]


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in [
        Rule("reverse", "Reply with the word written backwards.", lambda w: w[::-1]),
        Rule("upper", "Reply with the word in capital letters.", str.upper),
        Rule("double", "Reply with every letter of the word written twice.", lambda w: "".join(c + c for c in w)),
        Rule("shift", "Reply with every letter replaced by the next letter of the alphabet.", _shift),
        Rule("swap", "Reply with the word after swapping its first and last letters.", lambda w: w[-1] + w[1:-1] + w[0]),
        Rule("rotate", "Reply with the word after moving its first letter to the end.", lambda w: w[1:] + w[0]),
        Rule("twice", "Reply with the word two times, joined by a dash.", lambda w: w + "-" + w),
        Rule("first", "Reply with the first letter of the word in capital letters.", lambda w: w[0].upper()),
    ]
}

PREAMBLE = "You are a careful word assistant. The user sends one word."
CODA = " Write nothing else."


def rule_context(rule: str) -> str:
    """The system prompt that asks for ``rule``."""
    return f"{PREAMBLE} {RULES[rule].instruction}{CODA}"


def random_word(rng: random.Random, min_len: int = 3, max_len: int = 6) -> str:
    """A lowercase word whose first and last letters differ (so that every rule changes it)."""
    while True:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if word[0] != word[-1] and len(set(word)) > 1:
            return word


# --- the code law (experience style) -------------------------------------------------------------------


def code_question(word: str) -> str:
    return f"Code of {word}?"


def code_claim(letter: str, digit: int | str) -> str:
    """The answer to a code question: the piece of the law it rests on, e.g. ``k-words have code K7``.

    A code is the capital first letter and a digit. Writing the claim lets the models find the matching
    experience item by what they have just written (the digit follows the same capital letter there), and a
    right answer is itself an experience item worth keeping.
    """
    return f"{letter}-words have code {letter.upper()}{digit}"


def recall_table(codes: dict[str, int]) -> str:
    """A table of codes by key, ``Codes: K7 M1 R2``."""
    return "Codes: " + " ".join(f"{key}{digit}" for key, digit in codes.items())


def recall_question(asked: Sequence[str]) -> str:
    return "Recall: " + " ".join(asked)


def recall_answer(codes: dict[str, int], asked: Sequence[str]) -> str:
    """Each asked key with its code, in the order asked: ``M1 R2``."""
    return " ".join(f"{key}{codes[key]}" for key in asked)


def recall_prompt(codes: dict[str, int], asked: list[str]) -> str:
    """A pretraining drill of looking codes up: ``Codes: K7 M1 R2`` then ``Recall: M R`` (answer ``M1 R2``)."""
    return recall_table(codes) + "\n" + recall_question(asked)


def code_answer(word: str, law: dict[str, int]) -> str:
    return code_claim(word[0], law[word[0]])


def code_item(letter: str, digit: int) -> str:
    return ITEM_PREFIX + code_claim(letter, digit)


def code_context(law: dict[str, int], letters: list[str] | None = None) -> str:
    """Experience items stating the law for ``letters`` (all of it by default), one per line."""
    letters = sorted(law) if letters is None else letters
    return "\n".join(code_item(letter, law[letter]) for letter in letters)


def make_law(rng: random.Random, letters: str = CONSONANTS) -> dict[str, int]:
    """A hidden law: a code digit for each starting letter."""
    return {letter: rng.randrange(10) for letter in letters}


def word_starting_with(rng: random.Random, letter: str) -> str:
    return letter + random_word(rng, 2, 5)


# --- the doors game (the code law, turn by turn) -----------------------------------------------------------

DOORS_OUT = "Open. You are out."
DOORS_TRAP = "Wrong code. The trap opens."


def doors_first(doors: int, word: str) -> str:
    """The game's first observation: how many doors, and the first door's code question."""
    return f"{doors} locked door{'s' if doors != 1 else ''}. {code_question(word)}"


def doors_next(word: str) -> str:
    return f"Open. {code_question(word)}"


def doors_again(word: str) -> str:
    """After a reply with no code in it: the same door again."""
    return f"No code read. {code_question(word)}"


def doors_chat(rng: random.Random, law: dict[str, int], words: list[str], known: set[str]) -> list[tuple[str, str]]:
    """A game as (observation, reply) turns: a right code for letters in ``known``, a guessed digit for the
    others; the game stops at the first wrong code (the chat ends on that reply)."""
    turns = []
    for i, word in enumerate(words):
        observation = doors_first(len(words), word) if i == 0 else doors_next(word)
        digit = law[word[0]] if word[0] in known else rng.randrange(10)
        turns.append((observation, code_claim(word[0], digit)))
        if digit != law[word[0]]:
            break
    return turns


# --- extraction (turning verdicts into experience items) -----------------------------------------------


EXTRACTION_TEMPLATE = "Attempts and verdicts:\n{traces}\n" + EXTRACT_INSTRUCTION


def extraction_prompt(traces: str) -> str:
    return EXTRACTION_TEMPLATE.format(traces=traces)


def extraction_answer(attempts: list[tuple[str, str, bool]]) -> str:
    """The items a careful reader writes from (question, answer, right) attempts: each right answer once.

    Wrong answers teach nothing definite here (nine other codes remain), so they give no item.
    """
    kept: list[str] = []
    for _, answer, right in attempts:
        if right and answer not in kept:
            kept.append(answer)
    return "\n".join(ITEM_PREFIX + answer for answer in kept) or "None."
